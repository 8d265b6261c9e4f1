"""Würstchen semantic compressor: images -> the 16-channel semantic latent Stage C learns.

Paper Sec. 3.2 (arXiv 2306.00637): torchvision EfficientNetV2-S `features` (1280 channels,
stride 32), then a 1x1 conv to 16 channels and a non-affine BatchNorm, so the latent is
standardized. At 1024 px the image is resized to 768 px -> 16x24x24 (42x compression).
It is trained jointly with Stage B and frozen for Stage C; with several workers its BatchNorms
are synchronised (``sync_bn.convert_sync_batchnorm``, as v1 does with SyncBatchNorm).

The `tiny` preset swaps the backbone for four stride-2 Conv-BN-SiLU stages (stride 16) so the
whole pipeline runs on a CPU: a 64 px image -> 16x4x4.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet statistics, as expected by torchvision's pretrained EfficientNet.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CompressorConfig:
    backbone: str = "tiny"  # "tiny" or "efficientnet_v2_s"
    c_latent: int = 16
    # Images are resized by this factor before the backbone (paper: 1024 px -> 768 px).
    input_scale: float = 1.0
    tiny_widths: tuple[int, ...] = (16, 32, 48, 64)  # one stride-2 stage each
    pretrained: bool = False  # EfficientNet only: torchvision's ImageNet weights
    # The final BatchNorm's learned scale/shift. v3 (StableCascade modules/effnet.py) has none; the v2
    # compressor has one (diffusers examples/research_projects/wuerstchen EfficientNetEncoder), so
    # loading v2's weights needs True (workflows/wuerstchen/official.load_official_compressor).
    bn_affine: bool = False


PRESETS = {
    "tiny": CompressorConfig(),
    "paper": CompressorConfig(backbone="efficientnet_v2_s", input_scale=0.75, pretrained=True),
}


def _tiny_backbone(widths: tuple[int, ...]) -> nn.Sequential:
    layers, c_prev = [], 3
    for c in widths:
        layers += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU()]
        c_prev = c
    return nn.Sequential(*layers)


class SemanticCompressor(nn.Module):
    """forward(images in [-1, 1], (B, 3, H, W)) -> (B, c_latent, h, w) standardized latent."""

    def __init__(self, cfg: CompressorConfig = PRESETS["tiny"]):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "efficientnet_v2_s":
            import torchvision  # here, not at the top: the tiny preset (and its spawned test workers) skip ~3 s

            weights = torchvision.models.EfficientNet_V2_S_Weights.DEFAULT if cfg.pretrained else None
            self.backbone = torchvision.models.efficientnet_v2_s(weights=weights).features
            c_feat, self.stride = 1280, 32
        elif cfg.backbone == "tiny":
            self.backbone = _tiny_backbone(cfg.tiny_widths)
            c_feat, self.stride = cfg.tiny_widths[-1], 2 ** len(cfg.tiny_widths)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}")
        self.mapper = nn.Sequential(
            nn.Conv2d(c_feat, cfg.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(cfg.c_latent, affine=cfg.bn_affine),
        )

    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(round(s * self.cfg.input_scale) for s in image_hw)

    def latent_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of the latent for an image of size image_hw (e.g. 1024 -> 24 in paper)."""
        return tuple(-(-s // self.stride) for s in self.input_size(image_hw))

    def forward(self, images: Tensor) -> Tensor:
        x = images
        if self.cfg.input_scale != 1.0:
            x = F.interpolate(x, size=self.input_size(x.shape[-2:]), mode="bilinear", antialias=True)
        mean = torch.tensor(_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std
        return self.mapper(self.backbone(x))
