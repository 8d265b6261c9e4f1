"""The worker of test_wuerstchen_fidelity's two-process BatchNorm test, in a module of its own so
that ``torch.multiprocessing.spawn`` children import only this (and torch, genmodels), not the test
module with its transformers / Ray imports."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from genmodels.wuerstchen.compressor import SemanticCompressor
from genmodels.wuerstchen.sync_bn import convert_sync_batchnorm


def images(rank: int) -> torch.Tensor:
    """This rank's batch: its own images, shifted by the rank so the workers' moments differ."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + rank)) * 2 - 1 + rank


def bn_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One data-parallel training step of the tiny compressor (synchronised BN) on this rank's images."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        comp = convert_sync_batchnorm(SemanticCompressor()).train()
        y = comp(images(rank))
        loss = y.square().mean() + y[:, 0].mean()
        loss.backward()
        for p in comp.parameters():  # average the gradients, then one SGD step
            dist.all_reduce(p.grad)
            p.grad /= world
        with torch.no_grad():
            for p in comp.parameters():
                p -= 0.1 * p.grad
        torch.save({"state": comp.state_dict(), "loss": loss.detach()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
