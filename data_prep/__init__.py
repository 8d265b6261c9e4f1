"""Ray Data stages from a URL list to training shards: urls, download, filter, recaption, shard.

``data_prep.stages.STAGES`` is their table; the shard stage owns the shard schema and the
train/held-out split. ``data_prep.demo`` is the offline demo site the demo run downloads from.
Imports only ``pipeline`` and ``genmodels``, never ``workflows``.
"""
