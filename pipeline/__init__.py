"""The core floor: artifact store, validated configs, stages as data and the cached runner.

Both ``data_prep`` and the model stages in ``workflows`` stand on it; it imports neither
(no Ray Data, no torch models), so nothing here can pull a model into a data job.
"""
