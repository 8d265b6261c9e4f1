"""Training data: exact-size micro-batches, the resume filter, lock-step epochs, collation.

Data resume. Every training row carries a stable id (``spec.id_column``). A checkpoint at
step N stores, per worker, the ids that worker consumed in the current epoch. On restore
the union of those ids is dropped from the rest of that epoch: the Ray adapter filters the
dataset and splits the remainder equally over the workers (``ray_adapter._remaining``), and
the loop drops them again from whatever arrives, so no row is trained on twice in an epoch
whatever order Ray Data delivers, however blocks are laid out, however many workers read.
Later epochs use Ray Train's own split. Rows trained on after the last checkpoint and
before a failure are trained on again, like the steps they belong to. An epoch ends for
all workers together when any worker cannot fill another step (a CPU all-reduce per step).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflows.train.config import TrainConfig
from workflows.train.distributed import all_true
from workflows.train.spec import Batch

# data(epoch, skip) -> this worker's numpy batches (any size) for one epoch. ``skip`` (ids already
# trained on in this epoch, or None) should be dropped before sharding so workers stay balanced;
# the loop drops them again, so a source that ignores it is still exact.
DataFn = Callable[[int, "np.ndarray | None"], Iterable[Batch]]


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def drop_ids(batch: Batch, skip: np.ndarray, id_col: str) -> Batch:
    """The rows of ``batch`` whose id is not in ``skip`` (the batch itself when none is)."""
    keep = ~np.isin(batch[id_col], skip)
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def drop_consumed(batches: Iterable[Batch], skip: np.ndarray | None, id_col: str) -> Iterator[Batch]:
    """``batches`` without the ``skip`` ids and without empty batches; every batch must carry ``id_col``."""
    for b in batches:
        if id_col not in b:
            raise KeyError(f"training data needs a stable id column {id_col!r} for exact resume "
                           f"(columns: {sorted(b)}); set TrainSpec.id_column")
        if skip is not None and len(skip):
            b = drop_ids(b, skip, id_col)
        if _rows(b):
            yield b


def rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Exactly ``size`` rows per batch whatever the source delivers; a short tail is dropped."""
    buf: list[Batch] = []
    n = 0
    for b in batches:
        if not buf and _rows(b) == size:
            yield b
            continue
        buf.append(b)
        n += _rows(b)
        while n >= size:
            cat = buf[0] if len(buf) == 1 else {k: np.concatenate([x[k] for x in buf]) for k in buf[0]}
            yield {k: v[:size] for k, v in cat.items()}
            n -= size
            buf = [{k: v[size:] for k, v in cat.items()}] if n else []


def step_stream(data: DataFn, cfg: TrainConfig, epoch: int, skip: np.ndarray | None, id_col: str,
                group: Any = None) -> Iterator[tuple[int, list[Batch]]]:
    """(epoch, grad_accum micro-batches) forever; ``skip`` ids are dropped from the first epoch."""
    while True:
        source = iter(data(epoch, skip))
        n = 0
        try:
            micro = rebatch(drop_consumed(source, skip, id_col), cfg.batch_size)
            while True:
                step = list(itertools.islice(micro, cfg.grad_accum))
                if not all_true(len(step) == cfg.grad_accum, group):
                    break
                n += 1
                yield epoch, step
        finally:
            close = getattr(source, "close", None)
            if close:  # an early stop must release Ray's split coordinator for the next epoch
                close()
        if n == 0 and skip is None:  # a resumed epoch may legitimately have no full step left
            raise RuntimeError(f"epoch {epoch} had no complete step: a step needs {cfg.global_batch} rows "
                               f"({cfg.batch_size} x {cfg.grad_accum} on each of {cfg.world_size} workers)")
        epoch, skip = epoch + 1, None


def default_collate(batch: Batch) -> dict[str, Any]:
    """Numeric columns become tensors; others (captions, keys) stay numpy arrays."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if v.dtype.kind in "biuf":
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
        else:
            out[k] = v
    return out


def to_device(v: Any, device: torch.device) -> Any:
    if not isinstance(v, Tensor) or v.device == device:
        return v
    if device.type == "cuda" and v.device.type == "cpu":
        v = v.pin_memory()  # a copy from pageable memory would wait for the GPU stream
    return v.to(device, non_blocking=True)
