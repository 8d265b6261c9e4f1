"""Blocks shared by Würstchen Stage B (DiffNeXt) and Stage C (prior).

Paper: Würstchen (arXiv 2306.00637), Sec. 3 and Appendix: both diffusion networks are built
from ConvNeXt-V2-style residual blocks (depthwise conv, LayerNorm, 4x MLP with Global
Response Norm), a timestep block that modulates features with the noise level r, and an
attention block whose keys/values are the image tokens plus the mapped CLIP text tokens.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """Global Response Normalization (ConvNeXt-V2, Woo et al. 2023, Eq. 1-3) on NHWC input.

    Parameters keep the (1, 1, 1, dim) shape of the public checkpoints so weights map 1:1.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # per-channel energy over space
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)  # divisive normalization across channels
        return self.gamma * (x * n) + self.beta + x


class ResBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> [concat skip] -> Linear(4c) -> GELU -> GRN -> Linear(c).

    `c_skip` extra channels (U-Net skip and/or Stage-B semantic conditioning) are concatenated
    after the depthwise conv, so the spatial mixing stays depthwise and cheap while the
    channel MLP sees the conditioning (Stage B, Sec. 3.3). Stage C uses c_skip=0.
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        return x + self.mlp(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Affine modulation by the noise-level embedding: x * (1 + a(r)) + b(r)."""

    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: Tensor, r_embed: Tensor) -> Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class AttnBlock(nn.Module):
    """Pre-norm multi-head attention; keys/values = [image tokens, mapped condition tokens].

    With `self_attn=True` the query tokens are also part of the key/value sequence, i.e. one
    attention does both self- and cross-attention (Sec. 3.3, "AttnBlock").
    """

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        assert c % nhead == 0, (c, nhead)
        self.nhead = nhead
        self.self_attn = self_attn
        self.dropout = dropout
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        bsz, c, h, w = x.shape
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        kv = self.kv_mapper(cond)
        if self.self_attn:
            kv = torch.cat([q_in, kv], dim=1)

        def heads(t: Tensor) -> Tensor:
            return t.view(bsz, -1, self.nhead, c // self.nhead).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.q_proj(q_in)), heads(self.k_proj(kv)), heads(self.v_proj(kv)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        o = self.out_proj(o.transpose(1, 2).reshape(bsz, h * w, c))
        return x + o.transpose(1, 2).reshape(bsz, c, h, w)


def r_embedding(r: Tensor, c_r: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of the continuous noise level r = t in [0, 1] (Sec. 3.3).

    r is stretched to [0, max_positions] so the usual transformer frequencies apply.
    Returns (B, c_r) as [sin, cos] halves, zero-padded when c_r is odd.
    """
    half = c_r // 2
    # At least fp32: r * 1e4 in bf16 would lose the high-frequency phases.
    r = r.double() if r.dtype == torch.float64 else r.float()
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=r.device).float())
    args = (r * max_positions)[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb  # callers cast to the activation dtype


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform Linear/Conv weights and zero biases (the public code's default init)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
