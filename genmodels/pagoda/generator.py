"""PaGoDA's one-step generator G(z, c[, omega]) (Sec. 3.2, Sec. 4.2).

G is a full copy of the teacher's U-Net evaluated once at sigma = sigma_max:
G(z, c) = c_skip z + c_out F(z / sqrt(sigma_max^2 + sigma_data^2), c_noise(sigma_max), c),
i.e. exactly the teacher's one-step denoiser D(z; sigma_max) at initialization. We keep EDM's
output scaling (a fixed c_out ~ sigma_data) rather than reading the raw F as the image: the raw
F of the teacher is ~2x the image at sigma_max, so the scaled form starts from the teacher's
posterior mean instead of a 2x-too-bright image; `precond_output=False` gives the raw F.
After growth (growth.py) the output is larger than z, so the c_skip z term is dropped there:
c_skip(80) = 3.9e-5, so c_skip z has std ~0.003, below one 8-bit level (1/127.5).

Text-to-image (Sec. 4.2): an omega embedding (sinusoids -> MLP, last layer zero-initialized so
G starts equal to the teacher for every omega) is added to the U-Net's time embedding.
"""
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genmodels.pagoda.edm import EDMPrecond, edm_coeffs
from genmodels.pagoda.unet import UNet, positional_embedding, zero_init


@dataclass(frozen=True)
class GeneratorConfig:
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    omega_cond: bool = False  # text-to-image: G(z, c, omega) distilled from the CFG-omega teacher
    precond_output: bool = True  # False: the raw network output F is the image


PRESETS = {"tiny": GeneratorConfig(), "paper": GeneratorConfig(), "paper_text": GeneratorConfig(omega_cond=True)}


class Generator(nn.Module):
    def __init__(self, net: UNet, cfg: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.map_omega = None
        if cfg.omega_cond:
            mc, emb = net.cfg.model_channels, net.emb_channels
            self.map_omega = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), zero_init(nn.Linear(emb, emb)))

    @classmethod
    def from_teacher(cls, teacher: EDMPrecond, cfg: GeneratorConfig = GeneratorConfig()) -> "Generator":
        """Stage 2b initialization: a deep copy of the teacher network, all weights trainable, no dropout.

        The official decoder is built with `dropout=0.0` while the ImageNet teacher trains with 0.1
        (sony/pagoda cm/script_util.py: `dropout` vs `teacher_dropout`), so the copy drops it.
        """
        net = copy.deepcopy(teacher.net)
        net.cfg = dataclasses.replace(net.cfg, dropout=0.0)
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        gen = cls(net, cfg)
        gen.requires_grad_(True)
        return gen

    def adaptive_layer(self, where: str = "last_block") -> Tensor:
        """W of the adaptive adversarial weight (VQGAN-style).

        "last_block": the zero-initialized second conv of the last decoder ResBlock, where the official
        code takes it (sony/pagoda cm/karras_diffusion.py `get_last_layer`:
        `output_blocks[-1][0].out_layers[3].weight`); "head": the output conv (our earlier choice).
        """
        if where == "head":
            return self.net.out_conv.weight
        if where == "last_block":
            return self.net.dec[list(self.net.dec)[-1]].conv1.weight
        raise ValueError(f"adaptive_layer: expected 'last_block' or 'head', got {where!r}")

    def _inputs(self, z: Tensor, omega: Tensor | float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        sigma = torch.full((z.shape[0], 1, 1, 1), self.cfg.sigma_max, dtype=torch.float32, device=z.device)
        c_skip, c_out, c_in, c_noise = edm_coeffs(sigma, self.cfg.sigma_data)
        emb_extra = None
        if self.map_omega is not None:
            omega = torch.as_tensor(0.0 if omega is None else omega, dtype=torch.float32, device=z.device)
            omega = omega.reshape(-1).expand(z.shape[0])
            emb_extra = self.map_omega(positional_embedding(omega, self.net.cfg.model_channels))
        return c_skip, c_out, c_in * z.float(), c_noise.flatten(), emb_extra

    def _output(self, f: Tensor, z: Tensor, c_skip: Tensor, c_out: Tensor) -> Tensor:
        if not self.cfg.precond_output:
            return f
        out = c_out * f.float()
        if out.shape[-1] == z.shape[-1]:
            out = out + c_skip * z.float()
        return out

    def forward(
        self, z: Tensor, label: Tensor | None = None, text: Tensor | None = None, text_mask: Tensor | None = None,
        omega: Tensor | float | None = None,
    ) -> Tensor:
        """One forward pass: latent z (B, 3, r, r) at the sigma_max scale -> image at the output resolution."""
        c_skip, c_out, x_in, c_noise, emb_extra = self._inputs(z, omega)
        f = self.net(x_in, c_noise, label, text, text_mask, emb_extra)
        return self._output(f, z, c_skip, c_out)

    def forward_split(
        self, z: Tensor, label: Tensor | None = None, text: Tensor | None = None, text_mask: Tensor | None = None,
        omega: Tensor | float | None = None, grad_tail: int | None = None,
    ) -> Tensor:
        """forward() with all but the last `grad_tail` decoder blocks run without autograd (None: all of it).

        Used for the adaptive weight's ||grad_W L_rec|| when the reconstruction term takes its own
        optimizer step: grad_W needs only the graph from W to the output (grad_tail=1 for the last
        block's conv, 0 for the head), not the trunk's.
        """
        c_skip, c_out, x_in, c_noise, emb_extra = self._inputs(z, omega)
        h = self.net.trunk(x_in, c_noise, label, text, text_mask, emb_extra, grad_tail=grad_tail)
        return self._output(self.net.head(h), z, c_skip, c_out)


def sample_latents(shape: tuple[int, ...], sigma_max: float = 80.0, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """z ~ N(0, sigma_max^2 I), the generator's prior (Sec. 3.2)."""
    return (torch.randn(shape, generator=generator) * sigma_max).to(device)
