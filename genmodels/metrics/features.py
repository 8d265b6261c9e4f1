"""Feature extractors for the metrics: images in [-1, 1], (N, C, H, W) → features.

Each builder returns a frozen `nn.Module` in eval mode (move it with `.to(device)`) that
resizes and normalises the images as its backbone expects, so callers never do it by hand.
Weights come from the libraries' own hubs (torchvision, timm); nothing is downloaded when
`pretrained=False`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageFeatures(nn.Module):
    """Resizes [-1, 1] images to `size`, normalises by (mean, std) of [0, 1] pixels, runs `net`."""

    def __init__(self, net: nn.Module, size: int, mean: tuple, std: tuple, interpolation: str = "bilinear"):
        super().__init__()
        self.net, self.size, self.interpolation = net, (size, size), interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor):
        x = images.to(self.mean.dtype)
        if x.shape[1] == 1:  # grayscale
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
        return self.net(((x + 1) / 2 - self.mean) / self.std)


class _PoolAndLogits(nn.Module):
    """Inception-v3 returning (pool3 features (N, 2048), class logits (N, 1000)) in one pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fc, model.fc = model.fc, nn.Identity()
        self.body = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool = self.body(x)
        return pool, self.fc(pool)


def inception_features(pretrained: bool = True) -> ImageFeatures:
    """torchvision Inception-v3 at 299×299 (bilinear): images → (pool3 2048-d, logits 1000-d).

    Pool3 features feed FID (Heusel et al. 2017), logits the Inception Score. torchvision's
    ImageNet weights differ from the TensorFlow graph behind published FIDs (pytorch-fid's
    port), so absolute values are only comparable within this project.
    """
    from torchvision.models import Inception_V3_Weights, inception_v3

    if pretrained:
        # The ported weights expect inputs in [-1, 1]; transform_input=False plus the
        # (0.5, 0.5) normalisation below feeds exactly that.
        model = inception_v3(weights=Inception_V3_Weights.DEFAULT, transform_input=False)
    else:
        model = inception_v3(weights=None, aux_logits=False, init_weights=True)
    model.aux_logits, model.AuxLogits = False, None  # unused in eval
    return ImageFeatures(_PoolAndLogits(model), 299, (0.5,) * 3, (0.5,) * 3, "bilinear")


def dinov2_features(
    name: str = "vit_small_patch14_dinov2.lvd142m", pretrained: bool = True, size: int = 224
) -> ImageFeatures:
    """timm DINOv2 ViT (class-token features) at `size`×`size`, bicubic, ImageNet-normalised.

    224 px follows FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation
    metrics", who use ViT-L/14: name="vit_large_patch14_dinov2.lvd142m"); timm resamples the
    position embeddings of the 518-px checkpoint.
    """
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=size)
    cfg = model.pretrained_cfg
    return ImageFeatures(model, size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))


def tiny_features(dim: int = 64, seed: int = 0, size: int = 32) -> ImageFeatures:
    """A random frozen 3-layer conv net (no weights to download) for tests and demos.

    Initialised from `seed` alone (the global RNG is neither used nor advanced), so demo
    numbers are reproducible across runs and machines. Images are resized to `size`×`size`.
    """
    with torch.device("meta"):  # build without running the default (global-RNG) init
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, dim, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)  # He init
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return ImageFeatures(net, size, (0.5,) * 3, (0.5,) * 3, "bilinear")
