"""Würstchen Stage C: the text-conditional prior over the semantic latent.

Paper Sec. 3.3 / Fig. 3 (arXiv 2306.00637): a stack of [ResBlock, TimestepBlock, AttnBlock]
at constant resolution over the 16x24x24 EfficientNet latent, cross-attending to CLIP-bigG
text token states (not pooled). Sizes: paper (v2) c=1536, depth 32, 24 heads -> 993.6M params.
"""
import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genmodels.wuerstchen.common import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, init_weights, r_embedding


@dataclass(frozen=True)
class StageCConfig:
    c_in: int = 16  # semantic latent channels
    c: int = 64
    c_clip: int = 32  # width of the CLIP text token states
    c_r: int = 64
    depth: int = 2
    nhead: int = 4
    dropout: float = 0.0
    # Stage C diffuses x_C = (z + shift) / scale of the compressor latent z (v2 pipeline:
    # z = 42 * x_C - 1), which keeps the signal small next to unit-variance noise.
    latent_scale: float = 42.0
    latent_shift: float = 1.0
    grad_checkpointing: bool = False


PRESETS = {
    "tiny": StageCConfig(),
    "paper": StageCConfig(c=1536, c_clip=1280, depth=32, nhead=24, dropout=0.1),
}


class PriorBlock(nn.Module):
    """One depth step of the prior: ResBlock -> TimestepBlock -> AttnBlock(self + text)."""

    def __init__(self, cfg: StageCConfig):
        super().__init__()
        self.res = ResBlock(cfg.c, dropout=cfg.dropout)
        self.time = TimestepBlock(cfg.c, cfg.c_r)
        self.attn = AttnBlock(cfg.c, cfg.c, cfg.nhead, self_attn=True, dropout=cfg.dropout)

    def forward(self, x: Tensor, r_embed: Tensor, text: Tensor) -> Tensor:
        return self.attn(self.time(self.res(x), r_embed), text)


class StageC(nn.Module):
    """Predicts the noise of x_t given r = t and text token states (B, L, c_clip)."""

    def __init__(self, cfg: StageCConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg = cfg
        self.proj_in = nn.Conv2d(cfg.c_in, cfg.c, kernel_size=1)
        self.text_mapper = nn.Sequential(nn.Linear(cfg.c_clip, cfg.c), nn.LeakyReLU(0.2), nn.Linear(cfg.c, cfg.c))
        self.blocks = nn.ModuleList([PriorBlock(cfg) for _ in range(cfg.depth)])
        self.norm_out = LayerNorm2d(cfg.c, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Conv2d(cfg.c, cfg.c_in * 2, kernel_size=1)
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)
        nn.init.normal_(self.proj_in.weight, std=0.02)
        nn.init.normal_(self.text_mapper[0].weight, std=0.02)
        nn.init.normal_(self.text_mapper[2].weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)  # start as a (near) identity noise predictor
        for blk in self.blocks:
            # Scale residual branches by 1/sqrt(depth) so the stack starts near identity.
            blk.res.mlp[-1].weight.data *= math.sqrt(1 / self.cfg.depth)
            nn.init.zeros_(blk.time.mapper.weight)

    def forward(self, x: Tensor, r: Tensor, text: Tensor) -> Tensor:
        x_in = x
        h = self.proj_in(x)
        text = self.text_mapper(text)
        r_embed = r_embedding(r, self.cfg.c_r).to(h.dtype)
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(blk, h, r_embed, text, use_reentrant=False)
            else:
                h = blk(h, r_embed, text)
        a, b = self.proj_out(self.norm_out(h)).chunk(2, dim=1)
        # Network output form (Sec. 3.3): predict (a, b), return eps = (x - a) / |1 - b|.
        return (x_in - a) / ((1 - b).abs() + 1e-5)


def to_prior_space(z: Tensor, cfg: StageCConfig) -> Tensor:
    """Compressor latent z -> Stage C diffusion variable x_C = (z + shift) / scale."""
    return (z + cfg.latent_shift) / cfg.latent_scale


def from_prior_space(x: Tensor, cfg: StageCConfig) -> Tensor:
    """Stage C sample x_C -> compressor latent z = x_C * scale - shift (input of Stage B)."""
    return x * cfg.latent_scale - cfg.latent_shift

