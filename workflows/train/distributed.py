"""Process group and collectives: rank/world, a one-process group for DeepSpeed, CPU bookkeeping
all-reduces, and full parameters of ZeRO-3 partitioned modules. DeepSpeed is imported here only."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workflows.train.config import TrainConfig


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def import_deepspeed():
    import deepspeed

    # The CPU accelerator compiles a shared-memory comm op on every initialize (about a
    # minute, cold) that training does not use. Patch the module DeepSpeed itself imports.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


@contextlib.contextmanager
def process_group(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """A one-process group for DeepSpeed when nobody (Ray Train, torchrun) made one."""
    if dist.is_initialized() or cfg.engine == "torch":
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the whole run: DeepSpeed reads LOCAL_RANK again in initialize()
    try:
        import_deepspeed().init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                             auto_mpi_discovery=False, verbose=False)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed caches groups cloned from the world group; a later run in this process
        # (tests, notebooks) must not find the destroyed ones.
        groups = importlib.import_module("deepspeed.utils.groups")
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
            if hasattr(groups, name):
                setattr(groups, name, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def control_group() -> Any:
    """CPU collectives for bookkeeping: a gloo group beside NCCL, so that agreeing on a flag
    never waits for the GPU stream (None: the default group is gloo already)."""
    if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
        return dist.new_group(backend="gloo")  # collective: every rank calls it at the same point
    return None


def all_true(flag: bool, group: Any = None) -> bool:
    """``flag`` on every rank (a collective)."""
    _, world = rank_world()
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def reduce_mean(values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Scalars averaged over the workers (a collective)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device) for k in keys])
    _, world = rank_world()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return dict(zip(keys, t.tolist()))


def gathered(module: nn.Module) -> ContextManager[Any]:
    """Full parameters of a ZeRO-3 partitioned module on every rank (a collective)."""
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):
        return import_deepspeed().zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
