"""The one training adapter shared by every model stage.

    from workflows.train import TrainConfig, TrainSpec, OptimGroup, fit

A stage embeds ``train: TrainConfig`` in its config, describes its models and step function
as a ``TrainSpec`` (plain PyTorch), and calls ``fit(spec, cfg.train, out, datasets, model_cfg)``.
"""

from workflows.train.config import TrainConfig
from workflows.train.export import load_weights
from workflows.train.loop import OptimGroup, TrainContext, TrainSpec
from workflows.train.ray_adapter import fit, train_resources

__all__ = ["OptimGroup", "TrainConfig", "TrainContext", "TrainSpec", "fit", "load_weights", "train_resources"]
