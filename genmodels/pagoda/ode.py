"""Deterministic probability-flow ODE: Karras grid, Heun sampling and DDIM-style inversion.

The PF-ODE of EDM (Karras et al. 2022, Eq. 4 with sigma(t) = t, s(t) = 1) is
dx/dsigma = (x - D(x; sigma)) / sigma. Heun's method (EDM Alg. 1, no churn) integrates it in
either direction, so the same solver samples (sigma_max -> 0) and inverts (sigma_min ->
sigma_max). PaGoDA Stage 2a (Sec. 3.2): z = inversion of the downsampled image on the 40-point
Karras grid (rho = 7) from 0.002 to 80 with the denoised output clipped to [-1, 1], i.e.
39 Heun steps = 78 teacher evaluations; z has the data's shape at the sigma_max scale.

`net` is any denoiser callable as net(x, sigma, **cond), e.g. EDMPrecond or edm.Guided.
"""
import itertools
from collections.abc import Callable

import torch
from torch import Tensor


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Descending grid sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho (EDM Eq. 5), float64."""
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / max(n - 1, 1) * (b - a)) ** rho


def heun_solve(
    net: Callable[..., Tensor], x: Tensor, sigmas: Tensor, clip_denoised: bool = False, **cond
) -> Tensor:
    """Integrate the PF-ODE from sigmas[0] to sigmas[-1] with Heun's 2nd-order method.

    Works for decreasing (sampling) and increasing (inversion) grids. A final step to sigma = 0
    is an Euler step, i.e. x = D(x; sigma) (EDM Alg. 1, line 8 is skipped when t_{i+1} = 0).
    """
    def denoise(x: Tensor, s: float) -> Tensor:
        d = net(x, torch.full((x.shape[0],), s, dtype=torch.float32, device=x.device), **cond).float()
        return d.clamp(-1, 1) if clip_denoised else d

    x = x.float()
    s = [float(v) for v in sigmas]
    for s0, s1 in itertools.pairwise(s):
        d0 = (x - denoise(x, s0)) / s0
        x_next = x + (s1 - s0) * d0
        if s1 > 0:
            d1 = (x_next - denoise(x_next, s1)) / s1
            x_next = x + (s1 - s0) * 0.5 * (d0 + d1)
        x = x_next
    return x


@torch.no_grad()
def ode_sample(
    net: Callable[..., Tensor], z: Tensor, num_points: int = 40, sigma_min: float = 0.002,
    sigma_max: float = 80.0, rho: float = 7.0, to_zero: bool = True, clip_denoised: bool = False, **cond,
) -> Tensor:
    """Noise z (sigma_max scale) -> data: Heun on the descending Karras grid (+ one Euler step to 0)."""
    sigmas = karras_sigmas(num_points, sigma_min, sigma_max, rho)
    if to_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return heun_solve(net, z, sigmas, clip_denoised=clip_denoised, **cond)


@torch.no_grad()
def ode_invert(
    net: Callable[..., Tensor], x: Tensor, num_points: int = 40, sigma_min: float = 0.002,
    sigma_max: float = 80.0, rho: float = 7.0, clip_denoised: bool = True, **cond,
) -> Tensor:
    """Data x (at sigma_min) -> latent z (at sigma_max): the reversed Karras grid (PaGoDA Sec. 3.2)."""
    sigmas = karras_sigmas(num_points, sigma_min, sigma_max, rho).flip(0)
    return heun_solve(net, x, sigmas, clip_denoised=clip_denoised, **cond)
