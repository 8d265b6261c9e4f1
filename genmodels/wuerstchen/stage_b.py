"""Würstchen Stage B ("DiffNeXt"): latent diffusion decoder conditioned on the semantic latent.

Paper Sec. 3.2-3.3 (arXiv 2306.00637): a ConvNeXt-style U-Net over the Stage A latent
(4x256x256 at 1024 px). The 16x24x24 semantic-compressor latent is mapped by a 1x1 conv to
c_cond channels, resized to every level's resolution and concatenated into the ResBlock
channel MLPs; CLIP-H text tokens enter through cross-attention; the noise level r = t in
[0, 1] through sinusoidal embeddings. Paper (v2) size: 1.055B parameters.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genmodels.wuerstchen.common import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, init_weights, r_embedding


@dataclass(frozen=True)
class StageBConfig:
    c_in: int = 4  # Stage A latent channels
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 32  # width of the mapped text tokens and semantic features
    c_hidden: tuple[int, ...] = (32, 64)
    nhead: tuple[int, ...] = (0, 2)  # 0: the level has no attention
    blocks: tuple[int, ...] = (1, 1)
    # Per level, the block pattern repeated `blocks[i]` times: C=ResBlock, T=TimestepBlock, A=AttnBlock.
    level_config: tuple[str, ...] = ("CT", "CTA")
    inject_sem: tuple[bool, ...] = (False, True)
    c_sem: int = 16  # semantic latent channels
    c_clip: int = 32  # width of the CLIP text token states
    kernel_size: int = 3
    dropout: float = 0.0
    grad_checkpointing: bool = False


PRESETS = {
    "tiny": StageBConfig(),
    "paper": StageBConfig(
        c_cond=1024, c_hidden=(320, 640, 1280, 1280), nhead=(0, 10, 20, 20), blocks=(4, 4, 14, 4),
        level_config=("CT", "CTA", "CTA", "CTA"), inject_sem=(False, True, True, True), c_clip=1024, dropout=0.1,
    ),
}


class Level(nn.Module):
    """One U-Net resolution: optional resampler, the block sequence, optional semantic mapper.

    Down levels resample *before* their blocks (LN + 2x2 stride-2 conv), up levels *after*
    (LN + 2x2 transposed conv). On the way up, the first ResBlock also takes the down-path
    features of the same level as skip.
    """

    def __init__(self, cfg: StageBConfig, i: int, up: bool):
        super().__init__()
        c, n = cfg.c_hidden[i], len(cfg.c_hidden)
        sem = cfg.c_cond if cfg.inject_sem[i] else 0
        self.up = up
        self.sem_mapper = nn.Conv2d(cfg.c_sem, cfg.c_cond, kernel_size=1) if cfg.inject_sem[i] else None
        self.resample = None
        if not up and i > 0:
            self.resample = nn.Sequential(
                LayerNorm2d(cfg.c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                nn.Conv2d(cfg.c_hidden[i - 1], c, kernel_size=2, stride=2),
            )
        if up and i > 0:
            self.resample = nn.Sequential(
                LayerNorm2d(c, elementwise_affine=False, eps=1e-6),
                nn.ConvTranspose2d(c, cfg.c_hidden[i - 1], kernel_size=2, stride=2),
            )
        blocks = []
        for j in range(cfg.blocks[i]):
            for k, kind in enumerate(cfg.level_config[i]):
                if kind == "C":
                    unet_skip = c if up and i < n - 1 and j == k == 0 else 0
                    blocks.append(ResBlock(c, unet_skip + sem, cfg.kernel_size, cfg.dropout))
                elif kind == "T":
                    blocks.append(TimestepBlock(c, cfg.c_r))
                elif kind == "A":
                    blocks.append(AttnBlock(c, cfg.c_cond, cfg.nhead[i], self_attn=True, dropout=cfg.dropout))
                else:
                    raise ValueError(f"unknown block type {kind!r}")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, r_embed: Tensor, text: Tensor, sem: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.resample is not None and not self.up:
            x = self.resample(x)
        sem_c = None
        if self.sem_mapper is not None:
            # Bicubic+antialias resize of the semantic map to this level (fp32: bicubic on bf16 is lossy).
            s = F.interpolate(sem.float(), size=x.shape[-2:], mode="bicubic", antialias=True, align_corners=True)
            sem_c = self.sem_mapper(s.to(sem.dtype))
        for j, blk in enumerate(self.blocks):
            if isinstance(blk, ResBlock):
                extra = [t for t in (skip if j == 0 else None, sem_c) if t is not None]
                x = blk(x, torch.cat(extra, dim=1) if extra else None)
            elif isinstance(blk, TimestepBlock):
                x = blk(x, r_embed)
            else:
                x = blk(x, text)
        if self.resample is not None and self.up:
            x = self.resample(x)
        return x


class StageB(nn.Module):
    """forward(x, r, sem, text) -> noise estimate, same shape as x.

    x: (B, c_in, H, W) noised Stage A latent; r: (B,) in [0, 1]; sem: (B, c_sem, h, w)
    compressor latent (zeros = unconditional); text: (B, L, c_clip) CLIP token states.
    """

    def __init__(self, cfg: StageBConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg = cfg
        n, p = len(cfg.c_hidden), cfg.patch_size
        self.text_mapper = nn.Linear(cfg.c_clip, cfg.c_cond)
        self.text_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.stem = nn.Sequential(
            nn.PixelUnshuffle(p),
            nn.Conv2d(cfg.c_in * p * p, cfg.c_hidden[0], kernel_size=1),
            LayerNorm2d(cfg.c_hidden[0], elementwise_affine=False, eps=1e-6),
        )
        self.down = nn.ModuleList([Level(cfg, i, up=False) for i in range(n)])
        self.up = nn.ModuleList([Level(cfg, i, up=True) for i in reversed(range(n))])
        self.head = nn.Sequential(
            LayerNorm2d(cfg.c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(cfg.c_hidden[0], 2 * cfg.c_in * p * p, kernel_size=1),
            nn.PixelShuffle(p),
        )
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)
        for level in list(self.down) + list(self.up):
            if level.sem_mapper is not None:
                nn.init.normal_(level.sem_mapper.weight, std=0.02)
            for blk in level.blocks:
                if isinstance(blk, ResBlock):
                    blk.mlp[-1].weight.data *= math.sqrt(1 / sum(self.cfg.blocks))
                elif isinstance(blk, TimestepBlock):
                    nn.init.zeros_(blk.mapper.weight)
        nn.init.normal_(self.text_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.stem[1].weight, gain=0.02)
        nn.init.zeros_(self.head[1].weight)

    def _run(self, level: Level, *args) -> Tensor:
        if self.cfg.grad_checkpointing and self.training:
            return checkpoint(level, *args, use_reentrant=False)
        return level(*args)

    def forward(self, x: Tensor, r: Tensor, sem: Tensor, text: Tensor, eps: float = 1e-3) -> Tensor:
        x_in = x
        text = self.text_norm(self.text_mapper(text))
        h = self.stem(x)
        r_embed = r_embedding(r, self.cfg.c_r).to(h.dtype)
        skips = []
        for level in self.down:
            h = self._run(level, h, r_embed, text, sem)
            skips.append(h)
        skips = skips[::-1]
        for k, level in enumerate(self.up):
            h = self._run(level, h, r_embed, text, sem, skips[k] if k > 0 else None)
        a, b = self.head(h).chunk(2, dim=1)
        # Network output form: predict (a, b) with b squashed into (eps, 1 - eps); eps = (x - a) / b.
        b = b.sigmoid() * (1 - 2 * eps) + eps
        return (x_in - a) / b
