"""PaGoDA: a one-step generator distilled from a low-resolution diffusion teacher by DDIM
inversion, then progressively grown 2x at a time (Kim et al., NeurIPS 2024, arXiv 2405.14822).

Stage 1 `steps.teacher_loss` (EDM on downsampled data) -> Stage 2a `steps.invert_latents`
(PF-ODE inversion) -> Stage 2b `Generator.from_teacher` + `steps.generator_loss` /
`steps.discriminator_loss` -> Stage 3 `grow_2x` and the same two steps at 2x resolution.
"""
from genmodels.pagoda.control import condition_transfer, encode, inpaint, interpolate, slerp, super_resolution
from genmodels.pagoda.discriminator import DiscriminatorConfig, ProjectedDiscriminator, diff_augment
from genmodels.pagoda.edm import EDMConfig, EDMPrecond, Guided, edm_coeffs, edm_loss, guided_denoise
from genmodels.pagoda.generator import Generator, GeneratorConfig, sample_latents
from genmodels.pagoda.growth import (
    GrowthConfig,
    copy_matching,
    first_trained_block,
    grow_2x,
    grown_config,
    set_trainable,
)
from genmodels.pagoda.losses import (
    FrozenFeatures,
    TinyFeatures,
    adaptive_weight,
    build_timm_features,
    clip_loss,
    d_hinge_loss,
    g_hinge_loss,
    perceptual_distance,
    rec_loss,
)
from genmodels.pagoda.ode import heun_solve, karras_sigmas, ode_invert, ode_sample
from genmodels.pagoda.perceptual import ProjectedFeatures, RandomProjection, RecAugment, apply_augment, augment_params
from genmodels.pagoda.steps import (
    PagodaConfig,
    discriminator_loss,
    ema_update,
    generator_loss,
    invert_latents,
    rec_discriminator_loss,
    teacher_loss,
)
from genmodels.pagoda.unet import UNet, UNetConfig, count_params

__all__ = [
    "DiscriminatorConfig",
    "EDMConfig",
    "EDMPrecond",
    "FrozenFeatures",
    "Generator",
    "GeneratorConfig",
    "GrowthConfig",
    "Guided",
    "PagodaConfig",
    "ProjectedDiscriminator",
    "ProjectedFeatures",
    "RandomProjection",
    "RecAugment",
    "TinyFeatures",
    "UNet",
    "UNetConfig",
    "adaptive_weight",
    "apply_augment",
    "augment_params",
    "build_timm_features",
    "clip_loss",
    "condition_transfer",
    "copy_matching",
    "count_params",
    "d_hinge_loss",
    "diff_augment",
    "discriminator_loss",
    "edm_coeffs",
    "edm_loss",
    "ema_update",
    "encode",
    "first_trained_block",
    "g_hinge_loss",
    "generator_loss",
    "grow_2x",
    "grown_config",
    "guided_denoise",
    "heun_solve",
    "inpaint",
    "interpolate",
    "invert_latents",
    "karras_sigmas",
    "ode_invert",
    "ode_sample",
    "perceptual_distance",
    "rec_discriminator_loss",
    "rec_loss",
    "sample_latents",
    "set_trainable",
    "slerp",
    "super_resolution",
    "teacher_loss",
]
