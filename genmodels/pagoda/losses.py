"""PaGoDA generator/discriminator losses (Sec. 3.2-3.3, Sec. 4.2, App. D).

- L_rec: perceptual distance between G(z_inv, c) and the real image: channel-normalized feature
  L2 (LPIPS without learned weights) from frozen feature networks at 224^2. The reference code
  uses DeiT-B + EfficientNet-lite0 (`build_timm_features`), each followed by a fixed random
  projection, with one random augmentation shared by both images (perceptual.py); any callable
  images -> feature maps works.
- L_adv: hinge GAN losses; the generator term is weighted by the VQGAN adaptive weight
  lambda = clip(||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4), 0.01, 10), W = the last decoder
  ResBlock's output conv (official) or the output head (`Generator.adaptive_layer`).
- L_dstl (text-to-image): the same perceptual distance to the teacher's CFG-omega ODE solution.
- CLIP regularization (text-to-image): 1 - cos(image embedding of G's output, text embedding).
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genmodels.pagoda.perceptual import RecAugment, apply_augment, augment_params, upsample

FeatureNet = Callable[[Tensor], list[Tensor]]


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear to size x size: antialiased when shrinking; growing by matrix products (same numbers)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] <= size and x.shape[-2] <= size:
        return upsample(x, size, size, align_corners=False)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


class FrozenFeatures(nn.Module):
    """A frozen pretrained backbone: images in [-1, 1] -> list of (B, C, H, W) intermediate maps.

    Inputs are resized to `size` and normalized with the backbone's mean/std. Weights never
    train and the backbone stays in eval mode, but gradients flow to the input (G learns through it).
    """

    def __init__(self, backbone: nn.Module, layers: Sequence[int], size: int = 224,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.layers, self.size = list(layers), size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / batch-norm statistics updates
        return self

    @property
    def channels(self) -> list[int]:
        with torch.no_grad():
            x = torch.zeros(1, 3, self.size, self.size, device=self.mean.device)
            return [f.shape[1] for f in self(x)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = (resize(x.float(), self.size) + 1) / 2
        x = (x - self.mean) / self.std
        return self.backbone.forward_intermediates(x, indices=self.layers, intermediates_only=True)


def build_timm_features(name: str = "tf_efficientnet_lite0", layers: Sequence[int] = (1, 2, 3, 4),
                        size: int = 224, pretrained: bool = True) -> FrozenFeatures:
    """Frozen timm backbone, e.g. 'tf_efficientnet_lite0' (layers 1-4) or
    'deit_base_distilled_patch16_224' / 'vit_small_patch16_224.dino' (blocks 2, 5, 8, 11)."""
    import timm  # here, not at the top: timm (with torchvision) costs seconds in every process that
    # imports this module, and only paper-size runs build a timm backbone

    model = timm.create_model(name, pretrained=pretrained)
    cfg = model.pretrained_cfg
    return FrozenFeatures(model, layers, size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))


class TinyFeatures(nn.Module):
    """A frozen random conv net with the FrozenFeatures interface, for tests and `tiny` configs."""

    def __init__(self, channels: Sequence[int] = (8, 16), size: int = 32, seed: int = 0):
        super().__init__()
        self.size = size
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for c in channels:
            conv = nn.Conv2d(cin, c, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (cin * 9) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            cin = c
        self.convs = nn.ModuleList(layers).requires_grad_(False)
        self.channels = list(channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        x, feats = resize(x.float(), self.size), []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x)
        return feats


def _normalize_channels(f: Tensor, eps: float = 1e-8) -> Tensor:
    # times rsqrt, not divided by sqrt: the same numbers, and a broadcast division over channels is the
    # slowest op of the whole distance on a CPU
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)


def perceptual_distance(features: FeatureNet | Sequence[FeatureNet], x: Tensor, y: Tensor,
                        augment: RecAugment | None = None) -> Tensor:
    """Per-sample sum over layers (and nets) of the spatial mean of ||n(f(x)) - n(f(y))||^2,
    n = unit L2 norm over channels (LPIPS Eq. 1 with unit weights; sony/pagoda cm/karras_diffusion.py
    `get_recon_loss`, loss_norm=cnn_vit). The target y gets no graph. With ``augment``, x and y are
    resized to each net's input size and take the same random DiffAugment draw, one per net and call
    (cm/enc_dec_lib.py `get_xl_feature`, see perceptual.py)."""
    nets = features if isinstance(features, (list, tuple)) else [features]
    total = x.new_zeros(x.shape[0], dtype=torch.float32)
    for net in nets:
        xa, ya = x, y
        if augment is not None:
            size = getattr(net, "size", None)
            xa, ya = (resize(x.float(), size), resize(y.float(), size)) if size else (x.float(), y.float())
            p = augment_params(x.shape[0], xa.shape[-2], xa.shape[-1], x.device, augment.translation_ratio,
                               augment.cutout_ratio)
            xa, ya = apply_augment(xa, p), apply_augment(ya, p)
        fx = net(xa)
        with torch.no_grad():
            fy = net(ya)
        for a, b in zip(fx, fy):
            d = (_normalize_channels(a.float()) - _normalize_channels(b.float())).pow(2).sum(dim=1)
            total = total + d.flatten(1).mean(dim=1)
    return total


def rec_loss(features: FeatureNet | Sequence[FeatureNet], x: Tensor, target: Tensor,
             augment: RecAugment | None = None) -> Tensor:
    """L_rec (Sec. 3.2) and, with the teacher's ODE solution as target, L_dstl (Sec. 4.2)."""
    return perceptual_distance(features, x, target, augment).mean()


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """E relu(1 - D(x)) + E relu(1 + D(G(z))), averaged over all (per-token) logits."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """L_adv = -E D(G(z))."""
    return -fake_logits.mean()


def last_layer_grad_norm(loss: Tensor, weight: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    return grad.norm()


def adaptive_weight(loss_rec: Tensor | None, loss_adv: Tensor, weight: Tensor, lo: float = 0.01, hi: float = 10.0,
                    eps: float = 1e-4, rec_grad_norm: Tensor | None = None) -> Tensor:
    """lambda = clip(||grad_W L_rec|| / (||grad_W L_adv|| + eps), lo, hi), detached (VQGAN, Esser et al. 2021).

    Pass `rec_grad_norm` instead of `loss_rec` when the reconstruction gradient was taken elsewhere.
    """
    g_rec = rec_grad_norm if rec_grad_norm is not None else last_layer_grad_norm(loss_rec, weight)
    g_adv = last_layer_grad_norm(loss_adv, weight)
    return (g_rec / (g_adv + eps)).clamp(lo, hi).detach()


def clip_loss(image_embed: Callable[[Tensor], Tensor], images: Tensor, text_embed: Tensor) -> Tensor:
    """CLIP regularization (Sec. 4.2): mean 1 - cos(E_img(G(z, c)), E_txt(c)).

    `image_embed` maps [-1, 1] images to (B, D) embeddings differentiably (resize/normalize inside),
    e.g. a closure around genmodels.clip.encode_image; `text_embed` is the pooled (B, D) text embedding.
    """
    e = F.normalize(image_embed(images).float(), dim=-1)
    t = F.normalize(text_embed.float(), dim=-1)
    return (1 - (e * t).sum(dim=-1)).mean()
