"""PaGoDA's training stages (arXiv 2405.14822): the low-resolution teacher (Sec. 3.1), the one-step
generator distilled from the inversion pairs (Sec. 3.2) and each 2x growth of it (Sec. 3.3). The
teacher never runs above the base resolution B; every later stage reuses the same base latents.

Networks and losses are genmodels.pagoda (pure PyTorch); each stage is a TrainSpec run by
workflows.train.fit (Ray Train + DeepSpeed) on a Ray Dataset. Inputs are named by role
(``shard``, ``pairs``, ``teacher``, ``generator``); the table in ``workflows/pagoda/__init__.py``
wires them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from genmodels import clip as clip_mod
from genmodels.pagoda import (
    DiscriminatorConfig,
    EDMConfig,
    Generator,
    GeneratorConfig,
    GrowthConfig,
    PagodaConfig,
    ProjectedDiscriminator,
    ProjectedFeatures,
    TinyFeatures,
    UNetConfig,
    build_timm_features,
    discriminator_loss,
    generator_loss,
    grown_config,
    ode_sample,
    rec_discriminator_loss,
    teacher_loss,
)
from pipeline.config import check
from pipeline.stage import ActorPoolConfig, actor_resources
from pipeline.store import Artifact, open_artifact
from workflows import shard_data
from workflows.pagoda.invert import read_pairs
from workflows.pagoda.models import (
    TEACHER_PRESETS,
    ClipImage,
    distill_init,
    grow_init,
    load_teacher,
    new_teacher,
    teacher_unet,
    unet_from_dict,
)
from workflows.text_clip import encoder, weights
from workflows.train import OptimGroup, TrainConfig, TrainContext, TrainSpec, fit
from workflows.train.loop import default_collate

# Layers of the frozen feature nets for L_rec (the reference code: DeiT-B + EfficientNet-lite0).
FEATURE_LAYERS = {"tf_efficientnet_lite0": (1, 2, 3, 4), "deit_base_distilled_patch16_224": (2, 5, 8, 11)}
LOG_NAMES = {"l_rec": "loss_rec", "l_adv": "loss_adv", "l_rec_adv": "loss_rec_adv", "l_dstl": "loss_dstl",
             "l_clip": "loss_clip"}


def _train(**kw) -> Callable[[], TrainConfig]:
    # Laptop defaults: one Ray Train worker with half a CPU (Ray Data needs the rest on 2 cores).
    return lambda: TrainConfig(**{"cpus_per_worker": 0.5, "batch_size": 16, "log_every": 10, "ckpt_every": 0,
                                  "ema_decay": 0.99, **kw})


# ------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class TeacherConfig:
    preset: str = "tiny"  # TEACHER_PRESETS key: micro | tiny | paper
    resolution: int = 16  # base resolution B (the paper: 64)
    text: bool = True  # condition on CLIP token states of the caption; False: unconditional
    clip: str = clip_mod.TINY  # open_clip model name (ViT-L-14 for a real run)
    clip_pretrained: str = ""  # open_clip tag or checkpoint path; "" = random weights (tiny only)
    text_tokens: int = 32  # token states kept per caption
    # Condition on CLIP's pooled, projected embedding as one token instead of the token states: what a
    # network without text attention (the micro preset) reads best (genmodels.clip.TextEncoder).
    text_pooled: bool = False
    caption_column: str = "recaption"  # falls back to `caption` where empty
    cond_drop: float = 0.1  # condition dropout for CFG (Sec. 4.2)
    # EDM's training noise levels: ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, Sec. 5; the
    # paper's -1.2, 1.2). A short run can raise p_mean: the prompt decides the image at sigma >~ 1,
    # where the default spends few of its steps.
    p_mean: float = -1.2
    p_std: float = 1.2
    preview_points: int = 18  # Heun grid of the preview samples
    # The teacher as a multi-step generator (family face, evaluation): Heun on an EDM grid of
    # sample_points (2 * points - 1 evaluations) with CFG at sample_omega (D_c + omega (D_c - D_u)),
    # which the condition dropout trained it for; 0 without text or without dropout.
    sample_points: int = 18
    sample_omega: float = 1.0
    text_cpus_per_actor: float = 0.25  # the Ray Data actor that encodes captions once per row
    text_gpus_per_actor: float = 0.0
    in_memory: bool = False  # keep decoded, encoded rows in Ray's object store across epochs (small data)
    train: TrainConfig = field(default_factory=_train(lr=2e-4, total_steps=400))

    def validate(self) -> None:
        check([("preset", self.preset in TEACHER_PRESETS,
                f"expected one of {sorted(TEACHER_PRESETS)}, got {self.preset!r}"),
               ("resolution", self.resolution >= 8 and self.resolution % 4 == 0, "must be a multiple of 4, >= 8"),
               ("text_tokens", 1 <= self.text_tokens <= 77, "expected 1-77"),
               ("cond_drop", 0 <= self.cond_drop < 1, "expected [0, 1)"),
               ("p_std", self.p_std > 0, "must be > 0"),
               ("preview_points", self.preview_points >= 2, "must be >= 2"),
               ("sample_points", self.sample_points >= 2, "must be >= 2"),
               ("sample_omega", self.sample_omega >= 0, "must be >= 0"),
               ("text_cpus_per_actor", self.text_cpus_per_actor >= 0, "must be >= 0"),
               ("text_gpus_per_actor", self.text_gpus_per_actor >= 0, "must be >= 0"),
               ("text_cpus_per_actor", self.text_cpus_per_actor > 0 or self.text_gpus_per_actor > 0,
                "must be > 0 without GPUs")])

    def text_pool(self) -> ActorPoolConfig:
        """The caption encoder's pool: one actor, 64 captions per call."""
        return ActorPoolConfig(actors=1, cpus_per_actor=self.text_cpus_per_actor,
                               gpus_per_actor=self.text_gpus_per_actor, batch_size=64)


@dataclass(frozen=True)
class DistillConfig:
    """Stage 2b (and, via GrowConfig, Stage 3). Optimization is `train` (G: lr, ema_decay, batch_size,
    grad_clip) plus `lr_d`, the one place to set it (paper: lr_G 8e-6, lr_D 2e-3, EMA 0.999, batch 96).
    The official optimizer is RAdam without weight decay and without gradient clipping (sony/pagoda
    cm/train_util.py `load_model`; cm/fp16_util.py `optimize` only measures the norm). The harness has
    AdamW; we keep its clipping (train.grad_clip 1.0) as a guard for small-batch CPU runs, and
    `train.grad_clip: 0` gives the official no-clipping."""

    w_adv: float = 0.2  # 0.2 at the base resolution, 1.0 while growing (Sec. 3.2-3.3)
    adaptive: bool = True  # VQGAN adaptive lambda
    adaptive_max_resolution: int = 128  # lambda = 1 above this (official 256/512 scripts)
    lambda_layer: str = "last_block"  # W of lambda: "last_block" (official) or "head"
    separate_updates: bool = False  # >= 256 px: L_rec and L_adv take alternate optimizer steps
    w_rec_adv: float = 0.0  # 512 px: adversarial loss on the reconstructions (0.5)
    rec_discriminator: bool = False  # 512 px: a second D of its own for w_rec_adv (official), lr lr_d
    lr_d: float = 1e-3  # D's learning rate (train.lr is G's)
    disc: str = "tiny"  # "tiny" (frozen random convs) or a timm backbone: vit_small_patch16_224.dino
    disc_pretrained: bool = True
    perceptual: tuple[str, ...] = ("tiny",)  # L_rec nets: "tiny" or timm names (deit_base..., tf_efficientnet_lite0)
    perceptual_pretrained: bool = True
    # L_rec as the official code computes it (sony/pagoda cm/enc_dec_lib.py, pg_modules/projector.py):
    # each net's maps through a fixed random projection (F_RandomProj; genmodels/pagoda/perceptual.py),
    # and one random augmentation shared by G's output and the target per step. False / False: the raw
    # backbone features without augmentation (our earlier distance).
    perceptual_projection: bool = True
    projection_channels: int = 64  # cout of F_RandomProj (official 64); the "tiny" net's is its own width, 8
    rec_augment: bool = True
    omega_cond: bool = False  # text-to-image: G(z, c, omega) with L_dstl toward the CFG-omega teacher (Sec. 4.2)
    omega_range: tuple[float, float] = (0.0, 0.0)
    adv_omega: str = "zero"  # "zero": adversarial game at omega 0 (official: no guidance in D); "shared": old
    w_dstl: float = 0.0  # its targets come from the pairs (pagoda_invert.dstl: true)
    dstl_online: bool = False  # True: the teacher solves the targets in every step instead (~158 passes)
    dstl_points: int = 40  # the online solver's grid
    w_clip: float = 0.0
    flip: bool = True  # train on (flip(x), z_flip) half of the time
    in_memory: bool = False  # keep the decoded pairs in Ray's object store across epochs (small data)
    train: TrainConfig = field(default_factory=_train(lr=1e-4, total_steps=200))

    def validate(self) -> None:
        check([("w_adv", self.w_adv >= 0, "must be >= 0"), ("w_rec_adv", self.w_rec_adv >= 0, "must be >= 0"),
               ("lambda_layer", self.lambda_layer in ("last_block", "head"), "expected 'last_block' or 'head'"),
               ("rec_discriminator", not self.rec_discriminator or self.w_rec_adv > 0, "needs w_rec_adv > 0"),
               ("lr_d", self.lr_d > 0, "must be > 0"), ("perceptual", len(self.perceptual) >= 1, "needs a net"),
               ("projection_channels", self.projection_channels >= 1, "must be >= 1"),
               ("omega_range", self.omega_range[0] <= self.omega_range[1], "expected (low, high)"),
               ("adv_omega", self.adv_omega in ("zero", "shared"), "expected 'zero' or 'shared'"),
               ("omega_cond", self.omega_cond or (self.w_dstl == 0 and self.omega_range == (0.0, 0.0)),
                "w_dstl / omega_range need omega_cond: true"),
               ("w_dstl", self.w_dstl >= 0, "must be >= 0"), ("dstl_points", self.dstl_points >= 2, "must be >= 2"),
               ("w_clip", self.w_clip >= 0, "must be >= 0")])


@dataclass(frozen=True)
class GrowConfig(DistillConfig):
    resolution: int = 32  # output resolution: twice the input generator's (the stage's name says which)
    channels: int = 0  # width of the new level; 0 = the current top level's
    # Which decoder blocks train (Fig. 3): "official" = from block 1 of the base/2 level upward, every
    # grown level included (sony/pagoda --activate_from=9; genmodels/pagoda/growth.py); "top_levels" =
    # only the top `trainable_levels` levels of the smaller G, the new level and the head (cheaper).
    freeze: str = "official"
    trainable_levels: int = 1
    w_adv: float = 1.0

    def validate(self) -> None:
        super().validate()
        check([("resolution", self.resolution >= 16, "must be >= 16"), ("channels", self.channels >= 0, ">= 0"),
               ("freeze", self.freeze in ("official", "top_levels"), "expected 'official' or 'top_levels'"),
               ("trainable_levels", self.trainable_levels >= 0, "must be >= 0")])


# ------------------------------------------------------------------------------------------
# Discriminator and feature nets


def build_discriminator(cfg: DistillConfig, resolution: int, embed_dim: int) -> ProjectedDiscriminator:
    if cfg.disc == "tiny":  # frozen random convs at (at least) the stage resolution
        return ProjectedDiscriminator.tiny(DiscriminatorConfig(channels=16, cmap_dim=16, text_dim=embed_dim,
                                                               omega_cond=cfg.omega_cond, size=max(32, resolution)))
    dcfg = DiscriminatorConfig(backbone=cfg.disc, text_dim=embed_dim, omega_cond=cfg.omega_cond)
    return ProjectedDiscriminator.build(dcfg, pretrained=cfg.disc_pretrained)


def build_perceptual(cfg: DistillConfig, resolution: int) -> nn.ModuleList:
    """L_rec's frozen nets, each behind its fixed random projection (seeded by its place in the list)."""
    nets = []
    for i, name in enumerate(cfg.perceptual):
        net = (TinyFeatures(size=max(32, resolution)) if name == "tiny" else
               build_timm_features(name, FEATURE_LAYERS.get(name, (2, 5, 8, 11)), pretrained=cfg.perceptual_pretrained))
        # The random "tiny" net stands in for a pretrained one (tests, CPU demo): its projection keeps its
        # width, as a 64-wide one would cost more than the micro generator's own step.
        cout = net.channels[0] if name == "tiny" else cfg.projection_channels
        nets.append(ProjectedFeatures(net, list(net.channels), cout, seed=i) if cfg.perceptual_projection else net)
    return nn.ModuleList(nets)


# ------------------------------------------------------------------------------------------
# Stage 1: teacher


class TextColumns:
    """Ray Data callable class: adds ``text`` and ``text_mask`` (token states) to a batch with ``caption``."""

    def __init__(self, text: dict[str, Any]):
        self.encoder = encoder(**text).to("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.encoder(batch["caption"])
        return {**batch, "text": enc["text"].cpu().numpy(), "text_mask": enc["text_mask"].cpu().numpy()}


def teacher_pagoda_config(cfg: TeacherConfig) -> PagodaConfig:
    """The teacher's EDM: its noise-level distribution and condition dropout from the stage config."""
    return PagodaConfig(resolution=cfg.resolution,
                        edm=EDMConfig(P_mean=cfg.p_mean, P_std=cfg.p_std, cond_drop=cfg.cond_drop))


def teacher_spec(cfg: TeacherConfig, unet: UNetConfig, text: dict | None) -> TrainSpec:
    pcfg = teacher_pagoda_config(cfg)
    r = cfg.resolution

    def build_models(tc: TrainConfig) -> dict[str, nn.Module]:
        return {"teacher": new_teacher({"unet": dataclasses.asdict(unet), "sigma_data": 0.5})}

    def step(ctx: TrainContext, batch: dict[str, Any], step: int) -> dict[str, Any]:
        b = {k: batch[k] for k in ("image", "text", "text_mask") if k in batch}
        loss, logs = teacher_loss({"teacher": ctx.models["teacher"]}, b, pcfg)
        ctx.backward_step("teacher", loss)
        return logs

    def sample(models: dict[str, nn.Module], n: int, gen: torch.Generator) -> Tensor:
        z = torch.randn((n, 3, r, r), generator=gen, device=gen.device) * pcfg.edm.sigma_max
        tokens = 1 if cfg.text_pooled else text["tokens"] if text else 0
        cond = {"text": torch.zeros(n, tokens, unet.text_dim, device=z.device)} if text else {}
        return ode_sample(models["teacher"], z, cfg.preview_points, **cond)  # the unconditional (null-text) branch

    return TrainSpec(build_models=build_models, optimizers={"teacher": OptimGroup(("teacher",))}, step=step,
                     sample=sample, ema_modules=("teacher",), export_modules=("teacher",))


def run_teacher(inputs: dict[str, Artifact], cfg: TeacherConfig, out: Artifact) -> dict[str, Any]:
    """Stage 1: EDM on center-cropped, downsampled images of the ``shard``'s training split."""
    text = None
    if cfg.text:  # the clip stage's weights unless clip_pretrained names others (text_clip.weights)
        text = {"name": cfg.clip, "pretrained": weights(inputs.get("clip"), cfg.clip, cfg.clip_pretrained),
                "tokens": cfg.text_tokens, **({"pooled_token": True} if cfg.text_pooled else {})}
    unet = teacher_unet(cfg)
    guided = bool(text) and cfg.cond_drop > 0  # no dropout: no unconditional branch to guide with
    meta = {"kind": "pagoda_teacher", "unet": dataclasses.asdict(unet), "sigma_data": 0.5, "text": text,
            "resolution": cfg.resolution,
            "sampler": {"points": cfg.sample_points, "omega": cfg.sample_omega if guided else 0.0}}
    ds = shard_data.read(inputs["shard"], split=shard_data.TRAIN, resolution=cfg.resolution,
                         caption_column=cfg.caption_column)
    if text:  # encoded once per row by an actor, not in every training step
        import ray.data

        pool = cfg.text_pool()
        ds = ds.map_batches(TextColumns, fn_constructor_kwargs={"text": text}, batch_size=pool.batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool.actors),
                            **actor_resources(pool))
    if cfg.in_memory:  # after the text actor, so that captions are encoded once too
        ds = shard_data.materialized(ds)
    return fit(teacher_spec(cfg, unet, text), cfg.train, out, {"train": ds}, meta)


# ------------------------------------------------------------------------------------------
# Stages 2b and 3: one-step generator at the base resolution, then each 2x growth


def pagoda_config(cfg: DistillConfig, resolution: int) -> PagodaConfig:
    return PagodaConfig(resolution=resolution, w_adv=cfg.w_adv, adaptive=cfg.adaptive,
                        adaptive_max_resolution=cfg.adaptive_max_resolution, lambda_layer=cfg.lambda_layer,
                        separate_updates=cfg.separate_updates, w_rec_adv=cfg.w_rec_adv,
                        rec_discriminator=cfg.rec_discriminator, omega_range=cfg.omega_range,
                        w_dstl=cfg.w_dstl, dstl_points=cfg.dstl_points, w_clip=cfg.w_clip,
                        rec_augment=cfg.rec_augment, adv_omega=cfg.adv_omega)


def pair_collate(flip: bool) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """Each row trains on (x, z) or, with probability 1/2, on (flip(x), z_flip): the flip's own latent."""
    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = default_collate(batch)
        z_flip = out.pop("latent_flip")
        if flip:
            f = torch.from_numpy(np.random.rand(len(z_flip)) < 0.5)[:, None, None, None]
            out["image"] = torch.where(f, out["image"].flip(-1), out["image"])
            out["latent"] = torch.where(f, z_flip, out["latent"])
        return out
    return collate


def generator_spec(cfg: DistillConfig, resolution: int, meta: dict[str, Any], build_generator: Callable[[], Generator],
                   preview: dict[str, np.ndarray]) -> TrainSpec:
    """G and D as two optimizer groups, alternating every step (G first, then D on fresh fakes)."""
    pcfg = pagoda_config(cfg, resolution)
    text, teacher_uri = meta["text"], meta["teacher"]
    adversarial = cfg.w_adv > 0 or cfg.w_rec_adv > 0

    def build_models(tc: TrainConfig) -> dict[str, nn.Module]:
        embed_dim = clip_mod.text_dims(text["name"])[1] if text else 0
        models = {"generator": build_generator(), "perceptual": build_perceptual(cfg, resolution),
                  "discriminator": build_discriminator(cfg, resolution, embed_dim)}
        if cfg.rec_discriminator:
            models["rec_discriminator"] = build_discriminator(cfg, resolution, embed_dim)
        if cfg.w_dstl > 0 and cfg.dstl_online:  # otherwise L_dstl reads its targets from the pairs
            models["teacher"] = load_teacher(open_artifact(teacher_uri))[0]
        if cfg.w_clip > 0:
            models["clip_image"] = ClipImage(text["name"], text["pretrained"])
        return models

    def step(ctx: TrainContext, batch: dict[str, Any], step: int) -> dict[str, Any]:
        models = {**ctx.models, "perceptual": list(ctx.models["perceptual"])}
        with ctx.trainable("generator"):  # L_adv flows through D, whose weights must not get this gradient
            loss, logs = generator_loss(models, batch, pcfg, step)
        ctx.backward_step("generator", loss)
        out = {LOG_NAMES.get(k, k): v for k, v in logs.items()}
        if adversarial:
            d_loss, d_logs = discriminator_loss(models, batch, pcfg)
            ctx.backward_step("discriminator", d_loss)
            out.update(loss_d=d_loss.detach(), d_real=d_logs["d_real"], d_fake=d_logs["d_fake"])
        if cfg.rec_discriminator:
            r_loss, r_logs = rec_discriminator_loss(models, batch, pcfg)
            ctx.backward_step("rec_discriminator", r_loss)
            out.update(loss_d_rec=r_loss.detach(), d_rec=r_logs["d_rec"])
        return out

    def sample(models: dict[str, nn.Module], n: int, gen: torch.Generator) -> Tensor:
        g = models["generator"]
        b = g.net.cfg.img_resolution
        z = torch.randn((n, 3, b, b), generator=gen, device=gen.device) * g.cfg.sigma_max
        idx = np.arange(n) % len(preview["row_id"])
        cond = {k: torch.from_numpy(np.asarray(preview[k])[idx]).to(z.device) for k in ("text", "text_mask")
                if k in preview}
        return g(z, **cond)

    groups = {"generator": OptimGroup(("generator",)),
              "discriminator": OptimGroup(("discriminator",), lr_mult=cfg.lr_d / cfg.train.lr)}
    if cfg.rec_discriminator:
        groups["rec_discriminator"] = OptimGroup(("rec_discriminator",), lr_mult=cfg.lr_d / cfg.train.lr)
    return TrainSpec(build_models=build_models, optimizers=groups, step=step, sample=sample,
                     ema_modules=("generator",), export_modules=("generator",), collate=pair_collate(cfg.flip))


def check_dstl(cfg: DistillConfig, pairs_meta: dict[str, Any]) -> None:
    """L_dstl reads precomputed targets unless ``dstl_online``: the pairs must carry them."""
    if cfg.w_dstl > 0 and not cfg.dstl_online and not pairs_meta.get("dstl"):
        raise ValueError("w_dstl: the pairs carry no L_dstl targets; set pagoda_invert.dstl: true (with its "
                         "dstl_omega_range) or dstl_online: true")


def _fit_generator(cfg: DistillConfig, pairs: Artifact, resolution: int, meta: dict[str, Any],
                   build_generator: Callable[[], Generator], out: Artifact) -> dict[str, Any]:
    check_dstl(cfg, pairs.read_json("pairs.json"))
    ds = read_pairs(pairs, resolution, in_memory=cfg.in_memory)
    if cfg.in_memory:
        ds = shard_data.materialized(ds)
    preview = ds.take_batch(cfg.train.preview_images, batch_format="numpy")
    spec = generator_spec(cfg, resolution, meta, build_generator, preview)
    return fit(spec, cfg.train, out, {"train": ds}, meta)


def run_distill(inputs: dict[str, Artifact], cfg: DistillConfig, out: Artifact) -> dict[str, Any]:
    """Stage 2b: G = a full copy of the EMA ``teacher``, trained on its inversion ``pairs`` (x_B, z) at B."""
    teacher = inputs["teacher"]
    tmeta = teacher.read_json("model_config.json")
    gcfg = GeneratorConfig(omega_cond=cfg.omega_cond)
    # The generator drops the teacher's dropout (Generator.from_teacher), and so does its saved config.
    meta = {"kind": "pagoda_generator", "unet": {**tmeta["unet"], "dropout": 0.0},
            "generator": dataclasses.asdict(gcfg), "text": tmeta["text"], "teacher": teacher.uri,
            "resolution": tmeta["resolution"], "base_resolution": tmeta["resolution"],
            # G(z, c, omega) is sampled at the middle of the CFG scales it was trained for (Sec. 4.2)
            "sampler": {"omega": sum(cfg.omega_range) / 2 if cfg.omega_cond else 0.0}}
    return _fit_generator(cfg, inputs["pairs"], tmeta["resolution"], meta,
                          lambda: distill_init(teacher, gcfg), out)


def growth_config(cfg: GrowConfig) -> GrowthConfig:
    train_from = GrowthConfig().train_from if cfg.freeze == "official" else None
    return GrowthConfig(channels=cfg.channels or None, train_from=train_from, trainable_levels=cfg.trainable_levels)


def run_grow(inputs: dict[str, Artifact], cfg: GrowConfig, out: Artifact) -> dict[str, Any]:
    """Stage 3: one 2x growth of the ``generator`` to ``cfg.resolution``, trained on the same ``pairs``
    (the base latents, images at the new resolution)."""
    prev = inputs["generator"]
    prev_meta = prev.read_json("model_config.json")
    if cfg.resolution != 2 * prev_meta["resolution"]:
        raise ValueError(f"resolution: {cfg.resolution} is not twice the input generator's {prev_meta['resolution']}")
    gcfg = growth_config(cfg)
    unet = grown_config(unet_from_dict(prev_meta["unet"]), gcfg)
    meta = {**prev_meta, "unet": dataclasses.asdict(unet), "resolution": cfg.resolution,
            "growth": dataclasses.asdict(gcfg), "parent": prev.uri}  # parent: initial_model rebuilds the init
    return _fit_generator(cfg, inputs["pairs"], cfg.resolution, meta, lambda: grow_init(prev, gcfg), out)
