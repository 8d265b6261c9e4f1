"""Würstchen training stages: Stage A, then Stage B with the semantic compressor, then Stage C.

    shard ─► stage_a ─► encode_a ─► stage_b ─► encode_semantic ─► stage_c ─► sample (A, B, C)

Training order is the paper's (arXiv 2306.00637, Sec. 3 / wuerstchen.md): A first, then B
jointly with the semantic compressor on precomputed Stage A latents, then C on precomputed,
frozen compressor latents (``encode.py``). Every training stage is a ``TrainSpec`` (plain
PyTorch, the step functions of ``genmodels.wuerstchen.steps``) handed to the shared harness
(``workflows.train.fit``: Ray Train + DeepSpeed), which exports EMA weights,
``model_config.json`` (everything needed to rebuild the networks), metrics and previews.

Inputs by role: Stage A reads ``shard``; Stage B ``latents`` (encode_a) and ``stage_a``;
Stage C ``latents`` (encode_semantic). Each network's ``c_clip`` comes from the token states
actually encoded, so a preset never disagrees with its text encoder.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genmodels.wuerstchen import (
    PatchDiscriminator,
    SemanticCompressor,
    StageA,
    StageALossConfig,
    StageB,
    StageBLossConfig,
    StageC,
    StageCLossConfig,
    convert_sync_batchnorm,
    estimate_latent_scale,
    sample_stage_b,
    sample_stage_c,
    stage_a_disc_loss,
    stage_a_loss,
    stage_b_loss,
    stage_c_loss,
)
from pipeline.store import Artifact
from workflows import shard_data
from workflows.train import OptimGroup, TrainConfig, TrainSpec, fit
from workflows.wuerstchen.encode import DATA, load_uncond
from workflows.wuerstchen.models import (
    Preset,
    check_overrides,
    load_trained,
    model_config,
    sem_latent_size,
    stage_c_steps,
)

# Laptop-sized defaults of every Würstchen training stage (YAML overrides any field).
_TRAIN = {"batch_size": 16, "lr": 1e-3, "total_steps": 2000, "log_every": 10, "preview_images": 8}


@dataclass(frozen=True)
class _TrainStage:
    preset: Preset = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # network config fields over the preset
    # Small data (demo, tests): read the training rows once into Ray's object store instead of
    # streaming the files every epoch. Leave off for real shards.
    in_memory: bool = False
    kind: typing.ClassVar[str] = ""

    def validate(self) -> None:
        check_overrides(self.kind, self.overrides)
        if self.train.preview_images < 1:
            raise ValueError("train.preview_images: must be >= 1")


@dataclass(frozen=True)
class StageATrainConfig(_TrainStage):
    resolution: int = 64  # trains on the shard's image at R (or the smallest stored side above it)
    perceptual: Literal["none", "vgg16"] = "none"  # vgg16: torchvision ImageNet VGG16 relu3_3 features
    # unquantized_weight > 0: the decoder also learns to read continuous latents, which is how v2 (and
    # encode_a, Stage B, sampling) use Stage A; needed with a small or young codebook. Paper: 0.
    loss: StageALossConfig = field(default_factory=lambda: StageALossConfig(unquantized_weight=1.0))
    # loss.adversarial_weight > 0 trains this PatchGAN beside Stage A (v1's discriminator: 6 levels, 512 wide).
    discriminator_widths: tuple[int, ...] = (32, 64, 128)
    # After training, the latent's std is measured on scale_images training images with the EMA weights
    # and recorded in model_config.json ("latent_scale"). "estimate": it becomes Stage A's scale_factor,
    # so encode_a gives Stage B unit-variance latents, which is how the official 0.3764 was found for
    # the official Stage A (dome272/Wuerstchen vqgan.py: scale_factor=0.3764, "# 1.0" during training);
    # "official": keep the preset's constant (0.3764) and only record the estimate.
    latent_scale: Literal["estimate", "official"] = "estimate"
    scale_images: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_TRAIN))
    kind: typing.ClassVar[str] = "stage_a"

    def validate(self) -> None:
        super().validate()
        if self.resolution < 8 or self.resolution % 4:
            raise ValueError(f"resolution: expected a multiple of 4 >= 8, got {self.resolution}")
        if self.scale_images < 1:
            raise ValueError("scale_images: must be >= 1")


@dataclass(frozen=True)
class StageBTrainConfig(_TrainStage):
    compressor_preset: Preset = "tiny"  # paper: EfficientNetV2-S with torchvision's ImageNet weights
    compressor_overrides: dict[str, Any] = field(default_factory=dict)
    loss: StageBLossConfig = field(default_factory=StageBLossConfig)
    # Synchronise the compressor's BatchNorms over the workers (v1: SyncBatchNorm over the effnet +
    # Stage B wrapper, dome272/Wuerstchen train_stage_B.py); no effect on one worker.
    sync_bn: bool = True
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
    # The CFG scale this prior is sampled at: its previews, and (recorded as model_config "sampler") the
    # family face that evaluate samples. Paper: 4.
    sample_guidance: float = 4.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**_TRAIN))
    kind: typing.ClassVar[str] = "stage_c"


# ----------------------------------------------------------------------------------------------
# Data and previews


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def _collate(batch: dict[str, np.ndarray], tensors: tuple[str, ...], image: tuple[str, int] | None = None):
    """Float tensors of ``tensors``; ``image=(column, R)`` decodes that column's bytes as ``image``;
    an ``image`` column already decoded to uint8 (``decode_images``) travels as uint8 (``image_float``
    converts it on the device, a quarter of the bytes to copy)."""
    out = {k: _tensor(batch[k]) for k in tensors}
    if image:
        out["image"] = _tensor(shard_data.decode(batch[image[0]], image[1]))
    elif "image" in batch:
        out["image"] = torch.from_numpy(np.ascontiguousarray(batch["image"]))
    return out


def decode_images(batch: dict[str, np.ndarray], column: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: the encoded ``column`` → ``image`` uint8 (N, 3, R, R).

    Decoding in the dataset pipeline runs in Ray Data's tasks, concurrently with training and in
    parallel over the CPUs, instead of serially inside each training step (a full-size JPEG
    decode per image per step was Stage B's input bottleneck at 1024²).
    """
    out = {k: v for k, v in batch.items() if k != column}
    out["image"] = shard_data.decode_u8(batch[column], size)
    return out


def image_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1], equal to ``shard_data.decode``; float input passes through."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def _latent_image(z: torch.Tensor, size: int) -> torch.Tensor:
    """First three semantic channels as a picture (they are standardized: ±2 → ±1)."""
    return F.interpolate((z[:, :3].float() / 2).clamp(-1, 1), size=(size, size), mode="nearest")


class VGGFeatures(nn.Module):
    """Frozen perceptual features for Stage A (LPIPS-style: ImageNet VGG16 up to relu3_3)."""

    def __init__(self):
        super().__init__()
        import torchvision  # only with perceptual=vgg16: its import costs seconds in every worker

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
    image = shard_data.image_column(shard_data.columns(shard), cfg.resolution)
    # Encoded bytes travel (and sit in memory) until the worker's collate decodes them: 10x smaller.
    ds = shard_data.read(shard, split=shard_data.TRAIN, carry=[image], in_memory=cfg.in_memory)
    rows = shard_data.head(shard, [image], cfg.train.preview_images, split=shard_data.TRAIN)
    preview = _tensor(shard_data.decode(rows[image], cfg.resolution))
    net_cfg = model_config("stage_a", cfg.preset, cfg.overrides)
    mc = {"family": "wuerstchen", "stage": "stage_a", "preset": cfg.preset, "resolution": cfg.resolution,
          "modules": {"stage_a": dataclasses.asdict(net_cfg)}}
    perceptual = cfg.perceptual
    adversarial = cfg.loss.adversarial_weight > 0

    def build_models(tc: TrainConfig):
        models = {"stage_a": StageA(net_cfg)}
        if perceptual == "vgg16":
            models["perceptual"] = VGGFeatures()  # not in an optimizer group: frozen by the harness
        if adversarial:
            models["discriminator"] = PatchDiscriminator(tuple(cfg.discriminator_widths), net_cfg.c_in)
        return models

    def step(ctx, batch, i):
        adv_on = adversarial and i >= cfg.loss.adversarial_start
        models = ctx.models if adv_on else {k: v for k, v in ctx.models.items() if k != "discriminator"}
        with ctx.trainable("stage_a"):  # the generator's GAN term must not reach D's parameters
            loss, logs, recon = stage_a_loss(models, {"image": batch["image"]}, cfg.loss, return_recon=True)
            ctx.backward_step("stage_a", loss)
        if adv_on:
            d_loss, d_logs = stage_a_disc_loss(models, {"image": batch["image"]}, recon)
            ctx.backward_step("discriminator", d_loss)
            logs |= d_logs
        return logs

    def sample(models, n, gen):
        a = models["stage_a"]
        x = preview[:n].to(next(a.parameters()).device)
        return torch.cat([x, a.decode(a.encode(x)).clamp(-1, 1)])  # top: data, bottom: v2-style decode

    groups = {"stage_a": OptimGroup(("stage_a",))}
    if adversarial:
        groups["discriminator"] = OptimGroup(("discriminator",))
    spec = TrainSpec(build_models=build_models, optimizers=groups, step=step,
                     sample=sample, ema_modules=("stage_a",), export_modules=("stage_a",),
                     collate=lambda b: _collate(b, (), (image, cfg.resolution)))
    summary = _fit(spec, cfg, out, ds, mc)
    return summary | _record_latent_scale(shard, image, cfg, out)


def _record_latent_scale(shard: Artifact, image: str, cfg: StageATrainConfig, out: Artifact) -> dict[str, Any]:
    """Measure the trained (EMA) Stage A's latent std on training images and record it in
    model_config.json; with ``latent_scale="estimate"`` it becomes ``scale_factor`` (see the config)."""
    rows = shard_data.head(shard, [image], cfg.scale_images, split=shard_data.TRAIN)
    x = _tensor(shard_data.decode(rows[image], cfg.resolution))
    est = estimate_latent_scale(load_trained(out, "stage_a"), x.split(16))
    mc = out.read_json("model_config.json")
    official = float(mc["modules"]["stage_a"]["scale_factor"])
    applied = cfg.latent_scale == "estimate"
    if applied:
        mc["modules"]["stage_a"]["scale_factor"] = est["std"]
    mc["latent_scale"] = {"std": est["std"], "mean": est["mean"], "images": len(x), "preset_scale_factor": official,
                          "applied": applied}
    out.write_json("model_config.json", mc)
    return {"latent_std": round(est["std"], 6), "scale_factor": est["std"] if applied else official}


# ----------------------------------------------------------------------------------------------
# Stage B (+ semantic compressor)


def stage_b(inputs: dict[str, Artifact], cfg: StageBTrainConfig, out: Artifact) -> dict[str, Any]:
    """Train Stage B and the semantic compressor jointly on precomputed Stage A latents (Sec. 3.2-3.3)."""
    src, stage_a_art = inputs["latents"], inputs["stage_a"]
    info = src.read_json("info.json")
    image, size = info["image_column"], info["resolution"]
    lat_c, lat_h, lat_w = info["shapes"]["latent_a"]
    width = info["shapes"]["text_tokens"][-1]
    uncond = load_uncond(src)
    ds = shard_data.read_parquet(src, ["row_id", "latent_a", "text_tokens", image], subdir=DATA,
                                 in_memory=cfg.in_memory)
    # Images are decoded by Ray Data beside training, not in the step (encoded bytes stay in memory).
    # batch_size: decoded images stream out a training batch at a time rather than a whole block.
    ds = ds.map_batches(decode_images, fn_kwargs={"column": image, "size": size}, batch_size=cfg.train.batch_size,
                        batch_format="numpy")
    rows = shard_data.head(src, ["text_tokens", image], cfg.train.preview_images, subdir=DATA, split=None)
    p_img, p_text = _tensor(shard_data.decode(rows[image], size)), _tensor(rows["text_tokens"])
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
        compressor = SemanticCompressor(comp_cfg)
        if cfg.sync_bn:
            convert_sync_batchnorm(compressor)
        return {"stage_b": StageB(b_cfg), "compressor": compressor, "stage_a": load_trained(stage_a_art, "stage_a")}

    def step(ctx, batch, i):
        loss, logs = stage_b_loss(ctx.models, {
            "latent_a": batch["latent_a"], "image_sem": image_float(batch["image"]),
            "text_tokens": batch["text_tokens"], "text_tokens_uncond": uncond.to(ctx.device)}, cfg.loss)
        ctx.backward_step("stage_b", loss)
        return logs

    def sample(models, n, gen):
        dev = next(models["stage_b"].parameters()).device
        x, text = p_img[:n].to(dev), p_text[:n].to(dev)
        lat = sample_stage_b(models, models["compressor"](x), text, latent_size=(lat_h, lat_w),
                             steps=cfg.preview_steps, generator=gen)
        return torch.cat([x, models["stage_a"].decode(lat).clamp(-1, 1)])  # top: data, bottom: A(B(compressor))

    spec = TrainSpec(build_models=build_models, optimizers={"stage_b": OptimGroup(("stage_b", "compressor"))},
                     step=step, sample=sample,
                     collate=lambda b: _collate(b, ("latent_a", "text_tokens")))
    return _fit(spec, cfg, out, ds, mc)


# ----------------------------------------------------------------------------------------------
# Stage C


def stage_c(inputs: dict[str, Artifact], cfg: StageCTrainConfig, out: Artifact) -> dict[str, Any]:
    """Train the text-conditional prior on precomputed compressor latents (Sec. 3.3)."""
    src = inputs["latents"]
    info = src.read_json("info.json")
    sem_c, sem_h, sem_w = info["shapes"]["latent_sem"]
    width = info["shapes"]["text_tokens"][-1]
    uncond = load_uncond(src)
    ds = shard_data.read_parquet(src, ["row_id", "latent_sem", "text_tokens"], subdir=DATA, in_memory=cfg.in_memory)
    rows = shard_data.head(src, ["latent_sem", "text_tokens"], cfg.train.preview_images, subdir=DATA, split=None)
    p_z, p_text = _tensor(rows["latent_sem"]), _tensor(rows["text_tokens"])
    c_cfg = model_config("stage_c", cfg.preset, cfg.overrides, c_in=sem_c, c_clip=width,
                         grad_checkpointing=cfg.train.activation_checkpointing)
    mc = {"family": "wuerstchen", "stage": "stage_c", "preset": cfg.preset, "resolution": info["resolution"],
          "sem_shape": [sem_c, sem_h, sem_w], "text_encoder": info["text_encoder"],
          "modules": {"stage_c": dataclasses.asdict(c_cfg)}, "sampler": {"guidance_c": cfg.sample_guidance}}
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
                           guidance=cfg.sample_guidance, generator=gen)
        return torch.cat([_latent_image(p_z[:n].to(dev), 32), _latent_image(z, 32)])  # top: data, bottom: C

    spec = TrainSpec(build_models=lambda tc: {"stage_c": StageC(c_cfg)},
                     optimizers={"stage_c": OptimGroup(("stage_c",))}, step=step, sample=sample,
                     collate=lambda b: _collate(b, ("latent_sem", "text_tokens")))
    return _fit(spec, cfg, out, ds, mc)
