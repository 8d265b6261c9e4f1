"""PaGoDA's networks as the stages build them and read them back from exported artifacts.

An exported teacher or generator is its EMA safetensors plus ``model_config.json``, which says
how to rebuild the network (``unet``, ``generator``, ``text``: the CLIP the captions were encoded
with, ``resolution``; a generator also ``base_resolution`` and the ``teacher`` artifact it came from).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from genmodels import clip as clip_mod
from genmodels.pagoda import (
    EDMPrecond,
    Generator,
    GeneratorConfig,
    UNet,
    UNetConfig,
)
from genmodels.pagoda.unet import PRESETS as NET_PRESETS
from pipeline.store import Artifact
from workflows.train import load_weights

# Teacher presets (the teacher's ``preset`` key); the stage sets img_resolution and text_dim. "micro"
# (the CI demo) is "tiny" at half the width and without attention, 4x cheaper per evaluation for the
# 78-evaluation inversion on a 2-core CPU; text then conditions through the pooled embedding added to
# the time embedding.
TEACHER_PRESETS = {
    "micro": dataclasses.replace(NET_PRESETS["tiny"], num_classes=0, model_channels=16, attn_resolutions=()),
    "tiny": dataclasses.replace(NET_PRESETS["tiny"], num_classes=0),
    "paper": dataclasses.replace(NET_PRESETS["paper64"], num_classes=0),  # EDM's ADM (Sec. 5, App. D)
}


def unet_from_dict(d: dict[str, Any]) -> UNetConfig:
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_teacher(art: Artifact) -> tuple[EDMPrecond, dict[str, Any]]:
    """The frozen EMA teacher of a ``pagoda_teacher`` artifact, and its model_config."""
    meta = art.read_json("model_config.json")
    teacher = EDMPrecond(UNet(unet_from_dict(meta["unet"])), meta["sigma_data"])
    teacher.load_state_dict(load_weights(art, "teacher"))
    return teacher.eval().requires_grad_(False), meta


def load_one_step(art: Artifact) -> tuple[Generator, dict[str, Any]]:
    """The EMA one-step generator of a distillation or growth artifact, and its model_config."""
    meta = art.read_json("model_config.json")
    gen = Generator(UNet(unet_from_dict(meta["unet"])), GeneratorConfig(**meta["generator"]))
    gen.load_state_dict(load_weights(art, "generator"))
    return gen.eval(), meta


class ClipImage(nn.Module):
    """[-1, 1] images -> CLIP image embeddings, differentiable in the input (CLIP regularization)."""

    def __init__(self, name: str, pretrained: str = ""):
        super().__init__()
        self.clip = clip_mod.build_clip(name, pretrained or None)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.clip.encode_image(clip_mod.preprocess_tensor(self.clip, x), normalize=True)

