"""Sliced Wasserstein distance between Laplacian-pyramid patch distributions.

Karras et al. 2018, "Progressive Growing of GANs", §5 and Appendix D: for every level of a
Laplacian pyramid (from the full resolution down to 16×16), draw 7×7 neighbourhoods
(128 per image) as 3·7·7 = 147-d descriptors, normalise each colour channel to zero mean and
unit standard deviation over the set, and compare the two sets with the sliced Wasserstein
distance (Rabin et al. 2011) over random unit directions. Reported values are ×1e3, as in the
paper's tables; the final number is the mean over levels.

No network weights are needed. Because of the per-set normalisation the metric ignores a
global per-channel offset or gain of a whole set: it measures image structure, not colour
statistics.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _binomial_blur(x: Tensor) -> Tensor:
    """5×5 binomial low-pass filter ([1, 4, 6, 4, 1] / 16 separable), reflect-padded."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _pyramid_down(x: Tensor) -> Tensor:
    return _binomial_blur(x)[..., ::2, ::2]


def _pyramid_up(x: Tensor, size: tuple[int, int]) -> Tensor:
    # Zero insertion then the same filter ×4 (each output pixel sees 1/4 of the taps).
    up = x.new_zeros(*x.shape[:2], *size)
    up[..., ::2, ::2] = x
    return _binomial_blur(up) * 4


def laplacian_pyramid(images: Tensor, num_levels: int) -> list[Tensor]:
    """Band-pass levels, finest first; the last level is the low-pass residual."""
    levels, g = [], images
    for _ in range(num_levels - 1):
        down = _pyramid_down(g)
        levels.append(g - _pyramid_up(down, g.shape[-2:]))
        g = down
    levels.append(g)
    return levels


def num_pyramid_levels(height: int, width: int, min_resolution: int = 16) -> int:
    """Levels from the full resolution down to `min_resolution` (64×64 → 64, 32, 16: 3)."""
    if min(height, width) < min_resolution:
        raise ValueError(f"images of {height}×{width} are smaller than {min_resolution}")
    return 1 + int(math.log2(min(height, width) // min_resolution))


def _patches(level: Tensor, patch_size: int, per_image: int | None, generator: torch.Generator) -> Tensor:
    """(M, C·p·p) descriptors, channel-major, from one pyramid level of shape (N, C, H, W)."""
    n, c, h, w = level.shape
    if per_image is None:  # every position: exact, needs no randomness
        return F.unfold(level, patch_size).transpose(1, 2).reshape(-1, c * patch_size**2)
    ys = torch.randint(0, h - patch_size + 1, (n, per_image, 1, 1), generator=generator)
    xs = torch.randint(0, w - patch_size + 1, (n, per_image, 1, 1), generator=generator)
    offsets = torch.arange(patch_size)
    rows = (ys + offsets.view(1, 1, -1, 1)).to(level.device)
    cols = (xs + offsets.view(1, 1, 1, -1)).to(level.device)
    idx = torch.arange(n, device=level.device).view(n, 1, 1, 1)
    patches = level.permute(0, 2, 3, 1)[idx, rows, cols]  # (N, P, p, p, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c * patch_size**2)


@torch.no_grad()
def swd_descriptors(
    images: Tensor,
    patches_per_image: int | None = 128,
    patch_size: int = 7,
    min_resolution: int = 16,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Raw (unnormalised) patch descriptors per pyramid level, finest first.

    images: (N, C, H, W) in [-1, 1]. `patches_per_image=None` takes every patch position
    (exact, for small images and tests); otherwise positions are drawn from `generator`
    (a CPU generator). Call per batch and concatenate per level to handle large sets.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    levels = laplacian_pyramid(images.float(), num_pyramid_levels(*images.shape[-2:], min_resolution))
    return [_patches(level, patch_size, patches_per_image, generator) for level in levels]


def _normalize_channels(desc: Tensor, channels: int) -> Tensor:
    """Zero mean, unit std per colour channel over all descriptors and pixels of a set."""
    d = desc.to(torch.float64).reshape(desc.shape[0], channels, -1)
    d = (d - d.mean(dim=(0, 2), keepdim=True)) / d.std(dim=(0, 2), keepdim=True, unbiased=False).clamp_min(1e-12)
    return d.reshape(desc.shape[0], -1)


def wasserstein_1d(a: Tensor, b: Tensor) -> Tensor:
    """W1 between the empirical distributions of the columns of a (N, P) and b (M, P).

    In 1-D, W1 = ∫₀¹ |F_a⁻¹(u) − F_b⁻¹(u)| du. Both quantile functions are steps that change only
    at u = i/N and u = j/M, so the integral is exact as a sum over the merged grid of those
    points, which depends on N and M alone: two sorts and a gather, however different the sizes
    (equal sizes: mean |sorted(a) − sorted(b)|), with no subsampling.
    """
    a, b = a.sort(dim=0).values, b.sort(dim=0).values
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return (a - b).abs().mean(0)
    grid = torch.cat([torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(m + 1, dtype=torch.float64) / m])
    u = torch.unique(grid)  # sorted
    mid = (u[:-1] + u[1:]) / 2  # strictly inside a step of both quantile functions
    ia, ib = (mid * n).long().clamp_max(n - 1), (mid * m).long().clamp_max(m - 1)
    return ((a[ia] - b[ib]).abs() * u.diff().to(a.dtype)[:, None]).sum(0)


@torch.no_grad()
def sliced_wasserstein_distance(
    desc_a: Tensor,
    desc_b: Tensor,
    channels: int = 3,
    num_projections: int = 512,
    generator: torch.Generator | None = None,
    chunk: int = 128,
) -> float:
    """Sliced W1 between two descriptor sets of one pyramid level (not scaled by 1e3).

    Each set is normalised per channel on its own (Karras et al. 2018, App. D), then both are
    projected on the same `num_projections` random unit directions (drawn from `generator`,
    a CPU generator) and the 1-D distances are averaged.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    a, b = _normalize_channels(desc_a, channels), _normalize_channels(desc_b, channels)
    total = a.new_zeros(())
    for start in range(0, num_projections, chunk):
        dirs = torch.randn(a.shape[1], min(chunk, num_projections - start), generator=generator, dtype=a.dtype)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
        total += wasserstein_1d(a @ dirs, b @ dirs).sum()
    return (total / num_projections).item()


def swd(
    images_a: Tensor,
    images_b: Tensor,
    patches_per_image: int | None = 128,
    num_projections: int = 512,
    patch_size: int = 7,
    min_resolution: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[list[float], float]:
    """SWD ×1e3 per pyramid level (finest first) and their mean, as reported by Karras et al.

    images_*: (N, C, H, W) in [-1, 1], same C and H×W; the sets may differ in size.
    Deterministic for a given `generator` (default: seeded with 0).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    desc_a = swd_descriptors(images_a, patches_per_image, patch_size, min_resolution, generator)
    desc_b = swd_descriptors(images_b, patches_per_image, patch_size, min_resolution, generator)
    channels = images_a.shape[1]
    per_level = [
        1e3 * sliced_wasserstein_distance(a, b, channels, num_projections, generator) for a, b in zip(desc_a, desc_b)
    ]
    return per_level, sum(per_level) / len(per_level)
