"""A tiny synthetic task for the adapter's tests and benchmark: denoise low-rank 8x8 images.

Rows are a pure function of ``row_id``, so a Ray Dataset (``dataset``) and an in-process
numpy source (``numpy_source``) hold the same data. ``spec(two_groups=True)`` adds a small
critic trained adversarially against the denoiser (a second optimizer group, as in PaGoDA).
Test hooks: ``record_dir`` appends every micro-batch's ids and, per step, a parameter checksum
and the process id per worker; ``fail_at_step`` raises once on ``fail_rank`` while ``fail_flag`` (a file) exists;
``collate=noisy_collate`` draws from numpy's and python's global RNGs; ``numpy_source(...,
shuffle_buffer=n)`` reads through a local shuffle buffer, as the Ray adapter does.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workflows.train.config import TrainConfig
from workflows.train.data import default_collate
from workflows.train.spec import OptimGroup, TrainContext, TrainSpec

SIGMA = 0.5  # noise level of the denoising task


def rows_for_ids(ids: np.ndarray, image_size: int = 8, rank: int = 4) -> dict[str, np.ndarray]:
    """Images = tanh(coefficients(id) . fixed basis): learnable, and identical everywhere."""
    basis = np.random.default_rng(1234).standard_normal((rank, 3, image_size, image_size)).astype(np.float32)
    coef = np.stack([np.random.default_rng(int(i)).uniform(-1, 1, rank) for i in ids]).astype(np.float32)
    images = np.tanh(0.7 * np.einsum("nr,rchw->nchw", coef, basis))
    return {"row_id": np.asarray(ids, dtype=np.int64), "image": images.astype(np.float32)}


def local_shuffle(batches: Iterable[dict[str, np.ndarray]], buffer: int, batch_size: int,
                  rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Batches drawn at random from a buffer of at least ``buffer`` rows, refilled as it drains, as
    Ray Data's local shuffle does: where a row lands depends on every row read before it."""
    buf: dict[str, np.ndarray] | None = None
    for b in batches:
        buf = b if buf is None else {k: np.concatenate([buf[k], b[k]]) for k in buf}
        while len(buf["row_id"]) >= max(buffer, batch_size):
            take = np.zeros(len(buf["row_id"]), dtype=bool)
            take[rng.choice(len(take), batch_size, replace=False)] = True
            yield {k: v[take] for k, v in buf.items()}
            buf = {k: v[~take] for k, v in buf.items()}
    if buf is not None:
        order = rng.permutation(len(buf["row_id"]))
        for i in range(0, len(order), batch_size):
            yield {k: v[order[i:i + batch_size]] for k, v in buf.items()}


def numpy_source(n_rows: int, batch_size: int, shuffle_seed: int | None = 0, image_size: int = 8,
                 shuffle_buffer: int = 0) -> Callable[..., Iterator[dict[str, np.ndarray]]]:
    """``data(epoch, skip)`` for ``loop.run`` without Ray: a seeded permutation per epoch, then
    (``shuffle_buffer`` > 0) a local shuffle buffer reseeded per epoch, as the Ray adapter reads.
    Without a buffer it ignores ``skip``, so tests exercise the loop's own filtering; with one it
    drops ``skip`` before the buffer, as ``ray_adapter._remaining`` does."""
    rows = rows_for_ids(np.arange(n_rows), image_size)

    def data(epoch: int, skip: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
        order = np.arange(n_rows)
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed + epoch).permutation(n_rows)
        if shuffle_buffer and skip is not None:
            order = order[~np.isin(order, skip)]
        batches = ({k: v[order[i:i + batch_size]] for k, v in rows.items()} for i in range(0, len(order), batch_size))
        if shuffle_buffer:
            batches = local_shuffle(batches, shuffle_buffer, batch_size, np.random.default_rng([epoch, 1000]))
        yield from batches

    return data


def dataset(n_rows: int, blocks: int = 4, image_size: int = 8):
    """The same rows as a Ray Dataset (columns row_id, image)."""
    import ray.data

    return ray.data.range(n_rows, override_num_blocks=blocks).map_batches(
        lambda b: rows_for_ids(b["id"], image_size), batch_format="numpy")


class Denoiser(nn.Module):
    def __init__(self, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class Critic(nn.Module):
    def __init__(self, channels: int = 16, image_size: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
                                 nn.Linear(channels * (image_size // 2) ** 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def noisy_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """As PaGoDA's pair_collate: a random flip from numpy's global RNG (and a scale from python's),
    so that resume tests cover every global generator a step may draw from."""
    out = default_collate(batch)
    flip = torch.from_numpy(np.random.rand(len(out["image"])) < 0.5)[:, None, None, None]
    out["image"] = torch.where(flip, out["image"].flip(-1), out["image"]) * random.uniform(0.8, 1.0)
    return out


def param_checksum(module: nn.Module) -> float:
    """Sum of this worker's parameter values: its ZeRO-3 partition when partitioned, without the
    padding that rounds the last rank's partition up (uninitialised memory after a restore)."""
    total = 0.0
    for p in module.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is None:
            total += float(p.detach().double().sum())
            continue
        size = part.numel()
        start = torch.distributed.get_rank() * size
        total += float(part.detach().flatten()[: max(0, min(size, p.ds_numel - start))].double().sum())
    return total


def spec(channels: int = 32, two_groups: bool = False, adv_weight: float = 0.05, record_dir: str | None = None,
         fail_at_step: int | None = None, fail_flag: str | None = None, fail_rank: int = 1,
         collate: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None) -> TrainSpec:
    def build_models(cfg: TrainConfig) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"denoiser": Denoiser(channels)}
        if two_groups:
            models["critic"] = Critic()
        return models

    def step(ctx: TrainContext, batch: dict[str, Any] | None, step: int) -> dict[str, Any]:
        if fail_at_step is not None and step == fail_at_step and ctx.rank == fail_rank and ctx.micro == 0 \
                and fail_flag and os.path.exists(fail_flag):
            os.remove(fail_flag)
            raise RuntimeError(f"injected failure at step {step}")
        if record_dir:
            rec = {"step": step, "micro": ctx.micro, "ids": batch["row_id"].tolist()}
            if ctx.micro == 0:  # the weights every worker starts this step from
                rec["checksum"] = param_checksum(ctx.models["denoiser"])
                rec["pid"] = os.getpid()
            with open(os.path.join(record_dir, f"rank{ctx.rank}.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        x = batch["image"]
        den = ctx.models["denoiser"](x + SIGMA * torch.randn_like(x))
        mse = F.mse_loss(den, x)
        out = {"loss": mse.detach()}
        if not two_groups:
            ctx.backward_step("denoiser", mse)
            return out
        critic = ctx.models["critic"]
        with ctx.trainable("denoiser"):
            adv = (critic(den) - 1).pow(2).mean()  # least-squares GAN, generator side
        ctx.backward_step("denoiser", mse + adv_weight * adv)
        lc = (critic(x) - 1).pow(2).mean() + critic(den.detach()).pow(2).mean()
        ctx.backward_step("critic", lc)
        out.update(loss_adv=adv.detach(), loss_critic=lc.detach())
        return out

    def sample(models: dict[str, nn.Module], n: int, generator: torch.Generator) -> Tensor:
        device = next(models["denoiser"].parameters()).device
        x = torch.randn(n, 3, 8, 8, generator=generator, device=device)
        return models["denoiser"](x).clamp(-1, 1)

    groups = {"denoiser": OptimGroup(("denoiser",))}
    if two_groups:
        groups["critic"] = OptimGroup(("critic",), lr_mult=0.5, betas=(0.5, 0.99))
    return TrainSpec(build_models=build_models, optimizers=groups, step=step, sample=sample, collate=collate)
