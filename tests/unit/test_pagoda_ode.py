"""PaGoDA Stage 2a: Karras grid, Heun sampling and inversion of the PF-ODE."""
import itertools
import math

import torch

from genmodels.pagoda.edm import EDMPrecond
from genmodels.pagoda.ode import heun_solve, karras_sigmas, ode_invert, ode_sample
from genmodels.pagoda.unet import PRESETS, UNet

MU, S = 0.3, 0.5  # data ~ N(MU, S^2 I): the ideal denoiser is affine and the ODE has a closed form


def gaussian_denoiser(x, sigma):
    sigma = sigma.reshape(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_flow(x, s0, s1):
    """PF-ODE solution for Gaussian data: x(s) - MU scales with sqrt(S^2 + s^2)."""
    return MU + (x - MU) * math.sqrt(S**2 + s1**2) / math.sqrt(S**2 + s0**2)


def test_karras_sigmas():
    s = karras_sigmas(40, 0.002, 80.0, 7.0)
    assert s.shape == (40,) and s.dtype == torch.float64
    assert math.isclose(s[0].item(), 80.0) and math.isclose(s[-1].item(), 0.002)
    assert (s[1:] < s[:-1]).all()
    mid = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7  # i = (n-1)/2 on a 3-point grid
    assert math.isclose(karras_sigmas(3)[1].item(), mid)


def test_inversion_matches_closed_form_and_converges():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4) * S + MU
    exact = exact_flow(x, 0.002, 80.0)
    z_err, rt_err = [], []
    for n in (10, 20, 40, 80):
        z = ode_invert(gaussian_denoiser, x, n, clip_denoised=False)
        z_err.append((z - exact).abs().max().item() / 80)
        x_back = ode_sample(gaussian_denoiser, z, n, to_zero=False)
        rt_err.append((x_back - x).abs().max().item())
    # Heun is 2nd order: errors shrink ~4x per doubling of the grid (3x leaves float32 slack).
    for e in (z_err, rt_err):
        assert all(b < a / 3 for a, b in itertools.pairwise(e)), e
    assert rt_err[2] < 5e-3  # the paper's 40-point grid
    assert z_err[-1] < 0.01


def test_heun_forward_matches_closed_form():
    x = torch.full((1, 3, 2, 2), 40.0)
    sig = karras_sigmas(200, 0.5, 40.0)
    out = heun_solve(gaussian_denoiser, x, sig)
    assert torch.allclose(out, exact_flow(x, 40.0, 0.5), atol=1e-3)
    # The last step to sigma = 0 is Euler: x = D(x; sigma).
    out0 = heun_solve(gaussian_denoiser, x, torch.tensor([0.5, 0.0]))
    assert torch.allclose(out0, gaussian_denoiser(x, torch.tensor([0.5])))


def test_invert_then_generate_with_tiny_teacher():
    torch.manual_seed(0)
    teacher = EDMPrecond(UNet(PRESETS["tiny"]))
    with torch.no_grad():  # the output conv is zero-initialized; give the net a nonlinear response
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    calls = []

    def counted(x, sigma, **cond):
        calls.append(1)
        return teacher(x, sigma, **cond)

    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    label = torch.tensor([1, 3])
    z = ode_invert(counted, x, 40, label=label)
    assert len(calls) == 78  # 39 Heun steps, 2 evaluations each (PaGoDA Sec. 3.2)
    assert z.shape == x.shape and 60 < z.std().item() < 100  # sigma_max scale
    x_back = ode_sample(teacher, z, 40, to_zero=False, label=label)
    assert (x_back - x).abs().max().item() < 1e-2
