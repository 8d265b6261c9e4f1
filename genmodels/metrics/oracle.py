"""A judge that knows the ground truth: a small classifier for synthetic scenes whose labels are known.

Random feature nets make Fréchet distance and precision/recall meaningless on a laptop (no Inception
or DINOv2 weights offline). When the data are generated, as the demo's shape scenes are, the labels
make a real judge possible: :class:`SceneOracle` predicts, per image, one class for each labelled
attribute (the main object's colour and shape, the background colour). Its accuracy on held-out
real images says how far to trust it; on generated images it grades prompt following (the predicted
attribute against the one the prompt names), and its penultimate features give a Fréchet distance
that means something at this scale (Heusel et al. 2017, Eq. 6, on these features instead of Inception's).

Every image is resized to ``size`` first, so one oracle judges generators of any resolution; training
degrades a share of the images to half and quarter resolution so that a 16 px sample is judged as
what it shows, not as blur.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class OracleConfig:
    """size: input side (every image is resized to it); width: channels of the first block (x2, x4, x8 after)."""

    size: int = 32
    width: int = 16


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(8, c_out), nn.SiLU())


class SceneOracle(nn.Module):
    """Conv trunk (size -> size/8) + mean and max pool -> (N, 16 * width) features; one linear head
    per attribute."""

    def __init__(self, classes: Mapping[str, int], cfg: OracleConfig = OracleConfig()):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        # Full resolution only for the first block: the classes are colours and coarse outlines.
        self.trunk = nn.Sequential(_block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                   _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 8 * w, 2))
        self.heads = nn.ModuleDict({name: nn.Linear(16 * w, n) for name, n in classes.items()})

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] at any H = W -> (N, 16 * width) penultimate features."""
        x = images.float()
        if x.shape[-1] != self.cfg.size or x.shape[-2] != self.cfg.size:
            x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="bilinear", align_corners=False,
                              antialias=True)
        h = self.trunk(x)
        # Mean and max over positions: the object is a small part of the frame, and a plain mean
        # drowns its outline in the background.
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> tuple[dict[str, Tensor], Tensor]:
        """({attribute: predicted class (N,)}, features (N, F)) in eval mode, in batches."""
        was = self.training
        self.eval()
        preds: dict[str, list[Tensor]] = {k: [] for k in self.heads}
        feats = []
        for chunk in images.split(batch_size):
            f = self.features(chunk)
            feats.append(f)
            for k, head in self.heads.items():
                preds[k].append(head(f).argmax(-1))
        self.train(was)
        return {k: torch.cat(v) for k, v in preds.items()}, torch.cat(feats)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Label-preserving views of a batch: flips and quarter turns (colour and shape classes are
    invariant), and for a third of the images a round trip through half or quarter resolution
    (samples of the low-resolution generators look like that). Arbitrary rotations and rescaling
    were tried and slowed learning the shapes more than they helped it generalise."""
    n = x.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    flip_v = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if torch.rand((), generator=generator) < 0.5:
        x = x.transpose(-1, -2)
    side = x.shape[-1]
    degrade = torch.rand(n, generator=generator)
    for lo, hi, factor in ((0.0, 1 / 6, 2), (1 / 6, 1 / 3, 4)):
        pick = (degrade >= lo) & (degrade < hi)
        if pick.any() and side // factor >= 4:
            small = F.interpolate(x[pick], size=side // factor, mode="bilinear", antialias=True, align_corners=False)
            x[pick] = F.interpolate(small, size=side, mode="bilinear", align_corners=False)
    return x


def recolour(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image's channels permuted at random and, for half, negated: colours scrambled, outlines kept."""
    n = x.shape[0]
    perm = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    return x * sign[:, None, None, None]


def fit(model: SceneOracle, images: Tensor, targets: Mapping[str, Tensor], *, steps: int, batch_size: int,
        lr: float, seed: int, colour_blind: tuple[str, ...] = ()) -> list[float]:
    """Train every head with summed cross-entropy (AdamW, one-cycle); ``targets[k][i] = -1`` means
    image i has no label for k (ignored). Images are resized once to the oracle's size. Returns the loss
    per step.

    ``colour_blind`` heads (e.g. shape) learn from a second, recoloured view of the batch
    (:func:`recolour`): with a few hundred images, each (colour, background) pair is nearly unique,
    so a head shown true colours memorises the pair instead of learning the outline."""
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.size
    x_all = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        logits = model(augment(x_all[idx].clone(), g))
        if colour_blind:
            blind = model(recolour(augment(x_all[idx].clone(), g), g))
            logits = {k: blind[k] if k in colour_blind else v for k, v in logits.items()}
        loss = sum(F.cross_entropy(logits[k], targets[k][idx], ignore_index=-1)
                   for k in model.heads if (targets[k][idx] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Share of labelled items (target >= 0) predicted right; NaN when none is labelled."""
    known = target >= 0
    return float((pred[known] == target[known]).float().mean()) if known.any() else float("nan")
