"""Würstchen pipeline stages: train A → encode → train B (+ compressor) → encode → train C → sample.

    shard ─► stage_a ─► encode_a ─► stage_b ─► encode_semantic ─► stage_c ─► sample (A, B, C)
      (every name prefixed wuerstchen_; both encodes also read the shard)

Training order is the paper's (arXiv 2306.00637, Sec. 3 / wuerstchen.md): A first, then B
jointly with the semantic compressor on precomputed Stage A latents, then C on precomputed,
frozen compressor latents. Every training stage is a ``TrainSpec`` (plain PyTorch, the step
functions of ``genmodels.wuerstchen.steps``) handed to the shared harness
(``workflows.train.fit``: Ray Train + DeepSpeed), which exports EMA weights,
``model_config.json`` (everything needed to rebuild the networks), metrics and previews.

Text encoders: tiny configs use ``tiny-clip`` (width 64) and set each network's ``c_clip``
from the encoder actually used, so a preset never disagrees with its token states.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from genmodels.wuerstchen import (
    COMPRESSOR_PRESETS,
    STAGE_A_PRESETS,
    STAGE_B_PRESETS,
    STAGE_C_PRESETS,
    CompressorConfig,
    SemanticCompressor,
    StageA,
    StageAConfig,
    StageALossConfig,
    StageB,
    StageBConfig,
    StageBLossConfig,
    StageC,
    StageCConfig,
    StageCLossConfig,
    sample_stage_b,
    sample_stage_c,
    stage_a_loss,
    stage_b_loss,
    stage_c_loss,
)
from genmodels.wuerstchen.diffusion import linear_timesteps, stage_c_timesteps
from workflows import wuerstchen_encode as enc
from workflows.stage import Stage
from workflows.store import Artifact
from workflows.train import OptimGroup, TrainConfig, TrainSpec, fit, load_weights, train_resources

# kind -> (network, its config class, named sizes)
MODELS = {
    "stage_a": (StageA, StageAConfig, STAGE_A_PRESETS),
    "stage_b": (StageB, StageBConfig, STAGE_B_PRESETS),
    "stage_c": (StageC, StageCConfig, STAGE_C_PRESETS),
    "compressor": (SemanticCompressor, CompressorConfig, COMPRESSOR_PRESETS),
}
Preset = Literal["tiny", "paper"]


# ----------------------------------------------------------------------------------------------
# Networks from presets and from saved model_config.json


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


def build_module(kind: str, cfg: dict[str, Any] | Any):
    net, cls, _ = MODELS[kind]
    return net(cfg if isinstance(cfg, cls) else cls(**_typed(cls, cfg)))


def load_trained(art: Artifact, kind: str, raw: bool = False, meta: dict[str, Any] | None = None):
    """A frozen, eval-mode network from a training artifact (EMA weights unless ``raw``);
    ``meta``: its model_config.json when the caller has read it already."""
    cfg = dict((meta or art.read_json("model_config.json"))["modules"][kind])
    if kind == "compressor":
        cfg["pretrained"] = False  # the trained weights replace ImageNet's: no download
    module = build_module(kind, cfg)
    module.load_state_dict(load_weights(art, kind, raw=raw))
    return module.eval().requires_grad_(False)


def sem_latent_size(compressor: dict[str, Any] | CompressorConfig, image_size: int) -> tuple[int, int]:
    """The compressor's latent grid at ``image_size`` (built on the meta device: no weights)."""
    cfg = dataclasses.asdict(compressor) if isinstance(compressor, CompressorConfig) else compressor
    with torch.device("meta"):
        return build_module("compressor", dict(cfg, pretrained=False)).latent_size((image_size, image_size))


def stage_c_steps(n: int) -> torch.Tensor:
    """Stage C's sampling t's: the paper's schedule dense at high noise for its 29 steps, else linear."""
    return stage_c_timesteps() if n == 29 else linear_timesteps(n)


# ----------------------------------------------------------------------------------------------
# Configs


# Laptop-sized defaults of every Würstchen training stage (YAML overrides any field).
_TRAIN = {"batch_size": 16, "lr": 1e-3, "total_steps": 2000, "log_every": 10, "preview_images": 8}


@dataclass(frozen=True)
class _TrainStage:
    preset: Preset = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # network config fields over the preset
    # Small data (demo, tests): read the training rows once in the driver into Ray's object store
    # instead of streaming the files every epoch. Leave off for real shards.
    in_memory: bool = False
    kind: typing.ClassVar[str] = ""

    def validate(self) -> None:
        check_overrides(self.kind, self.overrides)
        if self.train.preview_images < 1:
            raise ValueError("train.preview_images: must be >= 1")


@dataclass(frozen=True)
class StageATrainConfig(_TrainStage):
    resolution: int = 64  # trains on the shard's jpg_{R}
    heldout_fraction: float = 0.1
    perceptual: Literal["none", "vgg16"] = "none"  # vgg16: torchvision ImageNet VGG16 relu3_3 features
    # unquantized_weight > 0: the decoder also learns to read continuous latents, which is how v2 (and
    # encode_a, Stage B, sampling) use Stage A; needed with a small or young codebook. Paper: 0.
    loss: StageALossConfig = field(default_factory=lambda: StageALossConfig(unquantized_weight=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_TRAIN))
    kind: typing.ClassVar[str] = "stage_a"

    def validate(self) -> None:
        super().validate()
        if self.resolution < 8 or self.resolution % 4:
            raise ValueError(f"resolution: expected a multiple of 4 >= 8, got {self.resolution}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction: expected [0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class StageBTrainConfig(_TrainStage):
    compressor_preset: Preset = "tiny"  # paper: EfficientNetV2-S with torchvision's ImageNet weights
    compressor_overrides: dict[str, Any] = field(default_factory=dict)
    loss: StageBLossConfig = field(default_factory=StageBLossConfig)
    preview_steps: int = 12
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_TRAIN))
    kind: typing.ClassVar[str] = "stage_b"

    def validate(self) -> None:
        super().validate()
        check_overrides("compressor", self.compressor_overrides, "compressor_overrides")


@dataclass(frozen=True)
class StageCTrainConfig(_TrainStage):
    loss: StageCLossConfig = field(default_factory=StageCLossConfig)
    preview_steps: int = 29  # 29: the paper's schedule, dense at high noise; otherwise linear
    preview_guidance: float = 4.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_TRAIN))
    kind: typing.ClassVar[str] = "stage_c"


@dataclass(frozen=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: [
        "a red circle on a white background", "a blue square on a light green background",
        "a yellow star and a black triangle on a beige background", "a portrait of a smiling astronaut"])
    n_per_prompt: int = 4
    seed: int = 0
    steps_c: int = 29  # 29: the paper's schedule; any other count: linear in t
    steps_b: int = 12
    guidance_c: float = 4.0
    guidance_b: float = 0.0
    image_size: int = 0  # 0: the resolution Stage B was trained at
    device: str = "auto"  # auto: cuda when available (bf16 autocast), else cpu (fp32)

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")
        for key in ("n_per_prompt", "steps_c", "steps_b"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1")
        if self.image_size and self.image_size % 16:
            raise ValueError(f"image_size: expected a multiple of 16, got {self.image_size}")


# ----------------------------------------------------------------------------------------------
# Data and previews


def _tensor(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def _collate(batch: dict[str, np.ndarray], image_column: str | None, size: int, tensors: tuple[str, ...]):
    out = {k: _tensor(batch[k]) for k in tensors}
    if image_column:
        out["image"] = _tensor(enc.decode_images(batch[image_column], size))
    return out


def _latent_image(z, size: int):
    """First three semantic channels as a picture (they are standardized: ±2 → ±1)."""
    return F.interpolate((z[:, :3].float() / 2).clamp(-1, 1), size=(size, size), mode="nearest")


class VGGFeatures(nn.Module):
    """Frozen perceptual features for Stage A (LPIPS-style: ImageNet VGG16 up to relu3_3)."""

    def __init__(self):
        super().__init__()
        weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1  # downloaded by torchvision on first use
        self.features = torchvision.models.vgg16(weights=weights).features[:16]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.features(((x + 1) / 2 - self.mean) / self.std)


def _fit(spec: TrainSpec, cfg, out: Artifact, ds, mc: dict[str, Any]) -> dict[str, Any]:
    summary = fit(spec, cfg.train, out, {"train": ds}, mc)
    return {k: v for k, v in summary.items() if k != "params"} | {
        f"params_{k}": v for k, v in summary.get("params", {}).items()}


# ----------------------------------------------------------------------------------------------
# Stage A


def stage_a(inputs: dict[str, Artifact], cfg: StageATrainConfig, out: Artifact) -> dict[str, Any]:
    """Train the f4 VQGAN on the shard's training images (Sec. 3.1)."""
    shard = inputs["shard"]
    image = enc.image_column(shard, cfg.resolution)
    ds = enc.read_shard(shard, [image], cfg.heldout_fraction, cfg.in_memory, with_sample_id=False)
    rows = enc.head_rows(shard, [image], cfg.train.preview_images, heldout_fraction=cfg.heldout_fraction)
    preview = _tensor(enc.decode_images(rows[image], cfg.resolution))
    net_cfg = model_config("stage_a", cfg.preset, cfg.overrides)
    mc = {"family": "wuerstchen", "stage": "stage_a", "preset": cfg.preset, "resolution": cfg.resolution,
          "modules": {"stage_a": dataclasses.asdict(net_cfg)}}
    perceptual = cfg.perceptual

    def build_models(tc: TrainConfig):
        models = {"stage_a": StageA(net_cfg)}
        if perceptual == "vgg16":
            models["perceptual"] = VGGFeatures()  # not in an optimizer group: frozen by the harness
        return models

    def step(ctx, batch, i):
        loss, logs = stage_a_loss(ctx.models, {"image": batch["image"]}, cfg.loss)
        ctx.backward_step("stage_a", loss)
        return logs

    def sample(models, n, gen):
        a = models["stage_a"]
        x = preview[:n].to(next(a.parameters()).device)
        return torch.cat([x, a.decode(a.encode(x)).clamp(-1, 1)])  # top: data, bottom: v2-style decode

    spec = TrainSpec(build_models=build_models, optimizers={"stage_a": OptimGroup(("stage_a",))}, step=step,
                     sample=sample, ema_modules=("stage_a",), export_modules=("stage_a",),
                     collate=lambda b: _collate(b, image, cfg.resolution, ()))
    return _fit(spec, cfg, out, ds, mc)


# ----------------------------------------------------------------------------------------------
# Stage B (+ semantic compressor)


def stage_b(inputs: dict[str, Artifact], cfg: StageBTrainConfig, out: Artifact) -> dict[str, Any]:
    """Train Stage B and the semantic compressor jointly on precomputed Stage A latents (Sec. 3.2-3.3)."""
    src, stage_a_art = inputs["wuerstchen_encode_a"], inputs["wuerstchen_stage_a"]
    info = src.read_json("info.json")
    image, size = info["image_column"], info["resolution"]
    lat_c, lat_h, lat_w = info["shapes"]["latent_a"]
    width = info["shapes"]["text_tokens"][-1]
    uncond = enc.load_uncond(src)
    ds = enc.read_encoded(src, ["row_id", "latent_a", "text_tokens", image], cfg.in_memory)
    rows = enc.head_rows(src, ["text_tokens", image], cfg.train.preview_images, enc.DATA)
    p_img, p_text = _tensor(enc.decode_images(rows[image], size)), _tensor(rows["text_tokens"])
    comp_cfg = model_config("compressor", cfg.compressor_preset, cfg.compressor_overrides)
    b_cfg = model_config("stage_b", cfg.preset, cfg.overrides, c_in=lat_c, c_clip=width, c_sem=comp_cfg.c_latent,
                         grad_checkpointing=cfg.train.activation_checkpointing)
    sem_hw = sem_latent_size(comp_cfg, size)
    mc = {"family": "wuerstchen", "stage": "stage_b", "preset": cfg.preset, "resolution": size,
          "latent_shape": [lat_c, lat_h, lat_w], "sem_shape": [comp_cfg.c_latent, *sem_hw],
          "text_encoder": info["text_encoder"], "stage_a_uri": stage_a_art.uri,
          "modules": {"stage_b": dataclasses.asdict(b_cfg), "compressor": dataclasses.asdict(comp_cfg)}}

    def build_models(tc: TrainConfig):
        # Stage A is frozen (no optimizer group) and only decodes the preview.
        return {"stage_b": StageB(b_cfg), "compressor": SemanticCompressor(comp_cfg),
                "stage_a": load_trained(stage_a_art, "stage_a")}

    def step(ctx, batch, i):
        loss, logs = stage_b_loss(ctx.models, {
            "latent_a": batch["latent_a"], "image_sem": batch["image"], "text_tokens": batch["text_tokens"],
            "text_tokens_uncond": uncond.to(ctx.device)}, cfg.loss)
        ctx.backward_step("stage_b", loss)
        return logs

    def sample(models, n, gen):
        dev = next(models["stage_b"].parameters()).device
        x, text = p_img[:n].to(dev), p_text[:n].to(dev)
        lat = sample_stage_b(models, models["compressor"](x), text, latent_size=(lat_h, lat_w),
                             steps=cfg.preview_steps, generator=gen)
        return torch.cat([x, models["stage_a"].decode(lat).clamp(-1, 1)])  # top: data, bottom: A(B(compressor))

    spec = TrainSpec(build_models=build_models, optimizers={"stage_b": OptimGroup(("stage_b", "compressor"))},
                     step=step, sample=sample, collate=lambda b: _collate(b, image, size, ("latent_a", "text_tokens")))
    return _fit(spec, cfg, out, ds, mc)


# ----------------------------------------------------------------------------------------------
# Stage C


def stage_c(inputs: dict[str, Artifact], cfg: StageCTrainConfig, out: Artifact) -> dict[str, Any]:
    """Train the text-conditional prior on precomputed compressor latents (Sec. 3.3)."""
    src = inputs["wuerstchen_encode_semantic"]
    info = src.read_json("info.json")
    sem_c, sem_h, sem_w = info["shapes"]["latent_sem"]
    width = info["shapes"]["text_tokens"][-1]
    uncond = enc.load_uncond(src)
    ds = enc.read_encoded(src, ["row_id", "latent_sem", "text_tokens"], cfg.in_memory)
    rows = enc.head_rows(src, ["latent_sem", "text_tokens"], cfg.train.preview_images, enc.DATA)
    p_z, p_text = _tensor(rows["latent_sem"]), _tensor(rows["text_tokens"])
    c_cfg = model_config("stage_c", cfg.preset, cfg.overrides, c_in=sem_c, c_clip=width,
                         grad_checkpointing=cfg.train.activation_checkpointing)
    mc = {"family": "wuerstchen", "stage": "stage_c", "preset": cfg.preset, "resolution": info["resolution"],
          "sem_shape": [sem_c, sem_h, sem_w], "text_encoder": info["text_encoder"],
          "modules": {"stage_c": dataclasses.asdict(c_cfg)}}
    ts = stage_c_steps(cfg.preview_steps)

    def step(ctx, batch, i):
        loss, logs = stage_c_loss(ctx.models, {
            "latent_sem": batch["latent_sem"], "text_tokens": batch["text_tokens"],
            "text_tokens_uncond": uncond.to(ctx.device)}, cfg.loss)
        ctx.backward_step("stage_c", loss)
        return logs

    def sample(models, n, gen):
        dev = next(models["stage_c"].parameters()).device
        text = p_text[:n].to(dev)
        z = sample_stage_c(models, text, uncond.to(dev), sem_size=(sem_h, sem_w), steps=ts,
                           guidance=cfg.preview_guidance, generator=gen)
        return torch.cat([_latent_image(p_z[:n].to(dev), 32), _latent_image(z, 32)])  # top: data, bottom: C

    spec = TrainSpec(build_models=lambda tc: {"stage_c": StageC(c_cfg)},
                     optimizers={"stage_c": OptimGroup(("stage_c",))}, step=step, sample=sample,
                     collate=lambda b: _collate(b, None, 0, ("latent_sem", "text_tokens")))
    return _fit(spec, cfg, out, ds, mc)


# ----------------------------------------------------------------------------------------------
# Sampling (the code lives in sample_wuerstchen.py, which is also the one-command CLI)


def sample(inputs: dict[str, Artifact], cfg: SampleConfig, out: Artifact) -> dict[str, Any]:
    """Prompts → C → B → A: grid.png, samples/*.png, prompts.json."""
    from workflows import sample_wuerstchen

    return sample_wuerstchen.run_stage(inputs, cfg, out)


def encode_resources(cfg) -> dict[str, float]:
    res = {"CPU": cfg.cpus_per_actor * cfg.actors}
    if cfg.gpus_per_actor:
        res["GPU"] = cfg.gpus_per_actor * cfg.actors
    return res


# The rows for full_pipeline.STAGES (after the stage that writes "shard").
STAGES: list[Stage] = [
    Stage("wuerstchen_stage_a", stage_a, StageATrainConfig, ("shard",), uses_ray=True, resources=train_resources),
    Stage("wuerstchen_encode_a", enc.encode_a, enc.EncodeAConfig, ("shard", "wuerstchen_stage_a"), uses_ray=True,
          resources=encode_resources),
    Stage("wuerstchen_stage_b", stage_b, StageBTrainConfig, ("wuerstchen_encode_a", "wuerstchen_stage_a"),
          uses_ray=True, resources=train_resources),
    Stage("wuerstchen_encode_semantic", enc.encode_semantic, enc.EncodeSemanticConfig, ("shard", "wuerstchen_stage_b"),
          uses_ray=True, resources=encode_resources),
    Stage("wuerstchen_stage_c", stage_c, StageCTrainConfig, ("wuerstchen_encode_semantic",), uses_ray=True,
          resources=train_resources),
    Stage("wuerstchen_sample", sample, SampleConfig, ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c"),
          resources=lambda cfg: {"CPU": 1.0}),
]
