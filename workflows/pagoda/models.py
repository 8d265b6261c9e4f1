"""PaGoDA's networks as the stages build them and read them back from exported artifacts.

An exported teacher or generator is its EMA safetensors plus ``model_config.json``, which says
how to rebuild the network (``unet``, ``generator``, ``text``: the CLIP the captions were encoded
with, ``resolution``; a generator also ``base_resolution`` and the ``teacher`` artifact it came from).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from genmodels import clip as clip_mod
from genmodels.pagoda import (
    EDMPrecond,
    Generator,
    GeneratorConfig,
    GrowthConfig,
    UNet,
    UNetConfig,
    grow_2x,
)
from genmodels.pagoda.unet import PRESETS as NET_PRESETS
from pipeline.store import Artifact, open_artifact
from workflows.text_clip import clip_model
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


def teacher_unet(t: Any) -> UNetConfig:
    """The teacher's network for a ``TeacherConfig``: its preset at its resolution, with text of the CLIP's
    token width, or of its pooled width with ``text_pooled`` (one token)."""
    width, embed = clip_mod.text_dims(t.clip) if t.text else (0, 0)
    return dataclasses.replace(TEACHER_PRESETS[t.preset], img_resolution=t.resolution,
                               text_dim=embed if t.text_pooled else width)


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


def growth_from_dict(d: dict[str, Any]) -> GrowthConfig:
    return GrowthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# The stages' model builders. fit() seeds the RNG with train.seed right before build_models
# (workflows/train/loop.py `_build`), so `initial_model` rebuilds a stage's starting point bit for bit.


def new_teacher(meta: dict[str, Any]) -> EDMPrecond:
    """Stage 1's network at random init (the RNG state decides the weights)."""
    return EDMPrecond(UNet(unet_from_dict(meta["unet"])), meta["sigma_data"])


def distill_init(teacher: Artifact, gcfg: GeneratorConfig) -> Generator:
    """Stage 2b's G: a full copy of the EMA teacher (Sec. 3.2); an omega embedding draws from the RNG."""
    return Generator.from_teacher(load_teacher(teacher)[0], gcfg)


def grow_init(parent: Artifact, gcfg: GrowthConfig) -> Generator:
    """Stage 3's G: the parent's EMA generator plus one fresh 2x level (drawn from the RNG), Sec. 3.3."""
    return grow_2x(load_one_step(parent)[0].train(), gcfg)


def init_seed(art: Artifact) -> int:
    """The seed a trained artifact's stage built its models under (train_config.json's ``seed``)."""
    return int(art.read_json("train_config.json").get("seed", 0)) if art.exists("train_config.json") else 0


def initial_model(art: Artifact) -> EDMPrecond | Generator:
    """The model of a teacher, distillation or growth artifact as its stage built it before the first
    step: the teacher's random init, the teacher copy, or the parent plus its fresh level, each under
    the stage's seed. Evaluation shows it as each model's floor."""
    meta = art.read_json("model_config.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(art))
        if meta["kind"] == "pagoda_teacher":
            return new_teacher(meta).eval().requires_grad_(False)
        if "growth" not in meta:
            return distill_init(open_artifact(meta["teacher"]), GeneratorConfig(**meta["generator"])).eval()
        if "parent" not in meta:
            raise ValueError(f"{art.uri}: model_config.json names no parent generator (written before growth "
                             "artifacts recorded it); rerun the growth stage for its initial model")
        return grow_init(open_artifact(meta["parent"]), growth_from_dict(meta["growth"])).eval()


class ClipImage(nn.Module):
    """[-1, 1] images -> CLIP image embeddings, differentiable in the input (CLIP regularization)."""

    def __init__(self, name: str, pretrained: str = ""):
        super().__init__()
        self.clip = clip_model(name, pretrained)

    def forward(self, x: Tensor) -> Tensor:
        return self.clip.encode_image(clip_mod.preprocess_tensor(self.clip, x), normalize=True)

