"""A judge that knows the ground truth: a small classifier for synthetic scenes whose labels are known.

Random feature nets make Fréchet distance and precision/recall meaningless on a laptop (no Inception
or DINOv2 weights offline). When the data are generated, as the demo's shape scenes are, the labels
make a real judge possible: :class:`SceneOracle` predicts, per image, one class for each labelled
attribute (the main object's colour and shape, the background colour). Its accuracy on held-out
real images says how far to trust it; on generated images it grades prompt following (the predicted
attribute against the one the prompt names), and its penultimate features give a Fréchet distance
that means something at this scale (Heusel et al. 2017, Eq. 6, on these features instead of Inception's).

A few hundred labelled images are too few for a plain RGB network to learn nine rotated outlines: with
each (colour, background) pair nearly unique it memorises the pair instead (0.48 held-out shape accuracy).
So the scene is split the way it is drawn, one object on a plain background:

- :func:`foreground`: every pixel's distance from the background colour (the median of the border),
  over the image's largest distance: a map in [0, 1] that no recolouring of the scene changes;
- :func:`object_frame` / :func:`canonical`: the map cropped around its centroid and scaled by its
  spread (image moments, Hu 1962), so that the shape trunk sees every object at one position and size
  (a spatial transformer's job, Jaderberg et al. 2015, done by construction); training draws random
  rotations, flips and small scale / shift errors of that crop, the only variation left to learn;
- :func:`colour_statistics`: the border colour and the foreground-weighted mean colours, from which a
  small MLP learns the colour classes (no palette is written here: the classes come from the labels).

Heads named in ``colour_blind`` (shape) read the map's trunk only; the others read the colour MLP.
Every image is resized to ``size`` first, so one oracle judges generators of any resolution; training
also sees each image after a round trip through half and quarter resolution, so that a 16 px sample is
judged as what it shows, not as blur, and each of those under pixel noise, as a sampler leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class OracleConfig:
    """size: input side (every image is resized to it); patch: side of the object-centred crop of the
    foreground map; width: channels of the map trunk's first block (x2, x4 after); hidden: the colour
    MLP's width; span: half the crop's side in units of the object's spread (its RMS radius)."""

    size: int = 64
    patch: int = 24
    width: int = 16
    hidden: int = 64
    span: float = 2.4


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(8, c_out), nn.SiLU())


def _border(x: Tensor, width: int) -> Tensor:
    """(N, C, H, W) -> (N, C, K): the outer ``width`` pixels of every channel."""
    n, c = x.shape[:2]
    return torch.cat([x[..., :width, :].reshape(n, c, -1), x[..., -width:, :].reshape(n, c, -1),
                      x[..., :, :width].reshape(n, c, -1), x[..., :, -width:].reshape(n, c, -1)], dim=2)


def border_colour(x: Tensor, width: int = 2) -> Tensor:
    """(N, 3, H, W) -> (N, 3): the per-channel median of the outer ``width`` pixels (the background
    where the object stays inside the frame, as the scenes' objects do; robust to one that touches it)."""
    return _border(x, width).median(dim=2).values


def foreground(x: Tensor, bg: Tensor | None = None) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) in [0, 1]: Euclidean RGB distance from the border colour, from the
    border's own 90th percentile (the background's noise: a generator's samples are not plain) up to the
    image's largest distance. A permutation or negation of the channels leaves it unchanged."""
    bg = border_colour(x) if bg is None else bg
    d = (x - bg[:, :, None, None]).square().sum(1, keepdim=True).sqrt()
    floor = _border(d, 2).quantile(0.9, dim=2)[:, :, None, None]
    top = d.flatten(1).amax(1)[:, None, None, None]
    span = (top - floor).clamp_min(0.1)  # a blank image stays a near-zero map, not amplified noise
    return ((d - floor) / span).clamp(0, 1)


def object_frame(m: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground maps (N, 1, H, W) -> centroid (N, 2) as (x, y) and RMS radius (N,) around it, in
    ``grid_sample`` coordinates ([-1, 1] across the image): the first and second image moments."""
    h, w = m.shape[-2:]
    ys = torch.linspace(-1, 1, h, dtype=m.dtype)[:, None].expand(h, w)
    xs = torch.linspace(-1, 1, w, dtype=m.dtype)[None, :].expand(h, w)
    wgt = m[:, 0].square()  # squared: faint anti-aliasing and noise weigh little
    mass = wgt.sum((1, 2)).clamp_min(1e-6)
    cx, cy = (wgt * xs).sum((1, 2)) / mass, (wgt * ys).sum((1, 2)) / mass
    var = (wgt * ((xs - cx[:, None, None]).square() + (ys - cy[:, None, None]).square())).sum((1, 2)) / mass
    return torch.stack([cx, cy], 1), var.sqrt().clamp(0.05, 1.0)


def canonical(m: Tensor, centre: Tensor, spread: Tensor, patch: int, span: float,
              angle: Tensor | None = None, flip: Tensor | None = None) -> Tensor:
    """Crop (N, 1, patch, patch) of the maps: centred on ``centre``, half-side ``span * spread``,
    rotated by ``angle`` (radians) and mirrored where ``flip``; outside the image reads as background."""
    n = m.shape[0]
    half = span * spread
    angle = torch.zeros(n) if angle is None else angle
    sx = half * (torch.where(flip, -1.0, 1.0) if flip is not None else 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sx * cos, -half * sin, centre[:, 0]], 1),
                         torch.stack([sx * sin, half * cos, centre[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, patch, patch], align_corners=True)
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def colour_statistics(x: Tensor, m: Tensor, bg: Tensor) -> Tensor:
    """(N, 9): the border colour and the mean colour under weights m and m^4 (the object's interior,
    where anti-aliasing and compression have not mixed in the background)."""
    stats = [bg]
    for p in (1, 4):
        wgt = m.pow(p)
        stats.append((x * wgt).sum((2, 3)) / wgt.sum((2, 3)).clamp_min(1e-6))
    return torch.cat(stats, 1)


def resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize to ``size`` x ``size`` (a no-op at that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class SceneOracle(nn.Module):
    """Map trunk (patch -> patch/8) + mean and max pool for the ``colour_blind`` heads; an MLP on
    :func:`colour_statistics` for the others. Features: both and the object's frame, concatenated."""

    def __init__(self, classes: Mapping[str, int], cfg: OracleConfig = OracleConfig(),
                 colour_blind: tuple[str, ...] = ("shape",)):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.colour_blind = tuple(k for k in colour_blind if k in classes)
        self.trunk = nn.Sequential(_block(1, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                   _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 8 * w, 2))
        self.colour = nn.Sequential(nn.Linear(9, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(16 * w if name in self.colour_blind else cfg.hidden, n)
                                    for name, n in classes.items()})
        # The statistics' training mean and spread (set by fit, saved with the weights): palette colours a
        # few RGB steps apart become differences the MLP sees from its first step.
        self.register_buffer("stats_mean", torch.zeros(9))
        self.register_buffer("stats_std", torch.ones(9))

    def inputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(N, 3, H, W) in [-1, 1] at any H = W -> (map, centre, spread, colour statistics) at ``size``."""
        x = resize(images.float(), self.cfg.size)
        bg = border_colour(x)
        m = foreground(x, bg)
        centre, spread = object_frame(m)
        return m, centre, spread, colour_statistics(x, m, bg)

    def encode_map(self, patches: Tensor) -> Tensor:
        """Canonical map crops (N, 1, patch, patch) -> (N, 16 * width) shape features."""
        h = self.trunk(patches)
        # Mean and max over positions: the max keeps a star's tips or a ring's hole that a mean blurs.
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def encode_colour(self, stats: Tensor) -> Tensor:
        """Colour statistics (N, 9) -> (N, hidden) colour features."""
        return self.colour((stats - self.stats_mean) / self.stats_std)

    def logits(self, features: Tensor) -> dict[str, Tensor]:
        """Penultimate features (from :meth:`features`) -> {attribute: logits}."""
        split = 16 * self.cfg.width
        shape_f, colour_f = features[:, :split], features[:, split:split + self.cfg.hidden]
        return {k: head(shape_f if k in self.colour_blind else colour_f) for k, head in self.heads.items()}

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] at any H = W -> (N, 16 * width + hidden + 3) penultimate features: the
        map trunk's, the colour MLP's, and the object's centroid and spread (the crop normalises position
        and size away; a Fréchet distance on these features should still see them)."""
        m, centre, spread, stats = self.inputs(images)
        patches = canonical(m, centre, spread, self.cfg.patch, self.cfg.span)
        return torch.cat([self.encode_map(patches), self.encode_colour(stats), centre, spread[:, None]], 1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.logits(self.features(images))

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
            for k, v in self.logits(f).items():
                preds[k].append(v.argmax(-1))
        self.train(was)
        return {k: torch.cat(v) for k, v in preds.items()}, torch.cat(feats)


def degraded(x: Tensor, factors: tuple[int, ...] = (2, 4)) -> Tensor:
    """``x`` followed by its round trips through side / f (as a generator at that resolution shows it)."""
    side = x.shape[-1]
    views = [x] + [F.interpolate(resize(x, side // f), size=(side, side), mode="bilinear", align_corners=False)
                   for f in factors if side // f >= 4]
    return torch.cat(views)


def recolour(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image's channels permuted at random and, for half, negated: colours scrambled, outlines kept
    (the map trunk's input does not change: a test of its colour blindness)."""
    n = x.shape[0]
    perm = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    return x * sign[:, None, None, None]


def augment(m: Tensor, centre: Tensor, spread: Tensor, cfg: OracleConfig, generator: torch.Generator) -> Tensor:
    """Canonical crops under label-preserving changes: any rotation, a mirror for half, and the frame's
    estimate off by up to 15% in scale and 10% of the crop in position (what a blurry or noisy sample does
    to the moments). Shapes are drawn at random angles, so no angle is special."""
    n = m.shape[0]
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    flip = torch.rand(n, generator=generator) < 0.5
    scale = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(1.15))
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2 * cfg.span * spread[:, None]
    return canonical(m, centre + shift, spread * scale, cfg.patch, cfg.span, angle, flip)


def fit(model: SceneOracle, images: Tensor, targets: Mapping[str, Tensor], *, steps: int, batch_size: int,
        lr: float, seed: int) -> list[float]:
    """Train every head with summed cross-entropy (AdamW, one-cycle); ``targets[k][i] = -1`` means
    image i has no label for k (ignored). Returns the loss per step.

    The maps, frames and colour statistics of every image, of its half- and quarter-resolution round
    trips and of all of these under noise are computed once; a step only crops, rotates and runs the
    small networks, so more steps fit in the same time."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    with torch.no_grad():
        x = degraded(resize(images.float(), cfg.size))
        # and each view again under pixel noise up to sigma 0.15 (a sampler's residual noise)
        sigma = 0.15 * torch.rand(len(x), 1, 1, 1, generator=g)
        x = torch.cat([x, (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)])
        m, centre, spread, stats = model.inputs(x)
        model.stats_mean.copy_(stats.mean(0))
        model.stats_std.copy_(stats.std(0).clamp_min(0.05))
    views = x.shape[0] // images.shape[0]
    labels = {k: v.repeat(views) for k, v in targets.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        shape_f = model.encode_map(augment(m[idx], centre[idx], spread[idx], cfg, g))
        # The colour MLP costs next to nothing: it sees 8x the batch, which it needs to separate palette
        # colours a few RGB steps apart within the steps the trunk needs.
        cdx = torch.randint(len(x), (8 * batch_size,), generator=g)
        colour_f = model.encode_colour(stats[cdx] + 0.02 * torch.randn(len(cdx), stats.shape[1], generator=g))
        loss = torch.zeros(())
        for k, head in model.heads.items():
            blind = k in model.colour_blind
            y = labels[k][idx if blind else cdx]
            if (y >= 0).any():
                loss = loss + F.cross_entropy(head(shape_f if blind else colour_f), y, ignore_index=-1)
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
