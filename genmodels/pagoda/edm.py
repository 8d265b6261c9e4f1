"""EDM preconditioning, training loss and classifier-free guidance (Karras et al. 2022).

PaGoDA Stage 1 (Sec. 3.1, App. D) trains the low-resolution teacher exactly as EDM:
D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with sigma_data = 0.5 (EDM Eq. 7, Table 1),
log-normal sigma (P_mean -1.2, P_std 1.2) and weight lambda(sigma) = (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2 (EDM Eq. 2 + Table 1). Condition dropout trains the unconditional branch
that CFG needs.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genmodels.pagoda.unet import UNet


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    cond_drop: float = 0.1  # probability of replacing the condition by the null condition (CFG)


PRESETS = {"tiny": EDMConfig(), "paper": EDMConfig()}


def edm_coeffs(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1.0 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Denoiser D(x; sigma, cond) around a raw network (EDM Eq. 7)."""

    def __init__(self, net: UNet, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(
        self, x: Tensor, sigma: Tensor | float, label: Tensor | None = None, text: Tensor | None = None,
        text_mask: Tensor | None = None, emb_extra: Tensor | None = None,
    ) -> Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_coeffs(sigma, self.sigma_data)
        f = self.net(c_in * x, c_noise.flatten(), label, text, text_mask, emb_extra)
        return c_skip * x + c_out * f.float()


def _rand(fn, shape, generator: torch.Generator | None, device) -> Tensor:
    # A seeded generator draws on its own device (CPU in tests); otherwise draw on the data's device.
    if generator is None:
        return fn(shape, device=device)
    return fn(shape, generator=generator, device=generator.device).to(device)


def drop_condition(
    label: Tensor | None, text: Tensor | None, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Replace each sample's condition by the null condition with probability p (CFG training)."""
    ref = label if label is not None else text
    if ref is None or p <= 0:
        return label, text
    drop = _rand(torch.rand, (ref.shape[0],), generator, ref.device) < p
    if label is not None:
        if label.is_floating_point():
            label = label * (~drop).to(label.dtype)[:, None]
        else:
            label = torch.where(drop, torch.full_like(label, -1), label)
    if text is not None:
        text = text * (~drop).to(text.dtype).reshape(-1, *[1] * (text.ndim - 1))
    return label, text


def null_condition(label: Tensor | None, text: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The unconditional input matching `label`/`text` (label -1 / zero one-hot, zero text)."""
    if label is not None:
        label = torch.zeros_like(label) if label.is_floating_point() else torch.full_like(label, -1)
    return label, None if text is None else torch.zeros_like(text)


def edm_loss(
    net: EDMPrecond, images: Tensor, cfg: EDMConfig = EDMConfig(), label: Tensor | None = None,
    text: Tensor | None = None, text_mask: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """EDM training loss E[lambda(sigma) ||D(x + n; sigma) - x||^2] (EDM Eq. 2, Table 1), mean over elements.

    `generator` (a CPU torch.Generator) makes sigma, noise and dropout reproducible for tests.
    """
    b = images.shape[0]
    label, text = drop_condition(label, text, cfg.cond_drop, generator)
    rnd = _rand(torch.randn, (b, 1, 1, 1), generator, images.device)
    sigma = (rnd * cfg.P_std + cfg.P_mean).exp()
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
    noise = _rand(torch.randn, images.shape, generator, images.device) * sigma
    denoised = net(images + noise, sigma, label, text, text_mask)
    return (weight * (denoised - images) ** 2).mean()


def guided_denoise(
    net: EDMPrecond, x: Tensor, sigma: Tensor | float, omega: Tensor | float = 0.0, label: Tensor | None = None,
    text: Tensor | None = None, text_mask: Tensor | None = None,
) -> Tensor:
    """CFG denoiser D_c + omega (D_c - D_u) (Ho & Salimans 2022); omega = 0 is the plain conditional model.

    omega is a scalar or a per-sample (B,) tensor (PaGoDA's omega-conditioned distillation, Sec. 4.2).
    """
    if not torch.is_tensor(omega) and omega == 0:
        return net(x, sigma, label, text, text_mask)
    label_u, text_u = null_condition(label, text)
    def cat(a, b):
        return None if a is None else torch.cat([a, b])

    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    d = net(
        torch.cat([x, x]), torch.cat([sigma, sigma]), cat(label, label_u), cat(text, text_u), cat(text_mask, text_mask)
    )
    d_c, d_u = d.chunk(2)
    omega = torch.as_tensor(omega, dtype=d.dtype, device=d.device).reshape(-1, 1, 1, 1)
    return d_c + omega * (d_c - d_u)


class Guided(nn.Module):
    """`net` with CFG at a fixed omega, callable like a denoiser (for the ODE solvers)."""

    def __init__(self, net: EDMPrecond, omega: Tensor | float):
        super().__init__()
        self.net, self.omega = net, omega

    def forward(self, x: Tensor, sigma, label=None, text=None, text_mask=None) -> Tensor:
        return guided_denoise(self.net, x, sigma, self.omega, label, text, text_mask)
