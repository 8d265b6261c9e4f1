"""What a model stage hands the adapter (``TrainSpec``, ``OptimGroup``) and what its step function
sees (``TrainContext``). Plain PyTorch; the engines behind ``Group`` live in ``engines.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workflows.train.config import TrainConfig
from workflows.train.distributed import rank_world

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class OptimGroup:
    """Modules updated by one optimizer (one DeepSpeed engine). Overrides default to TrainConfig."""

    modules: tuple[str, ...]
    lr_mult: float = 1.0
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


@dataclass
class TrainSpec:
    """What a model stage hands the adapter. All callables are plain PyTorch."""

    build_models: Callable[[TrainConfig], dict[str, nn.Module]]
    optimizers: dict[str, OptimGroup]
    # (ctx, micro-batch on device or None without data, step index) -> scalars to log.
    step: Callable[[TrainContext, dict[str, Any] | None, int], dict[str, float | Tensor]]
    # (modules with EMA weights where kept, n, generator) -> images in [-1, 1], NCHW.
    sample: Callable[[dict[str, nn.Module], int, torch.Generator], Tensor] | None = None
    ema_modules: tuple[str, ...] | None = None  # None: every module an optimizer owns
    export_modules: tuple[str, ...] | None = None  # None: every module an optimizer owns
    collate: Callable[[Batch], dict[str, Any]] | None = None  # default: numeric columns -> tensors
    id_column: str = "row_id"


class Group:
    """One ``OptimGroup`` at run time: one engine over its modules, the same four calls
    (backward_step, lr, save, load) for DeepSpeed and for plain PyTorch (``engines.py``)."""

    box: nn.Module
    norm: Tensor | float | None = None
    calls = 0  # backward_step calls in the current step
    want_norm = False  # measure the grad norm this step (log steps only)

    def backward_step(self, loss: Tensor) -> None: ...
    def lr(self) -> float: ...
    def save(self, path: str, rank: int) -> None: ...
    def load(self, path: str) -> None: ...


class TrainContext:
    """What ``spec.step`` sees. ``models`` are the live modules; call them directly."""

    def __init__(self, cfg: TrainConfig, models: dict[str, nn.Module], ema: dict[str, nn.Module],
                 groups: dict[str, Group], device: torch.device, data: dict[str, Any]):
        self.cfg, self.models, self.ema, self.device, self.data = cfg, models, ema, device, data
        self.rank, self.world_size = rank_world()
        self.step = 0  # optimizer step being computed
        self.micro = 0  # micro-batch index within the step
        self._groups = groups

    def backward_step(self, group: str, loss: Tensor) -> None:
        """Backward ``loss`` into ``group``'s parameters; the optimizer steps on the last micro-batch.

        Call once per micro-batch per group. The loss must reach only this group's
        parameters: wrap losses that pass through another group's modules in ``trainable``.
        """
        if group not in self._groups:
            raise KeyError(f"backward_step: unknown optimizer group {group!r} (groups: {sorted(self._groups)})")
        with torch.autocast(self.device.type, enabled=False):
            self._groups[group].backward_step(loss)

    @contextlib.contextmanager
    def trainable(self, group: str) -> Iterator[None]:
        """Only ``group``'s parameters require grad inside (e.g. the generator loss of a GAN)."""
        frozen = [p for g, grp in self._groups.items() if g != group for p in grp.box.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)
