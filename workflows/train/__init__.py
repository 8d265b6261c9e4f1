"""The one training adapter shared by every model stage.

    from workflows.train import TrainConfig, TrainSpec, OptimGroup, fit

A stage embeds ``train: TrainConfig`` in its config, describes its models and step function
as a ``TrainSpec`` (plain PyTorch), and calls ``fit(spec, cfg.train, out, datasets, model_cfg)``.

    config.py       TrainConfig: batch, optimizer, schedule, precision, ZeRO, checkpoints
    spec.py         TrainSpec, OptimGroup, TrainContext: what a stage hands in, what its step sees
    loop.py         run(): the flat per-worker loop, no Ray
    data.py         exact-size micro-batches, the row-id resume filter, lock-step epochs, collate
    checkpoint.py   what a checkpoint holds, save/load, DirCheckpoints
    engines.py      one DeepSpeed (or plain PyTorch) engine per optimizer group
    distributed.py  process group and collectives
    export.py       the final artifact: weights, configs, metrics, previews
    ray_adapter.py  fit(): Ray Train workers, Ray Data shards, Ray Train checkpoints
    synthetic.py    a tiny denoising task for the adapter's tests and benchmark
"""

from workflows.train.config import TrainConfig
from workflows.train.data import default_collate
from workflows.train.export import load_weights
from workflows.train.ray_adapter import fit, train_resources
from workflows.train.spec import OptimGroup, TrainContext, TrainSpec

__all__ = ["OptimGroup", "TrainConfig", "TrainContext", "TrainSpec", "default_collate", "fit", "load_weights",
           "train_resources"]
