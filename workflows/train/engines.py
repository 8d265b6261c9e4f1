"""Optimizer groups: one engine per group of modules, the same four calls (backward_step, lr,
save, load) for DeepSpeed and for plain PyTorch, so the loop never special-cases either."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from workflows.train.config import TrainConfig
from workflows.train.distributed import import_deepspeed, rank_world
from workflows.train.spec import Group, OptimGroup


class Box(nn.ModuleDict):
    """Container handed to DeepSpeed. Its forward is the identity on the loss: DeepSpeed 0.19
    starts its backward (ZeRO boundary flags, reduction state) from hooks that engine.forward
    puts on the outputs, so the loss must pass through the engine once before backward."""

    def forward(self, loss: Tensor) -> Tensor:
        return loss


def _param_groups(box: nn.Module, cfg: TrainConfig, og: OptimGroup) -> list[dict[str, Any]]:
    params = [p for p in box.parameters() if p.requires_grad]
    wd = cfg.weight_decay if og.weight_decay is None else og.weight_decay
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]  # biases and norm gains are not decayed
    return [g for g in ({"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


def _optimizer(box: nn.Module, cfg: TrainConfig, og: OptimGroup) -> torch.optim.Optimizer:
    # torch's optimizers: DeepSpeed's fused/CPU Adam compile C++ on first use (minutes, cold).
    kw = {"lr": cfg.lr * og.lr_mult, "betas": og.betas or cfg.betas, "eps": cfg.eps}
    if cfg.optimizer == "radam":  # weight decay decoupled, as AdamW's, so that weight_decay means one thing
        return torch.optim.RAdam(_param_groups(box, cfg, og), decoupled_weight_decay=True, **kw)
    return torch.optim.AdamW(_param_groups(box, cfg, og), **kw)


def _schedule(cfg: TrainConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_factor(s))


class TorchGroup(Group):
    """loss.backward() + the optimizer (AdamW or RAdam); gradients averaged across workers by hand."""

    def __init__(self, box: Box, cfg: TrainConfig, og: OptimGroup):
        self.box, self.cfg = box, cfg
        self.opt = _optimizer(box, cfg, og)
        self.sched = _schedule(cfg)(self.opt)
        self.micro = 0
        self.params = [p for p in box.parameters() if p.requires_grad]

    def backward_step(self, loss: Tensor) -> None:
        self.calls += 1
        (loss / self.cfg.grad_accum).backward()
        self.micro += 1
        if self.micro % self.cfg.grad_accum:
            return
        _, world = rank_world()
        if world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, path: str, rank: int) -> None:
        if rank == 0:  # replicated state: one copy
            os.makedirs(path, exist_ok=True)
            torch.save({"modules": self.box.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "micro": self.micro}, os.path.join(path, "state.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "state.pt"), map_location=next(self.box.parameters()).device,
                           weights_only=True)
        self.box.load_state_dict(state["modules"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


def ds_config(cfg: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config of one engine. Precision is torch.autocast around the step (fp32 master
    weights, identical in both engines), so no fp16/bf16 section."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW / RAdam as client optimizer
        "zero_force_ds_cpu_optimizer": False,  # and with offload, too
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedGroup(Group):
    def __init__(self, box: Box, cfg: TrainConfig, og: OptimGroup, on_gpu: bool):
        deepspeed = import_deepspeed()
        self.cfg = cfg
        self.box = box
        self.engine, *_ = deepspeed.initialize(model=box, optimizer=_optimizer(box, cfg, og),
                                               lr_scheduler=_schedule(cfg), config=ds_config(cfg, on_gpu),
                                               dist_init_required=False)

    def backward_step(self, loss: Tensor) -> None:
        self.calls += 1
        loss = self.engine(loss)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()  # changes only inside engine.step()
        if self.cfg.zero_stage == 0 and self.want_norm and boundary:
            # ZeRO 1-3 report the norm they clip with; stage 0 does not, so measure it (grads are
            # already averaged across workers here).
            grads = [p.grad for p in self.box.parameters() if p.grad is not None]
            norms = [torch.linalg.vector_norm(g) for g in grads]
            self.norm = torch.linalg.vector_norm(torch.stack(norms)) if grads else None
        self.engine.step()
        if boundary and self.cfg.zero_stage > 0:
            self.norm = self.engine.get_global_grad_norm()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, path: str, rank: int) -> None:
        self.engine.save_checkpoint(path, tag="ds", save_latest=False)  # every rank, or it hangs

    def load(self, path: str) -> None:
        loaded = None
        if os.path.isdir(os.path.join(path, "ds")):  # else DeepSpeed asserts deep inside
            loaded, _ = self.engine.load_checkpoint(path, tag="ds")
        if loaded is None:  # DeepSpeed may also return (None, None) instead of raising
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
