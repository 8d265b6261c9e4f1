"""L_rec's feature space as the official code builds it (sony/pagoda cm/enc_dec_lib.py `get_xl_feature`,
`get_feature`; pg_modules/projector.py `F_RandomProj`; pg_modules/diffaug.py `DiffAugment`).

- Shared augmentation: per step and per feature net, one set of DiffAugment parameters (brightness,
  saturation, contrast, translation by up to 1/8 of the side, a cutout square of 1/5 of the side) is
  drawn and applied to the generated AND the target image (`gan_different_augment=False`,
  `prob_aug=1.0`, `shift_ratio=0.125`, `cutout_ratio=0.2`), after both were resized to the net's input
  size and before its normalization, differentiably for the generated image.
- Fixed random projection (`F_RandomProj`, proj_type=2, cout=64, expand=True): the frozen backbone's
  four maps go through randomly initialised, never trained 1x1 convs (cross-channel mixing, CCM: cout *
  2^k channels at level k) and a top-down cross-scale mixing (CSM: `FeatureFusionBlock`, add the level
  above, upsample 2x bilinear, 1x1 conv). ViT maps all share one grid, so the official code first
  reassembles them to 4x / 2x / 1x / 0.5x of it with random convs (feature_networks/vit.py,
  `_make_vit_b16_backbone`: 1x1 conv to C/8, C/4, C/2, C channels, then a 4x or 2x transposed conv or a
  stride-2 3x3 conv); we do the same whenever the maps share one size.
Our projection draws its weights from a fixed seed, so every worker, resume and stage sees the same one.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RecAugment:
    """The shared L_rec augmentation's ranges (official defaults: cm/script_util.py)."""

    translation_ratio: float = 0.125
    cutout_ratio: float = 0.2


def augment_params(b: int, h: int, w: int, device, translation_ratio: float = 0.125, cutout_ratio: float = 0.2,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One DiffAugment draw for a batch of b images of h x w (official ranges, diffaug.py)."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=generator.device if generator else device).to(device)

    def randint(lo, hi, *shape):
        g_dev = generator.device if generator else device
        return torch.randint(lo, hi, shape, generator=generator, device=g_dev).to(device)

    sh, sw = int(h * translation_ratio + 0.5), int(w * translation_ratio + 0.5)
    ch, cw = int(h * cutout_ratio + 0.5), int(w * cutout_ratio + 0.5)
    return {"brightness": rand(b, 1, 1, 1) - 0.5, "saturation": rand(b, 1, 1, 1) * 2,
            "contrast": rand(b, 1, 1, 1) + 0.5,
            "ty": randint(-sh, sh + 1, b, 1, 1), "tx": randint(-sw, sw + 1, b, 1, 1),
            "cy": randint(0, h + (1 - ch % 2), b, 1, 1), "cx": randint(0, w + (1 - cw % 2), b, 1, 1),
            "cut": torch.tensor([ch, cw])}


def apply_augment(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """DiffAugment with given parameters on images in [-1, 1]: color, translation (zero fill), cutout."""
    b, _, h, w = x.shape
    x = x + p["brightness"].to(x.dtype)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * p["saturation"].to(x.dtype) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * p["contrast"].to(x.dtype) + m
    # out[i, j] = x[i + ty, j + tx], zero outside (diffaug.py rand_translation): a pad that crops one
    # side and zero-fills the other, per image (cheaper than a gather, forward and backward)
    ty, tx = p["ty"].reshape(-1).tolist(), p["tx"].reshape(-1).tolist()
    x = torch.cat([F.pad(x[i:i + 1], [-tx[i], tx[i], -ty[i], ty[i]]) for i in range(b)])
    ch, cw = int(p["cut"][0]), int(p["cut"][1])
    y0, x0 = p["cy"] - ch // 2, p["cx"] - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
    return x * (~inside)[:, None].to(x.dtype)


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    # A 1x1 conv as one matrix product: the same numbers, several times faster than a small conv on a CPU.
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def bilinear_matrix(n: int, m: int, align_corners: bool, device=None, dtype=torch.float32) -> Tensor:
    """(m, n) weights of bilinear resampling from n to m >= n points along one axis, as F.interpolate
    computes them (no antialias: upsampling)."""
    dst = torch.arange(m, device=device, dtype=torch.float64)
    src = dst * (n - 1) / max(m - 1, 1) if align_corners else ((dst + 0.5) * n / m - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = src - lo
    u = torch.zeros(m, n, device=device, dtype=torch.float64)
    rows = torch.arange(m, device=device)
    u.index_put_((rows, lo), 1 - frac, accumulate=True)
    u.index_put_((rows, hi), frac, accumulate=True)
    return u.to(dtype)


def upsample(x: Tensor, h: int, w: int, align_corners: bool) -> Tensor:
    """F.interpolate(x, (h, w), mode="bilinear", align_corners=...) for h, w >= x's, as two small matrix
    products (separable weights): equal to ~1e-6, and its backward is several times faster on a CPU."""
    uh = bilinear_matrix(x.shape[-2], h, align_corners, x.device, x.dtype)
    uw = uh if (x.shape[-1], w) == (x.shape[-2], h) else bilinear_matrix(x.shape[-1], w, align_corners, x.device,
                                                                        x.dtype)
    return uh @ x @ uw.T


def upsample2x(x: Tensor) -> Tensor:
    """2x bilinear upsampling with align_corners=True (the official FeatureFusionBlock's)."""
    return upsample(x, 2 * x.shape[-2], 2 * x.shape[-1], align_corners=True)


def _fuse(prev: Tensor | None, cur: Tensor, conv: nn.Conv2d) -> Tensor:
    """FeatureFusionBlock: add the (upsampled) level above, upsample 2x bilinear, 1x1 conv. The conv runs
    before the upsampling here: both are linear and the bilinear weights sum to 1, so the order does not
    change the result, and the conv sees 4x fewer pixels."""
    if prev is not None:
        if prev.shape[-2:] != cur.shape[-2:]:
            prev = F.interpolate(prev, size=cur.shape[-2:], mode="bilinear", align_corners=True)
        cur = cur + prev
    return upsample2x(_conv1x1(conv, cur))


class RandomProjection(nn.Module):
    """Frozen random CCM + CSM over a list of feature maps (F_RandomProj, proj_type=2)."""

    def __init__(self, channels: list[int], cout: int = 64, expand: bool = True, reassemble: bool = False,
                 seed: int = 0):
        super().__init__()
        n = len(channels)
        if reassemble and n > 4:
            raise ValueError(f"RandomProjection: can reassemble at most 4 same-size maps, got {n}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reassemble = nn.ModuleList()
            if reassemble:  # 4x, 2x, 1x, 0.5x of the token grid for the top-most n levels
                for k, c in enumerate(channels):
                    width, factor = max(1, c >> (n - 1 - k)), 2.0 ** (n - 2 - k)
                    layers: list[nn.Module] = [nn.Conv2d(c, width, 1)]
                    if factor > 1:
                        layers.append(nn.ConvTranspose2d(width, width, int(factor), stride=int(factor)))
                    elif factor < 1:
                        layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                    self.reassemble.append(nn.Sequential(*layers))
                channels = [max(1, c >> (n - 1 - k)) for k, c in enumerate(channels)]
            mixed = [cout * 2**k if expand else cout for k in range(n)]
            self.ccm = nn.ModuleList(nn.Conv2d(c, m, 1) for c, m in zip(channels, mixed))
            self.csm = nn.ModuleList(nn.Conv2d(m, m // 2 if expand and k > 0 else m, 1) for k, m in enumerate(mixed))
        self.channels = [conv.out_channels for conv in self.csm]
        self.requires_grad_(False)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(self.reassemble):
            feats = [f(x) for f, x in zip(self.reassemble, feats)]
        mixed = [_conv1x1(conv, x.float()) for conv, x in zip(self.ccm, feats)]
        out, prev = [None] * len(mixed), None
        for k in reversed(range(len(mixed))):
            prev = out[k] = _fuse(prev, mixed[k], self.csm[k])
        return out


class ProjectedFeatures(nn.Module):
    """A frozen feature net followed by its fixed random projection; ``size`` is the net's input size."""

    def __init__(self, net: nn.Module, channels: list[int], cout: int = 64, seed: int = 0):
        super().__init__()
        self.net, self.size = net, getattr(net, "size", None)
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.size or 32, self.size or 32)
            sizes = {tuple(f.shape[-2:]) for f in net(probe)}
        self.proj = RandomProjection(channels, cout, reassemble=len(channels) > 1 and len(sizes) == 1, seed=seed)
        self.channels = self.proj.channels

    def train(self, mode: bool = True) -> "ProjectedFeatures":
        super().train(mode)
        self.net.train(mode)  # a FrozenFeatures keeps its backbone in eval mode
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.proj(self.net(x))
