"""ADM U-Net (Dhariwal & Nichol 2021), the teacher and generator backbone of PaGoDA.

PaGoDA Sec. 5 / App. D: the base model is EDM's ImageNet-64 ADM (192 ch, mult 1-2-3-4,
3 res blocks, attention at 32/16/8 with 64-channel heads, scale-shift norm, resblock
up/down). This file is the network only: it maps (c_in * x, c_noise, condition) to the raw
output F. EDM preconditioning lives in edm.py, the one-step wrapper in generator.py.

The decoder is a flat ordered dict whose blocks say whether they pop a skip connection, so
growth.py can append 2x levels past the encoder resolution (`UNetConfig.grown`, Sec. 3.3)
that take no skips.

Text conditioning (our choice; the paper's DeepFloyd-IF teacher works the same way):
token states (B, L, text_dim), e.g. CLIP `encode_text_tokens`, are LayerNorm-ed, their
masked mean is projected and added to the time embedding, and every attention block also
attends to them (token keys/values concatenated to the image keys/values). A pooled
(B, text_dim) input is treated as a single token. The null condition is all zeros (label -1
or a zero one-hot row, zero text), which is what condition dropout feeds for CFG.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    img_resolution: int = 16  # encoder resolution = teacher / latent resolution
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    channels_per_head: int = 16
    dropout: float = 0.0
    num_classes: int = 0  # 0: no class conditioning
    text_dim: int = 0  # width of text token states; 0: no text conditioning
    emb_mult: int = 4  # time-embedding width = emb_mult * model_channels
    grown: tuple[int, ...] = ()  # channels of each 2x decoder level added by growth.grow_2x
    grown_blocks: int = 2  # plain ResBlocks after the up-ResBlock of a grown level (Sec. 3.3)

    @property
    def out_resolution(self) -> int:
        return self.img_resolution * 2 ** len(self.grown)


PRESETS = {
    "tiny": UNetConfig(num_classes=10),
    "tiny_text": UNetConfig(text_dim=32),
    # EDM's ADM for class-conditional ImageNet-64 (EDM Table 7: 296M parameters).
    "paper64": UNetConfig(
        img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
        attn_resolutions=(32, 16, 8), channels_per_head=64, dropout=0.1, num_classes=1000,
    ),
    # Same backbone with text conditioning from CLIP ViT-L/14 token states (width 768).
    "paper64_text": UNetConfig(
        img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
        attn_resolutions=(32, 16, 8), channels_per_head=64, dropout=0.1, text_dim=768,
    ),
}


def group_norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in ADM, fewer for the tiny widths (at least 4 channels per group).
    return nn.GroupNorm(min(32, ch // 4), ch, eps=1e-5)


def zero_init(module: nn.Module) -> nn.Module:
    # Residual branches and the output start at zero (ADM), so a fresh block is the identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def positional_embedding(x: Tensor, channels: int, max_positions: float = 10000.0) -> Tensor:
    """Transformer sinusoids of a per-sample scalar (B,) -> (B, channels) (ADM timestep_embedding)."""
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=x.device) / half
    freqs = (1.0 / max_positions) ** freqs
    args = x.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def as_onehot(label: Tensor, num_classes: int) -> Tensor:
    """Integer labels (B,) to one-hot (B, K); negative labels mean "no label" (zero row, CFG)."""
    if label.is_floating_point():
        return label
    onehot = F.one_hot(label.clamp(min=0), num_classes).float()
    return onehot * (label >= 0).float()[:, None]


class Attention(nn.Module):
    """ADM self-attention over pixels; keys/values optionally extended by text tokens."""

    def __init__(self, ch: int, channels_per_head: int, text_dim: int = 0):
        super().__init__()
        self.heads = max(1, ch // channels_per_head)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.kv_text = nn.Linear(text_dim, 2 * ch) if text_dim else None
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor, ctx: Tensor | None = None, ctx_mask: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w).transpose(-1, -2).unbind(1)
        mask = None
        if self.kv_text is not None and ctx is not None:
            kt, vt = self.kv_text(ctx).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k, kt], dim=2), torch.cat([v, vt], dim=2)
            if ctx_mask is not None:
                keep = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
                mask = torch.cat([keep, ctx_mask.bool()], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, HW, d)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm, optional 2x up/down and attention.

    h = conv1(drop(SiLU(GN(conv0(resample(SiLU(GN(x))))) * (1 + scale) + shift))); x' = skip(x) + h.
    """

    def __init__(
        self, cin: int, cout: int, emb_ch: int, *, up: bool = False, down: bool = False,
        attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
        text_dim: int = 0, takes_skip: bool = False,
    ):
        super().__init__()
        self.up, self.down, self.takes_skip = up, down, takes_skip
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_ch, 2 * cout)
        self.norm1 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = Attention(cout, channels_per_head, text_dim) if attention else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor, ctx: Tensor | None = None, ctx_mask: Tensor | None = None) -> Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        x = self._resample(x)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.attn is not None:
            x = self.attn(x, ctx, ctx_mask)
        return x


class UNet(nn.Module):
    """ADM U-Net: forward(x_in, c_noise, label, text, text_mask, emb_extra) -> F.

    Module names are stable across growth: `map_*` embeddings, `enc["{r}x{r}_conv|down|blockI"]`,
    `mid["in0"|"in1"]`, `dec["{r}x{r}_up|blockI"]`, `out_norm`, `out_conv`.
    """

    def __init__(self, cfg: UNetConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        self.emb_channels = emb = mc * cfg.emb_mult
        blk = {
            "emb_ch": emb, "channels_per_head": cfg.channels_per_head, "dropout": cfg.dropout, "text_dim": cfg.text_dim
        }

        self.map_layer0 = nn.Linear(mc, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = None
        if cfg.num_classes:
            self.map_label = nn.Linear(cfg.num_classes, emb, bias=False)
            nn.init.normal_(self.map_label.weight, std=emb**-0.5)  # EDM's init for the label map
        self.text_norm = nn.LayerNorm(cfg.text_dim) if cfg.text_dim else None
        self.map_text = nn.Linear(cfg.text_dim, emb) if cfg.text_dim else None

        self.enc = nn.ModuleDict()
        skips, cout = [], cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cout, mc * mult, 3, padding=1)
                cout = mc * mult
            else:
                self.enc[f"{res}x{res}_down"] = ResBlock(cout, cout, down=True, **blk)
            skips.append(cout)
            for i in range(cfg.num_blocks):
                attn = res in cfg.attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = ResBlock(cout, mc * mult, attention=attn, **blk)
                cout = mc * mult
                skips.append(cout)

        self.mid = nn.ModuleDict(
            {"in0": ResBlock(cout, cout, attention=True, **blk), "in1": ResBlock(cout, cout, **blk)}
        )

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level != len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_up"] = ResBlock(cout, cout, up=True, **blk)
            for i in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                self.dec[f"{res}x{res}_block{i}"] = ResBlock(
                    cin, cout, attention=res in cfg.attn_resolutions, takes_skip=True, **blk
                )
        res = cfg.img_resolution
        for ch in cfg.grown:  # PaGoDA Sec. 3.3: up-ResBlock + plain ResBlocks, no attention, no skips
            res *= 2
            self.dec[f"{res}x{res}_up"] = ResBlock(cout, ch, up=True, **blk)
            cout = ch
            for i in range(cfg.grown_blocks):
                self.dec[f"{res}x{res}_block{i}"] = ResBlock(cout, cout, **blk)

        self.out_norm = group_norm(cout)
        self.out_conv = zero_init(nn.Conv2d(cout, cfg.out_channels, 3, padding=1))

    @staticmethod
    def decoder_names(cfg: UNetConfig) -> list[str]:
        """Names of `dec`'s blocks in forward order, from the config alone (no weights built)."""
        names = []
        for level in reversed(range(len(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            if level != len(cfg.channel_mult) - 1:
                names.append(f"{res}x{res}_up")
            names += [f"{res}x{res}_block{i}" for i in range(cfg.num_blocks + 1)]
        res = cfg.img_resolution
        for _ in cfg.grown:
            res *= 2
            names += [f"{res}x{res}_up"] + [f"{res}x{res}_block{i}" for i in range(cfg.grown_blocks)]
        return names

    def embed(
        self, c_noise: Tensor, label: Tensor | None = None, text: Tensor | None = None,
        text_mask: Tensor | None = None, emb_extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Time (+ label, pooled text, extra) embedding and normalized text tokens."""
        emb = self.map_layer1(F.silu(self.map_layer0(positional_embedding(c_noise, self.cfg.model_channels))))
        if self.map_label is not None and label is not None:
            emb = emb + self.map_label(as_onehot(label, self.cfg.num_classes).to(emb.dtype))
        ctx = None
        if self.text_norm is not None and text is not None:
            ctx = self.text_norm(text[:, None] if text.ndim == 2 else text)
            if text_mask is None or text.ndim == 2:
                w = torch.ones(ctx.shape[:2], device=ctx.device)
            else:
                w = text_mask.float()
            pooled = (ctx * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
            emb = emb + self.map_text(pooled)
        if emb_extra is not None:
            emb = emb + emb_extra
        return F.silu(emb), ctx

    def trunk(
        self, x: Tensor, c_noise: Tensor, label: Tensor | None = None, text: Tensor | None = None,
        text_mask: Tensor | None = None, emb_extra: Tensor | None = None, grad_tail: int | None = None,
    ) -> Tensor:
        """Everything up to the output head; `head(trunk(...))` is the forward pass.

        grad_tail=k runs all but the last k decoder blocks without autograd (gradients can then reach
        only those k blocks and the head); None records the whole graph.
        """
        n_dec = len(self.dec)
        tail_from = n_dec - grad_tail if grad_tail is not None else 0
        with torch.no_grad() if grad_tail is not None else contextlib.nullcontext():
            emb, ctx = self.embed(c_noise, label, text, text_mask, emb_extra)
            mask = text_mask if text is not None and text.ndim == 3 else None
            skips = []
            for name, block in self.enc.items():
                x = block(x) if name.endswith("_conv") else block(x, emb, ctx, mask)
                skips.append(x)
            for block in self.mid.values():
                x = block(x, emb, ctx, mask)
        for i, block in enumerate(self.dec.values()):
            with torch.no_grad() if i < tail_from else contextlib.nullcontext():
                if block.takes_skip:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, ctx, mask)
        return x

    def head(self, h: Tensor) -> Tensor:
        return self.out_conv(F.silu(self.out_norm(h)))

    def forward(
        self, x: Tensor, c_noise: Tensor, label: Tensor | None = None, text: Tensor | None = None,
        text_mask: Tensor | None = None, emb_extra: Tensor | None = None,
    ) -> Tensor:
        return self.head(self.trunk(x, c_noise, label, text, text_mask, emb_extra))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
