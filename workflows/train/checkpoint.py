"""Checkpoints: what one holds (engines, EMA, RNG, consumed row ids, history), how every rank
writes and reads its part, and where they live (``Checkpoints``; ``DirCheckpoints`` without Ray).

    engines/{group}/       each optimizer group's engine (DeepSpeed: every rank's shard)
    workers/rng_{r}.pt     worker r's torch/numpy/python (and CUDA) RNG state
    workers/ids_{r}.npy    the row ids worker r consumed in the current epoch
    workers/log_{r}.json   worker r's sums of the scalars logged next (a log window cut by the checkpoint)
    ema.pt                 EMA weights (rank 0)
    metrics.jsonl          the logged history so far (rank 0)
    state.json             step, images, epoch, replay, world_size, train and model config (rank 0)

Restoring with the same number of workers is exact: weights, optimizer and LR-schedule state
(the engines), EMA, every worker's torch/numpy/python/CUDA RNG, and the data position (the
epoch is replayed, ``data.py``) are those of the unbroken run at step N.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.config import to_dict
from pipeline.store import Artifact
from workflows.train.config import TrainConfig
from workflows.train.spec import Group


class Checkpoints(Protocol):
    """Where checkpoints live: Ray Train storage, or a directory in the output artifact."""

    def restore(self) -> ContextManager[str | None]: ...

    def save(self, local_dir: str, step: int, metrics: dict[str, Any]) -> None: ...


class DirCheckpoints:
    """Checkpoints as ``{out}/{prefix}/checkpoint_{step:08d}/`` plus a ``latest.json`` pointer:
    the store of local mode (num_workers=0) and of unit tests. No Ray needed."""

    def __init__(self, out: Artifact, keep: int = 2, prefix: str = "ray_train"):
        self.out, self.keep, self.prefix = out, keep, prefix

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        pointer = f"{self.prefix}/latest.json"
        if not self.out.exists(pointer):
            yield None
            return
        name = f"{self.prefix}/{self.out.read_json(pointer)['checkpoint']}"
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            yield self.out.download_dir(name, tmp)

    def save(self, local_dir: str, step: int, metrics: dict[str, Any]) -> None:
        name = f"checkpoint_{step:08d}"
        self.out.upload_dir(local_dir, prefix=f"{self.prefix}/{name}")
        self.out.write_json(f"{self.prefix}/latest.json", {"checkpoint": name, "step": step, "metrics": metrics})
        done = sorted({n.split("/")[1] for n in self.out.list(subdir=self.prefix) if n.count("/") >= 2})
        for old in [d for d in done if d.startswith("checkpoint_") and d < name][: max(len(done) - self.keep, 0)]:
            self.out.fs.delete_dir(self.out.child(f"{self.prefix}/{old}"))


@dataclass
class State:
    """The loop's position: what a checkpoint restores besides engines, EMA and RNG."""

    step: int = 0
    images: int = 0
    epoch: int = 0
    epoch_ids: list[np.ndarray] = field(default_factory=list)  # this worker's consumed ids, this epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    skip: np.ndarray | None = None  # ids consumed before the restored checkpoint (all workers)
    # This epoch's rows arrive in a reproducible order from its start (it began with this worker
    # count and deterministic data): a resume replays it and drops ``skip`` (data.py).
    replay: bool = True
    log_sums: dict[str, Any] = field(default_factory=dict)  # this worker's scalars since the last log line
    log_steps: int = 0


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The generators a step may draw from: torch's CPU one, numpy's, python's, and the worker's own
    CUDA device's (only its own: reading every visible device's would start a context on each)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, list):  # older checkpoints: every visible device's
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


def save(checkpoints: Checkpoints, st: State, groups: dict[str, Group], ema: dict[str, nn.Module], rank: int,
         cfg: TrainConfig, model_config: dict[str, Any], device: torch.device) -> None:
    """Every rank writes its part into its own local directory; Ray merges them in storage."""
    tmp = tempfile.mkdtemp(prefix="ckpt-")
    try:
        for g, grp in groups.items():
            grp.save(os.path.join(tmp, "engines", g), rank)
        os.makedirs(os.path.join(tmp, "workers"), exist_ok=True)
        torch.save(_rng_state(device), os.path.join(tmp, "workers", f"rng_{rank}.pt"))
        ids = np.concatenate(st.epoch_ids) if st.epoch_ids else np.zeros(0, dtype=np.int64)
        if ids.dtype == object:  # string keys from Arrow: fixed-width unicode saves without pickle
            ids = ids.astype(str)
        np.save(os.path.join(tmp, "workers", f"ids_{rank}.npy"), ids, allow_pickle=False)
        with open(os.path.join(tmp, "workers", f"log_{rank}.json"), "w") as f:  # floats round-trip exactly
            json.dump({"steps": st.log_steps, "sums": {k: float(v) for k, v in st.log_sums.items()}}, f)
        meta = {"step": st.step, "images": st.images, "epoch": st.epoch}
        if rank == 0:
            torch.save({n: e.state_dict() for n, e in ema.items()}, os.path.join(tmp, "ema.pt"))
            with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in st.history)
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({**meta, "replay": st.replay, "world_size": cfg.world_size, "train_config": to_dict(cfg),
                           "model_config": model_config}, f, indent=2, default=str)
        last = st.history[-1] if st.history else {}
        checkpoints.save(tmp, st.step, {**meta, **{k: v for k, v in last.items() if k.startswith("loss")}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str, st: State, groups: dict[str, Group], ema: dict[str, nn.Module], rank: int,
         cfg: TrainConfig, device: torch.device) -> None:
    """Restore engines, EMA, this rank's RNG and ``st`` from the checkpoint at ``path``."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    for g, grp in groups.items():
        grp.load(os.path.join(path, "engines", g))
    saved_ema = torch.load(os.path.join(path, "ema.pt"), map_location="cpu", weights_only=True)
    for n, e in ema.items():
        e.load_state_dict(saved_ema[n])
    same_world = state.get("world_size") == cfg.world_size
    rng = os.path.join(path, "workers", f"rng_{rank}.pt")
    if same_world and os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False), device)  # our own file: numpy/python RNG tuples
        window = os.path.join(path, "workers", f"log_{rank}.json")
        if os.path.exists(window):
            with open(window) as f:
                w = json.load(f)
            st.log_sums, st.log_steps = w["sums"], w["steps"]
    else:  # a different worker count: fresh, but deterministic, noise
        seed_all(state["step"] * 7919 + rank + 1)
    workers = os.path.join(path, "workers")
    ids = {f: np.load(os.path.join(workers, f), allow_pickle=False) for f in sorted(os.listdir(workers))
           if f.startswith("ids_")}
    st.step, st.images, st.epoch = state["step"], state["images"], state["epoch"]
    st.skip = np.unique(np.concatenate(list(ids.values()))) if ids else None
    # Checkpoints from before "replay" was recorded resume the old, balanced but inexact, way.
    st.replay = bool(state.get("replay", False)) and same_world and cfg.deterministic_data
    own = ids.get(f"ids_{rank}.npy")
    if st.replay and own is not None:
        st.epoch_ids = [own] if len(own) else []  # each worker carries its own ids into the next checkpoint
    else:
        st.epoch_ids = [st.skip] if st.skip is not None and rank == 0 else []  # carried once, by rank 0
    with open(os.path.join(path, "metrics.jsonl")) as f:
        st.history = [json.loads(line) for line in f if line.strip()]
