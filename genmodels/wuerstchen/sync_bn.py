"""BatchNorm synchronised across data-parallel workers, on any device.

Würstchen v1 trains the semantic compressor jointly with Stage B under DDP with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` over the whole wrapper (dome272/Wuerstchen,
train_stage_B.py): every BatchNorm normalises with the moments of the *global* batch, so the
running statistics, which define the standardised semantic latent Stage C learns, are the same
on every worker. Without it each worker keeps its own statistics of its own shard and the one
that is exported (rank 0's) saw 1/world of the data.

Why not ``torch.nn.SyncBatchNorm``: its forward refuses CPU tensors ("SyncBatchNorm expected
input tensor to be on GPU", torch 2.14), and the laptop path and the 2-worker tests run on
gloo/CPU. ``SyncBatchNorm2d`` computes the same thing with one differentiable all-reduce of the
batch moments per layer (``torch.distributed.nn.functional.all_reduce``: its backward all-reduces
the gradient, which is SyncBatchNorm's backward), on CPU and GPU alike. It subclasses
``nn.BatchNorm2d`` with the same parameters and buffers, so state dicts load either way, and it
behaves exactly as ``nn.BatchNorm2d`` in eval mode or without a process group of size > 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode moments are those of the batch over all workers."""

    process_group = None  # None: the default (world) group

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _world(self.process_group) > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        # Shifted sums (shift = the running mean, identical on every worker and detached) keep
        # E[d^2] - E[d]^2 well conditioned when |mean| >> std; one all-reduce carries both moments
        # and the element count.
        shift = self.running_mean.detach().float() if self.track_running_stats else xf.new_zeros(c)
        d = xf - shift.view(1, c, 1, 1)
        n_local = xf.new_full((1,), x.numel() // c)
        stats = all_reduce(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), n_local]), group=self.process_group)
        n = stats[-1]
        mean_d = stats[:c] / n
        var = (stats[c:2 * c] / n - mean_d * mean_d).clamp_min(0)  # biased, as BatchNorm normalises
        mean = mean_d + shift
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)  # as nn.BatchNorm2d records it
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, c, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``module`` (in place) becomes a ``SyncBatchNorm2d`` with the same
    parameters and buffers, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for DDP."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats, device="meta",
                                   bias=child.bias is not None)
            # The same tensors, not copies (as torch's converter): device, dtype, requires_grad kept.
            for k, v in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(sync, k, v)
            sync.train(child.training)
            sync.process_group = process_group
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, process_group)
    return module
