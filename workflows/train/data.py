"""Training data: exact-size micro-batches, the resume filter, lock-step epochs, collation.

Data resume. Every training row carries a stable id (``spec.id_column``). A checkpoint at
step N stores, per worker, the ids that worker consumed in the current epoch. On restore
with the same number of workers the epoch is *replayed*: each worker reads its part of the
epoch again in the same order (Ray Data with ``preserve_order`` and the same local-shuffle
seed; any in-process source that is a function of the epoch) and drops the ids already
trained on, which are exactly the first rows it reads. The rows after them, their batching
and their shuffle are then those of the unbroken run, so a resumed run matches it exactly.
Dropping by id rather than by count keeps the guarantee that no row is trained on twice in
an epoch even if a source's order is not reproducible (a warning says so). Where the epoch
cannot be replayed (another worker count, ``deterministic_data=False``) the union of the
consumed ids goes to the source, which drops them before sharding so that workers stay
balanced (the Ray adapter filters the dataset and splits the remainder equally,
``ray_adapter._remaining``), and the loop drops them again from whatever arrives: correct,
not exact. Later epochs use the source's own split. Rows trained on after the last
checkpoint and before a failure are trained on again, like the steps they belong to. An
epoch ends for all workers together when any worker cannot fill a step (a CPU all-reduce
per step).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflows.train.config import TrainConfig
from workflows.train.distributed import all_true
from workflows.train.spec import Batch

log = logging.getLogger("genmodels.train")

# data(epoch, skip) -> this worker's numpy batches (any size) for one epoch. skip None: the whole
# epoch, in an order that depends only on (epoch, worker), if the source can (a resume replays it).
# skip given (ids already trained on in this epoch): drop them before sharding so workers stay
# balanced; the loop drops them again, so a source that ignores it is still correct.
DataFn = Callable[[int, "np.ndarray | None"], Iterable[Batch]]


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def drop_ids(batch: Batch, skip: np.ndarray, id_col: str) -> Batch:
    """The rows of ``batch`` whose id is not in ``skip`` (the batch itself when none is)."""
    keep = ~np.isin(batch[id_col], skip)
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def drop_consumed(batches: Iterable[Batch], skip: np.ndarray | None, id_col: str,
                  replay: bool = False) -> Iterator[Batch]:
    """``batches`` without the ``skip`` ids and without empty batches; every batch must carry ``id_col``.

    ``replay``: ``batches`` replay an epoch from its start, so the ``skip`` ids should all come
    before the first row that is kept; a warning says when they do not (the order changed).
    """
    kept = warned = False
    for b in batches:
        if id_col not in b:
            raise KeyError(f"training data needs a stable id column {id_col!r} for exact resume "
                           f"(columns: {sorted(b)}); set TrainSpec.id_column")
        if skip is not None and len(skip):
            keep = ~np.isin(b[id_col], skip)
            first = int(keep.argmax()) if keep.any() else len(keep)  # the first row kept
            if replay and not warned and (kept and not keep.all() or not keep[first:].all()):
                warned = True
                log.warning("resume: rows trained on before the checkpoint arrive after new ones, so this "
                            "worker's data order differs from the interrupted run's: the resumed run trains on "
                            "no row twice but will not match an unbroken run exactly")
            kept = kept or bool(keep.any())
            b = b if keep.all() else {k: v[keep] for k, v in b.items()}
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
                group: Any = None, replay: bool = False) -> Iterator[tuple[int, list[Batch]]]:
    """(epoch, grad_accum micro-batches) forever; ``skip`` ids are dropped from the first epoch.

    ``replay``: the source reads the first epoch whole (``data(epoch, None)``) and the loop drops
    ``skip`` from it; otherwise the source gets ``skip`` to drop before sharding.
    """
    while True:
        source = iter(data(epoch, None if replay else skip))
        n = 0
        try:
            micro = rebatch(drop_consumed(source, skip, id_col, replay), cfg.batch_size)
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
