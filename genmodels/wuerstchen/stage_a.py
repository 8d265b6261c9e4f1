"""Würstchen Stage A: an f4 VQGAN (Paella-style), used by v2 like a VAE.

Paper Sec. 3.1 (arXiv 2306.00637): PixelUnshuffle(2) + a stride-2 conv give 4x spatial
compression to 4 latent channels; ConvNeXt-style "mixing" residual blocks; a codebook of
8192 entries; latents are divided by scale 0.3764 so that Stage B sees roughly unit variance.
v2 decodes the *unquantized* latent. Paper size: 18.4M parameters.

Loss (`vqgan_loss`): reconstruction (MSE or L1) + optional perceptual feature loss +
VQ codebook/commitment terms (van den Oord et al. 2017, Eq. 3). The optional adversarial term
(VQGAN, Esser et al. 2021, Eq. 4-5; the paper calls it optional) uses `PatchDiscriminator` and
`hinge_d_loss`, wired by `steps.stage_a_loss` / `steps.stage_a_disc_loss`.

`estimate_latent_scale`: after training, the std of the pre-quantization latent, the value
`scale_factor` should take so that Stage B sees unit variance (0.3764 is the official model's).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genmodels.wuerstchen.common import init_weights


@dataclass(frozen=True)
class StageAConfig:
    c_in: int = 3
    levels: int = 2
    bottleneck_blocks: int = 1
    c_hidden: int = 32  # channels of the deepest level; level i has c_hidden / 2**(levels-1-i)
    c_latent: int = 4
    codebook_size: int = 64
    scale_factor: float = 0.3764
    beta: float = 0.25  # commitment weight


PRESETS = {
    "tiny": StageAConfig(),
    "paper": StageAConfig(bottleneck_blocks=12, c_hidden=384, codebook_size=8192),
}


class MixingBlock(nn.Module):
    """Residual block: norm -> depthwise 3x3 (replicate pad) and norm -> channel MLP.

    Six learned scalars (`gammas`) modulate the two norms and gate both residual branches;
    the gates start at zero so every block starts as the identity.
    """

    def __init__(self, c: int, c_mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Conv2d(c, c, kernel_size=3, padding=1, padding_mode="replicate", groups=c)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, c_mlp), nn.GELU(), nn.Linear(c_mlp, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.mlp(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with a straight-through gradient (VQ-VAE, Eq. 3)."""

    def __init__(self, codebook_size: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: (B, C, H, W) -> (quantized z with straight-through grad, vq loss, indices (B, H, W))."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat.float(), self.codebook.weight.float()).argmin(dim=1)
        q = self.codebook(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2).to(z.dtype)
        # codebook term pulls codes to encodings; commitment term keeps encodings near codes
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), loss, idx.view(z.shape[0], z.shape[2], z.shape[3])


class StageA(nn.Module):
    """encode(images in [-1, 1]) -> scaled latent; decode(latent) -> images in [-1, 1].

    Internally the network sees images in [0, 1], as the official checkpoints do.
    """

    downscale = 4

    def __init__(self, cfg: StageAConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg = cfg
        cs = [cfg.c_hidden // 2**i for i in reversed(range(cfg.levels))]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(cfg.c_in * 4, cs[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(cs[i - 1], cs[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingBlock(cs[i], cs[i] * 4))
        self.down = nn.Sequential(*down)
        # BatchNorm makes the pre-quantization latent roughly zero-mean, unit-variance.
        self.to_latent = nn.Sequential(
            nn.Conv2d(cs[-1], cfg.c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(cfg.c_latent)
        )
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.c_latent, cfg.beta)
        self.from_latent = nn.Conv2d(cfg.c_latent, cs[-1], kernel_size=1)
        up = []
        for i in range(cfg.levels):
            c = cs[cfg.levels - 1 - i]
            up += [MixingBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1)]
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, cs[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(cs[0], cfg.c_in * 4, kernel_size=1), nn.PixelShuffle(2))
        self.apply(init_weights)

    def _encode_raw(self, x: Tensor) -> Tensor:
        return self.to_latent(self.down(self.in_block((x + 1) / 2)))

    def _decode_raw(self, h: Tensor) -> Tensor:
        return self.out_block(self.up(self.from_latent(h))) * 2 - 1

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, c_latent, H/4, W/4): pre-quantization latent / scale."""
        return self._encode_raw(x) / self.cfg.scale_factor

    def decode(self, latent: Tensor, quantize: bool = False) -> Tensor:
        """Scaled latent -> image in [-1, 1] (not clamped). v2 decodes with quantize=False."""
        h = latent * self.cfg.scale_factor
        if quantize:
            h = self.quantizer(h)[0]
        return self._decode_raw(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: encode -> quantize (straight-through) -> decode. Returns (recon, vq_loss)."""
        q, vq_loss, _ = self.quantizer(self._encode_raw(x))
        return self._decode_raw(q), vq_loss


def vqgan_loss(
    model: StageA,
    x: Tensor,
    perceptual: nn.Module | None = None,
    recon: str = "mse",
    perceptual_weight: float = 1.0,
    vq_weight: float = 1.0,
    unquantized_weight: float = 0.0,
    return_recon: bool = False,
):
    """Stage A objective on images x in [-1, 1]: recon + w_p * perceptual + w_vq * VQ (+ w_u * recon_u).

    `perceptual` is any frozen feature network mapping images in [-1, 1] to a tensor (or a
    list of tensors); its loss is the MSE between features of x and of the reconstruction.
    `unquantized_weight` adds the reconstruction error of the *unquantized* latent, which is how
    v2 uses Stage A downstream; with the paper's 8192 codes the two nearly coincide, but a small
    or young codebook leaves the decoder unable to read continuous latents without it.
    """
    h = model._encode_raw(x)
    q, vq, _ = model.quantizer(h)
    x_hat = model._decode_raw(q)

    def err(a: Tensor) -> Tensor:
        return F.l1_loss(a, x) if recon == "l1" else F.mse_loss(a, x)

    rec = err(x_hat)
    loss = rec + vq_weight * vq
    logs = {"recon": rec.item(), "vq": vq.item()}
    if unquantized_weight:
        rec_u = err(model._decode_raw(h))
        loss = loss + unquantized_weight * rec_u
        logs["recon_unquantized"] = rec_u.item()
    if perceptual is not None:
        fa, fb = perceptual(x_hat), perceptual(x)
        fa, fb = (fa, fb) if isinstance(fa, (list, tuple)) else ([fa], [fb])
        p = sum(F.mse_loss(a, b.detach()) for a, b in zip(fa, fb)) / len(fa)
        loss = loss + perceptual_weight * p
        logs["perceptual"] = p.item()
    logs["loss"] = loss.item()
    return (loss, logs, x_hat) if return_recon else (loss, logs)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: spectral-normalised stride-2 convs, LeakyReLU, a 1x1 conv to one
    logit per patch (raw logits, for the hinge loss). Like v1's Stage A discriminator
    (dome272/Wuerstchen vqgan.py: spectral norm, InstanceNorm, patch logits; 6 levels, 512 wide)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), c_in: int = 3):
        super().__init__()
        layers, c_prev = [], c_in
        for i, c in enumerate(widths):
            layers.append(nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_prev, c, 3, stride=2, padding=1)))
            if i:  # no norm on the first layer (pixels), as DCGAN/VQGAN discriminators
                layers.append(nn.InstanceNorm2d(c, affine=True))
            layers.append(nn.LeakyReLU(0.2))
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (VQGAN Eq. 4 with the hinge form of taming-transformers)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


@torch.no_grad()
def estimate_latent_scale(model: StageA, batches) -> dict[str, float]:
    """Std (and mean) of the pre-quantization latent over ``batches`` of images in [-1, 1]: the
    ``scale_factor`` that gives Stage B unit-variance latents (encode divides by it), as the official
    0.3764 was measured for the official Stage A. Accumulated in float64 over every element."""
    n, s1, s2 = 0, 0.0, 0.0
    for x in batches:
        h = model._encode_raw(x).double()
        n, s1, s2 = n + h.numel(), s1 + h.sum().item(), s2 + (h * h).sum().item()
    if n < 2:
        raise ValueError("estimate_latent_scale: no images")
    mean = s1 / n
    return {"std": max((s2 / n - mean * mean) * n / (n - 1), 0.0) ** 0.5, "mean": mean, "elements": n}
