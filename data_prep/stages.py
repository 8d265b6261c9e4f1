"""The data stages, in pipeline order: URL list → img2dataset download → CLIP filter → LLaVA
recaption → training shards (which also decide the train/held-out split).

Inputs are named by role; each stage body reads ``inputs[role]``. The model stages start from
``shard``.
"""

from __future__ import annotations

from typing import Any

from data_prep import download, recaption, shard, urls
from data_prep import filter as filt
from pipeline.stage import Stage, pool_resources


def task_resources(cfg: Any) -> dict[str, float]:
    """A stage of plain Ray tasks: what one task holds (``cpus_per_task``)."""
    return {"CPU": cfg.cpus_per_task}


STAGES: list[Stage] = [
    Stage("urls", urls.run, urls.UrlsConfig, service=urls.serve),
    Stage("download", download.run, download.DownloadConfig, inputs={"urls": "urls"}, uses_ray=True,
          resources=task_resources),
    # version 2: rows carry the URL list's ``labels``.
    Stage("filter", filt.run, filt.FilterConfig, inputs={"download": "download"}, version=2, uses_ray=True,
          resources=pool_resources),
    Stage("recaption", recaption.run, recaption.RecaptionConfig, inputs={"download": "download", "filter": "filter"},
          uses_ray=True, resources=pool_resources),
    # version 2: every row carries the ``split`` column; 3: and ``labels``.
    Stage("shard", shard.run, shard.ShardConfig,
          inputs={"download": "download", "filter": "filter", "recaption": "recaption"}, version=3, uses_ray=True,
          resources=task_resources),
]
