"""Würstchen networks as the stages, the encoders and the sampler build and load them.

One place for: a network from a named size (``preset``) plus field overrides, a network from a
saved ``model_config.json``, a frozen trained network from a training artifact, the text
encoder config, and the set of three trained networks a sampler needs (``ModelSet``).
Training stages, encode stages and the sampler all import from here (and from nowhere else
in this package), so there is no import circle between them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from genmodels.clip import TINY, TextEncoder, text_dims
from genmodels.wuerstchen import (
    COMPRESSOR_PRESETS,
    STAGE_A_PRESETS,
    STAGE_B_PRESETS,
    STAGE_C_PRESETS,
    CompressorConfig,
    SemanticCompressor,
    StageA,
    StageAConfig,
    StageB,
    StageBConfig,
    StageC,
    StageCConfig,
)
from genmodels.wuerstchen.diffusion import linear_timesteps, stage_c_timesteps
from pipeline.store import Artifact
from workflows.text_clip import encoder, known_clip_model
from workflows.train import load_weights

# kind -> (network, its config class, named sizes)
MODELS = {
    "stage_a": (StageA, StageAConfig, STAGE_A_PRESETS),
    "stage_b": (StageB, StageBConfig, STAGE_B_PRESETS),
    "stage_c": (StageC, StageCConfig, STAGE_C_PRESETS),
    "compressor": (SemanticCompressor, CompressorConfig, COMPRESSOR_PRESETS),
}
Preset = Literal["tiny", "paper"]


def _typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """JSON/YAML values to the config's types (lists become tuples)."""
    hints = typing.get_type_hints(cls)
    return {k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
            for k, v in values.items()}


def check_overrides(kind: str, overrides: dict[str, Any], key: str = "overrides") -> None:
    names = {f.name for f in dataclasses.fields(MODELS[kind][1])}
    for k in overrides:
        if k not in names:
            raise ValueError(f"{key}.{k}: not a {MODELS[kind][1].__name__} field (fields: {', '.join(sorted(names))})")


def model_config(kind: str, preset: str, overrides: dict[str, Any] | None = None, **fixed: Any):
    """Preset → dataclasses.replace(overrides) → replace(fixed): fixed values come from the data."""
    cls = MODELS[kind][1]
    return dataclasses.replace(MODELS[kind][2][preset], **_typed(cls, {**(overrides or {}), **fixed}))


def build_module(kind: str, cfg: dict[str, Any] | Any) -> nn.Module:
    net, cls, _ = MODELS[kind]
    return net(cfg if isinstance(cfg, cls) else cls(**_typed(cls, cfg)))


def load_trained(art: Artifact, kind: str, raw: bool = False, meta: dict[str, Any] | None = None) -> nn.Module:
    """A frozen, eval-mode network from a training artifact (EMA weights unless ``raw``);
    ``meta``: its model_config.json when the caller has read it already."""
    cfg = dict((meta or art.read_json("model_config.json"))["modules"][kind])
    if kind == "compressor":
        cfg["pretrained"] = False  # the trained weights replace ImageNet's: no download
    module = build_module(kind, cfg)
    module.load_state_dict(load_weights(art, kind, raw=raw))
    return module.eval().requires_grad_(False)


def initial_module(art: Artifact, kind: str) -> nn.Module:
    """The network as its training stage built it before the first step (the loop seeds with
    ``train_config.json``'s seed, then builds): evaluation's floor for what training learned."""
    torch.manual_seed(int(art.read_json("train_config.json")["seed"]))
    return build_module(kind, art.read_json("model_config.json")["modules"][kind]).eval().requires_grad_(False)


def sem_latent_size(compressor: dict[str, Any] | CompressorConfig, image_size: int) -> tuple[int, int]:
    """The compressor's latent grid at ``image_size`` (built on the meta device: no weights)."""
    cfg = dataclasses.asdict(compressor) if isinstance(compressor, CompressorConfig) else compressor
    with torch.device("meta"):
        return build_module("compressor", dict(cfg, pretrained=False)).latent_size((image_size, image_size))


def stage_c_steps(n: int) -> torch.Tensor:
    """Stage C's sampling t's: the paper's schedule dense at high noise for its 29 steps, else linear."""
    return stage_c_timesteps() if n == 29 else linear_timesteps(n)


# ----------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class TextEncoderConfig:
    """The text encoder (``genmodels.clip.TextEncoder``).

    ``library="open_clip"`` (default): ``name`` is an open_clip model, ``pretrained`` its tag or a
    local checkpoint. Paper: ViT-H-14 for Stage B, ViT-bigG-14 for Stage C (laion2b tags,
    ``genmodels.clip.H14`` / ``BIGG``). ``library="transformers"``: ``name`` is a transformers
    CLIP text model (a local directory or a hub id, ``from_pretrained``) and ``tokenizer`` its
    tokenizer ("" = the same place), encoded with the tokenizer's padding mask exactly as the
    official diffusers Würstchen pipelines do (``TextEncoder.from_hf``); that is how the public
    v2 weights were trained, so ``official.py`` uses it.
    """

    name: str = TINY
    pretrained: str = ""  # open_clip tag or local checkpoint; "" = random, seeded (tiny only)
    library: Literal["open_clip", "transformers"] = "open_clip"
    tokenizer: str = ""  # transformers only: tokenizer directory or hub id ("" = name)

    def validate(self) -> None:
        if self.library == "transformers":
            if not self.name:
                raise ValueError("name: a transformers CLIP text model directory or hub id is required")
            if self.pretrained:
                raise ValueError("pretrained: open_clip only; with library=transformers, name is the weights")
            return
        if self.tokenizer:
            raise ValueError("tokenizer: transformers only (open_clip models bring their own)")
        if not known_clip_model(self.name):
            raise ValueError(f"name: unknown open_clip model {self.name!r}")

    @property
    def width(self) -> int:
        """Width of one token state (a network's ``c_clip``), from the model config alone."""
        if self.library == "transformers":
            import transformers

            cfg = transformers.AutoConfig.from_pretrained(self.name)
            return int(getattr(cfg, "text_config", cfg).hidden_size)  # a full CLIPModel or a text model
        return text_dims(self.name)[0]

    def build(self) -> TextEncoder:
        # tokens=0: all 77 last-layer states; Stages B and C attend to the unpooled context (§3),
        # so no pooled pass either.
        if self.library == "transformers":
            return TextEncoder.from_hf(*_hf_clip(self.name, self.tokenizer or self.name), tokens=0, pooled=False)
        return encoder(self.name, self.pretrained, tokens=0, pooled=False)


def _hf_clip(model: str, tokenizer: str):
    """(CLIP text model, tokenizer) through transformers' own loaders, as diffusers loads them."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model)
    # A checkpoint saved with its projection loads with it (text_embeds); a full CLIPModel or a
    # plain text model loads as CLIPTextModel (diffusers' Würstchen pipelines use that class).
    with_proj = "CLIPTextModelWithProjection" in (getattr(cfg, "architectures", None) or [])
    cls = transformers.CLIPTextModelWithProjection if with_proj else transformers.CLIPTextModel
    return cls.from_pretrained(model), transformers.AutoTokenizer.from_pretrained(tokenizer)


# ----------------------------------------------------------------------------------------------
# The three networks a sampler needs


@dataclass
class ModelSet:
    stage_a: nn.Module
    stage_b: nn.Module
    stage_c: nn.Module
    text_c: TextEncoderConfig
    text_b: TextEncoderConfig
    compressor: dict[str, Any]  # its config: fixes the semantic latent size for an image size
    image_size: int  # the resolution it was trained at
    guidance_c: float = 4.0  # the CFG scale Stage C recorded (model_config "sampler"); the paper's 4 without

    def to(self, device: torch.device) -> ModelSet:
        for m in (self.stage_a, self.stage_b, self.stage_c):
            m.to(device)
        return self

    def sem_size(self, image_size: int) -> tuple[int, int]:
        return sem_latent_size(self.compressor, image_size)


def load_trained_set(a: Artifact, b: Artifact, c: Artifact) -> ModelSet:
    """EMA Stage A, B and C from their training artifacts, with the text encoders they trained on."""
    mb, mc = b.read_json("model_config.json"), c.read_json("model_config.json")
    return ModelSet(stage_a=load_trained(a, "stage_a"), stage_b=load_trained(b, "stage_b", meta=mb),
                    stage_c=load_trained(c, "stage_c", meta=mc), text_c=TextEncoderConfig(**mc["text_encoder"]),
                    text_b=TextEncoderConfig(**mb["text_encoder"]), compressor=mb["modules"]["compressor"],
                    image_size=int(mb["resolution"]),
                    guidance_c=float(mc.get("sampler", {}).get("guidance_c", ModelSet.guidance_c)))
