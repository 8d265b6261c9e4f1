"""Würstchen diffusion math, apart from the networks (Stage B and Stage C share it).

Paper Sec. 3.3 / Appendix (arXiv 2306.00637), continuous time t in [0, 1]:
  cosine schedule   ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), s = 0.008, clamped [1e-4, 0.9999]
  noising           x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε
  objective         ε-prediction MSE weighted by P2: 1 / (1 + SNR(t)), SNR = ᾱ / (1 - ᾱ)
  t sampling        t = clamp((1 - U)·1.08 + 0.001, 0.001, 1)   (~7% of samples at pure noise)
  sampler           DDPM ancestral steps on a list of t's; CFG as lerp(ε_uncond, ε_cond, w)

Networks are called as `net(x_t, t, **cond) -> ε̂`; every function takes `net` as an argument.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

S = 0.008
ALPHA_BAR_MIN, ALPHA_BAR_MAX = 1e-4, 0.9999


def alpha_bar(t: Tensor, s: float = S) -> Tensor:
    """Cosine schedule ᾱ(t) (Nichol & Dhariwal 2021, Eq. 17), clamped to [1e-4, 0.9999]."""
    t = t.float()
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(ALPHA_BAR_MIN, ALPHA_BAR_MAX)


def snr(t: Tensor) -> Tensor:
    ab = alpha_bar(t)
    return ab / (1 - ab)


def p2_weight(t: Tensor, k: float = 1.0, gamma: float = 1.0) -> Tensor:
    """P2 loss weight (Choi et al. 2022): (k + SNR)^-gamma; k = gamma = 1 gives 1 / (1 + SNR)."""
    return (k + snr(t)) ** -gamma


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ(t)) x_0 + sqrt(1 - ᾱ(t)) ε."""
    ab = _bcast(alpha_bar(t), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def sample_t(n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """Training noise levels t = clamp((1 - U) * 1.08 + 0.001, 0.001, 1), U ~ U[0, 1)."""
    u = torch.rand(n, device=device, generator=generator)
    return ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0)


def drop_condition(
    cond: Tensor, p: float, null: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample condition dropout for classifier-free guidance.

    Each sample's condition is replaced with probability p by `null` (e.g. the CLIP states
    of the empty caption, broadcastable to cond) or by zeros when `null` is None.
    """
    if p <= 0:
        return cond
    keep = torch.rand(cond.shape[0], device=cond.device, generator=generator) >= p
    null = torch.zeros_like(cond) if null is None else null.to(cond.dtype).expand_as(cond)
    return torch.where(_bcast(keep, cond).bool(), cond, null)


def eps_loss(
    net: nn.Module,
    x0: Tensor,
    cond: dict[str, Tensor],
    t: Tensor | None = None,
    noise: Tensor | None = None,
    p2: bool = True,
) -> tuple[Tensor, Tensor]:
    """ε-prediction MSE (P2-weighted if p2). Returns (scalar loss, per-sample unweighted MSE)."""
    t = sample_t(x0.shape[0], device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    pred = net(add_noise(x0, t, noise), t, **cond)
    mse = F.mse_loss(pred.float(), noise.float(), reduction="none").flatten(1).mean(1)
    w = p2_weight(t) if p2 else torch.ones_like(mse)
    return (mse * w).mean(), mse.detach()


def linear_timesteps(steps: int) -> Tensor:
    """steps + 1 evenly spaced t's from 1 to 0 (Stage B default: 12 steps)."""
    return torch.linspace(1.0, 0.0, steps + 1)


def stage_c_timesteps() -> Tensor:
    """Stage C default: 29 steps, dense at high noise: linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:]."""
    return torch.cat([torch.linspace(1.0, 2 / 3, 20), torch.linspace(2 / 3, 0.0, 11)[1:]])


def ddpm_step(x: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor) -> Tensor:
    """One ancestral step x_t -> x_{t_prev} with the DDPM posterior (Ho et al. 2020, Eq. 7 / 11).

    With α = ᾱ(t) / ᾱ(t_prev): mean = (x - (1-α)/sqrt(1-ᾱ(t)) ε) / sqrt(α),
    std = sqrt((1-α)(1-ᾱ(t_prev)) / (1-ᾱ(t))); no noise is added when t_prev == 0.
    """
    ab, ab_prev = _bcast(alpha_bar(t), x), _bcast(alpha_bar(t_prev), x)
    alpha = ab / ab_prev
    mean = (x - (1 - alpha) / (1 - ab).sqrt() * eps) / alpha.sqrt()
    std = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
    return mean + std * noise * _bcast((t_prev > 0).float(), x)


def cfg_eps(net: nn.Module, x: Tensor, t: Tensor, cond: dict, uncond: dict | None, guidance: float) -> Tensor:
    """ε with classifier-free guidance: lerp(ε_uncond, ε_cond, w) = ε_u + w (ε_c - ε_u).

    Guidance is off (one conditional pass) when `uncond` is None or w <= 1, as in the public
    Würstchen pipelines; otherwise both passes run as one batch.
    """
    if uncond is None or guidance <= 1.0:
        return net(x, t, **cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    e_c, e_u = net(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    return torch.lerp(e_u, e_c, guidance)


@torch.no_grad()
def sample(
    net: nn.Module,
    shape: tuple[int, ...],
    cond: dict[str, Tensor],
    ts: Tensor,
    uncond: dict[str, Tensor] | None = None,
    guidance: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    x_init: Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DDPM-style sampler from ts[0] (normally 1) down to ts[-1] (normally 0).

    ts: 1-D tensor of steps + 1 noise levels. Deterministic for a given `generator`
    (all noise is drawn from it on `device`). A list of generators splits the batch into equal
    consecutive parts, one generator each (e.g. one per prompt, so that a prompt's images depend
    on its own seed only, whatever else shares the batch).
    """
    device = device if device is not None else next(iter(cond.values())).device
    gens = generator if isinstance(generator, (list, tuple)) else None
    if gens is not None and shape[0] % len(gens):
        raise ValueError(f"batch {shape[0]} does not split into {len(gens)} equal generator parts")

    def randn() -> Tensor:
        if gens is None:
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
        part = (shape[0] // len(gens), *shape[1:])
        return torch.cat([torch.randn(part, generator=g, device=device, dtype=dtype) for g in gens])

    x = randn() if x_init is None else x_init.to(device, dtype)
    ts = ts.to(device=device, dtype=torch.float32)
    for i in range(len(ts) - 1):
        t = ts[i].expand(shape[0])
        t_prev = ts[i + 1].expand(shape[0])
        eps = cfg_eps(net, x, t, cond, uncond, guidance).to(dtype)
        x = ddpm_step(x, eps, t, t_prev, randn())
    return x
