"""Projected discriminator on frozen features with DiffAugment (PaGoDA Sec. 3.2, Sec. 4.2, App. D).

A frozen pretrained network (the paper's text-to-image model: DINO ViT-S/16, as in StyleGAN-T;
`vit_small_patch16_224.dino` via timm) gives feature maps at several depths; a small trainable
head per depth turns every token into a logit (multi-scale, per-token hinge loss as in
StyleGAN-T / ADD). Conditioning is by projection (Miyato & Koyama 2018): the head emits a
cmap_dim vector per token whose dot product with an embedding of the condition (class one-hot,
pooled CLIP text embedding, CFG scale omega) is the logit. DiffAugment (Zhao et al. 2020:
color, translation, cutout) is applied to real and fake images alike, differentiably.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from genmodels.pagoda.losses import FrozenFeatures, TinyFeatures, build_timm_features
from genmodels.pagoda.unet import as_onehot, positional_embedding


@dataclass(frozen=True)
class DiscriminatorConfig:
    backbone: str = "vit_small_patch16_224.dino"
    layers: tuple[int, ...] = (2, 5, 8, 11)
    size: int = 224
    channels: int = 64  # head width
    cmap_dim: int = 64
    num_classes: int = 0
    text_dim: int = 0  # width of the pooled text embedding (CLIP embed_dim)
    omega_cond: bool = False
    augment: tuple[str, ...] = ("color", "translation", "cutout")
    translation_ratio: float = 0.125
    cutout_ratio: float = 0.5


PRESETS = {
    "tiny": DiscriminatorConfig(channels=16, cmap_dim=16, num_classes=10, size=32),
    "tiny_text": DiscriminatorConfig(channels=16, cmap_dim=16, text_dim=32, omega_cond=True, size=32),
    "paper": DiscriminatorConfig(num_classes=1000),
    "paper_text": DiscriminatorConfig(text_dim=768, omega_cond=True),
}


# --- DiffAugment (Zhao et al. 2020), images in [-1, 1] ---

def _rand(x: Tensor, *shape: int) -> Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, dtype=x.dtype)


def rand_color(x: Tensor) -> Tensor:
    x = x + (_rand(x, 1, 1, 1) - 0.5)  # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(x, 1, 1, 1) * 2) + m  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(x, 1, 1, 1) + 0.5) + m  # contrast


def rand_translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ratio * size pixels, filling with zeros."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gy = (torch.arange(h, device=x.device)[None, :, None] + ty + 1).clamp(0, h + 1)
    gx = (torch.arange(w, device=x.device)[None, None, :] + tx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # border of zeros absorbs out-of-range indices
    return padded[torch.arange(b, device=x.device)[:, None, None], gy, gx].permute(0, 3, 1, 2)


def rand_cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Zero one random (ratio * size)^2 square per image (it may cross the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    y0 = torch.randint(0, h, (b, 1, 1), device=x.device) - ch // 2
    x0 = torch.randint(0, w, (b, 1, 1), device=x.device) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
    return x * (~inside)[:, None].to(x.dtype)


def diff_augment(x: Tensor, policy: tuple[str, ...] = ("color", "translation", "cutout"),
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> Tensor:
    if "color" in policy:
        x = rand_color(x)
    if "translation" in policy:
        x = rand_translation(x, translation_ratio)
    if "cutout" in policy:
        x = rand_cutout(x, cutout_ratio)
    return x


# --- heads ---

class DiscHead(nn.Module):
    """Per-token head on one feature map: 1x1 conv, residual 9-tap conv over tokens, projection."""

    def __init__(self, cin: int, ch: int, cmap_dim: int, conditional: bool):
        super().__init__()
        self.cmap_dim, self.conditional = cmap_dim, conditional
        self.proj = spectral_norm(nn.Conv1d(cin, ch, 1))
        self.norm = nn.GroupNorm(1, ch)  # per-sample statistics: real and fake batches stay independent
        self.block = spectral_norm(nn.Conv1d(ch, ch, 9, padding=4, padding_mode="circular"))
        self.out = spectral_norm(nn.Conv1d(ch, cmap_dim if conditional else 1, 1))

    def forward(self, f: Tensor, cmap: Tensor | None) -> Tensor:
        h = F.leaky_relu(self.proj(f.flatten(2)), 0.2)
        h = h + F.leaky_relu(self.block(self.norm(h)), 0.2)
        out = self.out(h)
        if not self.conditional:
            return out[:, 0]
        return (out * cmap[:, :, None]).sum(dim=1) / math.sqrt(self.cmap_dim)  # (B, N)


class ProjectedDiscriminator(nn.Module):
    """D(x, c[, omega]) -> per-token logits (B, N_total) over all heads."""

    def __init__(self, features: nn.Module, feature_channels: list[int], cfg: DiscriminatorConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg, self.features = cfg, features.requires_grad_(False)
        d = cfg.cmap_dim
        self.conditional = bool(cfg.num_classes or cfg.text_dim or cfg.omega_cond)
        self.map_label = nn.Linear(cfg.num_classes, d, bias=False) if cfg.num_classes else None
        self.map_text = nn.Linear(cfg.text_dim, d, bias=False) if cfg.text_dim else None
        self.map_omega = nn.Linear(64, d, bias=False) if cfg.omega_cond else None
        self.cmap_bias = nn.Parameter(torch.zeros(d)) if self.conditional else None
        self.heads = nn.ModuleList(DiscHead(c, cfg.channels, d, self.conditional) for c in feature_channels)

    @classmethod
    def build(cls, cfg: DiscriminatorConfig = PRESETS["paper"], pretrained: bool = True) -> "ProjectedDiscriminator":
        """With a timm backbone (DINO ViT-S/16 by default); pretrained=True needs the weights (cluster)."""
        feats = build_timm_features(cfg.backbone, cfg.layers, cfg.size, pretrained=pretrained)
        return cls(feats, feats.channels, cfg)

    @classmethod
    def tiny(cls, cfg: DiscriminatorConfig = PRESETS["tiny"]) -> "ProjectedDiscriminator":
        """With a frozen random conv feature net (tests, `tiny` configs)."""
        feats = TinyFeatures(size=cfg.size)
        return cls(feats, feats.channels, cfg)

    def train(self, mode: bool = True) -> "ProjectedDiscriminator":
        super().train(mode)
        if isinstance(self.features, FrozenFeatures):
            self.features.train(mode)  # keeps its backbone in eval mode
        return self

    def condition_map(self, b: int, device, label=None, text_embed=None, omega=None) -> Tensor | None:
        if not self.conditional:
            return None
        cmap = self.cmap_bias.expand(b, -1)
        if self.map_label is not None and label is not None:
            cmap = cmap + self.map_label(as_onehot(label, self.cfg.num_classes).to(device))
        if self.map_text is not None and text_embed is not None:
            cmap = cmap + self.map_text(F.normalize(text_embed.float(), dim=-1))
        if self.map_omega is not None and omega is not None:
            omega = torch.as_tensor(omega, dtype=torch.float32, device=device).reshape(-1).expand(b)
            cmap = cmap + self.map_omega(positional_embedding(omega, 64))
        return cmap

    def forward(self, x: Tensor, label: Tensor | None = None, text_embed: Tensor | None = None,
                omega: Tensor | float | None = None, augment: bool = True) -> Tensor:
        if augment and self.cfg.augment:
            x = diff_augment(x, self.cfg.augment, self.cfg.translation_ratio, self.cfg.cutout_ratio)
        cmap = self.condition_map(x.shape[0], x.device, label, text_embed, omega)
        feats = self.features(x)
        return torch.cat([head(f, cmap) for head, f in zip(self.heads, feats)], dim=1)
