"""TrainConfig: the section every training stage embeds (``train: TrainConfig``).

Defaults run on a laptop CPU in one process. Counting is in optimizer steps; one step is
``grad_accum`` micro-batches of ``batch_size`` rows on each of ``num_workers`` workers, so
``global_batch = batch_size * grad_accum * max(num_workers, 1)`` images per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pipeline.config import check


@dataclass(frozen=True)
class TrainConfig:
    # Cluster shape. num_workers=0: Ray Train's local mode, one process (a Ray task when Ray is up).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only read when use_gpu
    # Ray Train's placement of the workers: PACK fills a multi-GPU node first (NVLink all-reduce);
    # STRICT_SPREAD puts each worker on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # "deepspeed": one DeepSpeed engine per optimizer group; "torch": plain loss.backward() and
    # optimizer.step() (gradients all-reduced by hand across workers), for debugging.
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: int = 0  # 0-3; 2 is the usual multi-GPU choice, 3 when the model does not fit
    offload: bool = False  # ZeRO-Offload of optimizer state (and parameters at stage 3) to CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # Optimization (LR warms up linearly, then stays or decays to 0 by cosine). AdamW by default;
    # "radam" is what PaGoDA's official code trains with (cm/train_util.py: RAdam, no clipping,
    # so set grad_clip: 0 with it to match).
    optimizer: Literal["adamw", "radam"] = "adamw"
    batch_size: int = 8  # per worker micro-batch
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    lr: float = 1e-4
    weight_decay: float = 0.0  # applied to >=2-D weights only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    total_steps: int = 1000
    total_images: int = 0  # > 0 replaces total_steps: ceil(total_images / global_batch) steps
    shuffle_buffer: int = 0  # rows in Ray Data's local shuffle buffer (reseeded every epoch)
    # Ray Data delivers the training rows in the same order every run (preserve_order; no
    # locality-aware split), so a resumed run replays its epoch and matches an unbroken run
    # exactly. False: out-of-order blocks, locality hints; resume then stays correct, not exact.
    deterministic_data: bool = True
    # Bookkeeping, in steps; 0 means "only at the end".
    log_every: int = 10
    preview_every: int = 0
    preview_images: int = 16
    ckpt_every: int = 500
    ckpt_keep: int = 2
    ema_decay: float = 0.999
    ema_start: int = 0  # EMA copies the weights until this step, then averages
    activation_checkpointing: bool = False  # read by the stage's model factory
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    seed: int = 0

    def validate(self) -> None:
        """Messages start with the key so that ``config.build`` can prefix the section."""
        checks = [
            ("num_workers", self.num_workers >= 0, "must be >= 0"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("gpus_per_worker", self.gpus_per_worker > 0, "must be > 0"),
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), f"expected 0-3, got {self.zero_stage}"),
            ("offload", not self.offload or (self.engine == "deepspeed" and self.zero_stage >= 1),
             "needs engine=deepspeed and zero_stage >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("lr", self.lr > 0, "must be > 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "expected two values in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("total_steps", self.total_steps >= 1 or self.total_images > 0, "must be >= 1 (or set total_images)"),
            ("total_images", self.total_images >= 0, "must be >= 0"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("preview_every", self.preview_every >= 0, "must be >= 0"),
            ("ckpt_every", self.ckpt_every >= 0, "must be >= 0"),
            ("ckpt_keep", self.ckpt_keep >= 1, "must be >= 1"),
            ("ema_decay", 0 <= self.ema_decay < 1, "expected a value in [0, 1)"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1: unlimited)"),
        ]
        check(checks)

    @property
    def world_size(self) -> int:
        return max(self.num_workers, 1)

    @property
    def worker_resources(self) -> dict[str, float]:
        """What one Ray Train worker holds."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps(self) -> int:
        if self.total_images > 0:
            return math.ceil(self.total_images / self.global_batch)
        return self.total_steps

    def bf16(self, on_gpu: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and on_gpu)

    def lr_factor(self, step: int) -> float:
        """LR multiplier after ``step`` optimizer steps: linear warmup, then constant or cosine to 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(self.steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))
