"""Controllable generation through the inversion encoder (PaGoDA Sec. 5.3, Fig. 8).

The frozen teacher's PF-ODE inversion is a deterministic encoder x_low -> z and the generator
a one-step decoder z -> x, so editing reduces to choosing z (and c):
- super-resolution: z = inv(down(y)), then G_R(z)  (exactly the Stage-3 training objective);
- inpainting: optimize z so that mask * G(z) matches the known pixels;
- class / prompt transfer: z = inv(down(x), c_src), then G(z, c_tgt);
- interpolation: slerp between two latents, decode each.
`cond` keyword arguments are the networks' condition inputs: label=..., text=..., text_mask=...
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from genmodels.pagoda.edm import EDMPrecond
from genmodels.pagoda.generator import Generator
from genmodels.pagoda.ode import ode_invert


def downsample(x: Tensor, size: int) -> Tensor:
    """Area-style (antialiased) downsampling to the teacher resolution."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def encode(teacher: EDMPrecond, x: Tensor, num_points: int = 40, **cond) -> Tensor:
    """DDIM inversion of x (any resolution) at the teacher's resolution: the latent z."""
    x_low = downsample(x, teacher.net.cfg.img_resolution).clamp(-1, 1)
    return ode_invert(teacher, x_low, num_points, **cond)


@torch.no_grad()
def super_resolution(gen: Generator, teacher: EDMPrecond, y: Tensor, num_points: int = 40, **cond) -> Tensor:
    """Low-resolution y -> G's output resolution (Sec. 3.3)."""
    return gen(encode(teacher, y, num_points, **cond), **cond)


@torch.no_grad()
def condition_transfer(gen: Generator, teacher: EDMPrecond, x: Tensor, src: dict, tgt: dict,
                       num_points: int = 40) -> Tensor:
    """Class/prompt transfer: invert under the source condition, decode under the target one.

    src, tgt: condition dicts, e.g. {"label": ...} or {"text": ..., "text_mask": ...}.
    """
    return gen(encode(teacher, x, num_points, **src), **tgt)


def inpaint(gen: Generator, x: Tensor, mask: Tensor, z: Tensor | None = None, steps: int = 100, lr: float = 0.05,
            prior_weight: float = 1e-2, generator: torch.Generator | None = None, **cond) -> tuple[Tensor, Tensor]:
    """Optimize z so that mask * G(z) = mask * x (mask = 1 on known pixels); returns (image, z).

    z starts from `z` (e.g. the inversion of a coarse fill) or N(0, sigma_max^2). A penalty on
    (mean(u^2) - 1)^2, u = z / sigma_max, keeps z near the Gaussian shell where G was trained.
    The result keeps the known pixels and takes G's output elsewhere. G's weights get no gradient.
    """
    s = gen.cfg.sigma_max
    if z is None:
        z = torch.randn((x.shape[0], 3, gen.net.cfg.img_resolution, gen.net.cfg.img_resolution), generator=generator)
        z = z.to(x.device) * s
    u = (z.detach() / s).clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    mask = mask.to(x.dtype).expand_as(x)
    was_training = gen.training
    gen.eval()
    with torch.enable_grad():
        for _ in range(steps):
            out = gen(u * s, **cond)
            fit = ((out - x) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            prior = (u.pow(2).flatten(1).mean(1) - 1).pow(2).mean()
            (grad,) = torch.autograd.grad(fit + prior_weight * prior, u)
            u.grad = grad
            opt.step()
    gen.train(was_training)
    with torch.no_grad():
        out = gen(u * s, **cond)
    return mask * x + (1 - mask) * out, (u * s).detach()


def slerp(z0: Tensor, z1: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation per sample (flattened), falling back to lerp for parallel vectors."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    sin = torch.sin(theta)
    safe = sin.abs() > 1e-6
    w0 = torch.where(safe, torch.sin((1 - t) * theta) / sin.where(safe, torch.ones_like(sin)), 1 - t)
    w1 = torch.where(safe, torch.sin(t * theta) / sin.where(safe, torch.ones_like(sin)), t)
    return (w0 * a + w1 * b).reshape(z0.shape)


@torch.no_grad()
def interpolate(gen: Generator, z0: Tensor, z1: Tensor, num: int = 8, **cond) -> Tensor:
    """Decode slerp(z0, z1, t) for t in linspace(0, 1, num): (num, B, C, H, W)."""
    ts = torch.linspace(0, 1, num).tolist()
    return torch.stack([gen(slerp(z0, z1, t), **cond) for t in ts])
