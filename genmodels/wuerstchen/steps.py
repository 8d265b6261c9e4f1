"""Würstchen training steps and the three-stage sampler, as plain functions.

Each training step is `(models, batch, cfg) -> (loss, logs)` with no optimizer, device or
distributed logic, so any harness (plain loop, DDP, Ray Train) can call it.

Conventions: images are NCHW float in [-1, 1]; text token states are (B, L, width), the
unpooled last-layer CLIP states; "latent_a" is `StageA.encode` output (already divided by
the 0.3764 scale); "latent_sem" is the raw `SemanticCompressor` output z (Stage C diffuses
(z + 1) / 42, see `stage_c.to_prior_space`).

models keys: "stage_a" (StageA), "compressor" (SemanticCompressor), "stage_b" (StageB),
"stage_c" (StageC), optional "perceptual" (frozen feature net for Stage A). Frozen models
(Stage A inside `stage_b_loss`, the compressor inside `stage_c_loss`) should be in eval mode:
both hold BatchNorms whose running statistics define the latent spaces.
"""
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from genmodels.wuerstchen.diffusion import (
    add_noise,
    drop_condition,
    eps_loss,
    linear_timesteps,
    sample,
    stage_c_timesteps,
)
from genmodels.wuerstchen.stage_a import hinge_d_loss, vqgan_loss
from genmodels.wuerstchen.stage_c import from_prior_space, to_prior_space


@dataclass(frozen=True)
class StageALossConfig:
    recon: str = "mse"  # "mse" or "l1"
    perceptual_weight: float = 1.0
    vq_weight: float = 1.0
    unquantized_weight: float = 0.0  # > 0: also reconstruct from the unquantized latent (v2 decodes it)
    # > 0: hinge GAN term -w * D(x_hat) for the decoder and a PatchGAN discriminator trained beside it
    # (VQGAN, Esser et al. 2021, Eq. 5; v1's Stage A code ships a discriminator, dome272/Wuerstchen
    # vqgan.py). The paper calls it optional; off by default.
    adversarial_weight: float = 0.0
    adversarial_start: int = 0  # optimizer step from which it is on (VQGAN's disc_start: reconstruct first)


@dataclass(frozen=True)
class StageBLossConfig:
    p_uncond: float = 0.05  # per-sample text dropout for CFG
    # Semantic-latent perturbation (v1, dome272/Wuerstchen modules.py ``Wrapper.forward``): with
    # p_sem_zero the latent is zeroed (the unconditional input), else with p_sem_noise it is noised
    # at t ~ U(0, sem_noise_tmax), so B learns to rely on a noisy, and sometimes absent, Stage C sample.
    p_sem_zero: float = 0.05
    p_sem_noise: float = 0.3
    sem_noise_tmax: float = 0.5
    # Where the noise is added. "prior" (v1, the default): in Stage C's space (z + shift) / scale =
    # (z + 1) / 42, where v1's compressor returns its latent (``EfficientNetEncoder.forward``) and
    # Stage B reads it; there the signal's std is ~1/42, so even t = 0.02 buries it (about 40x
    # stronger than "standardized", the same noise added to the unit-variance z that our Stage B
    # reads, which was this code's earlier choice). Zeroing is always in the standardized space:
    # zeros there are the unconditional input of our sampler and of v2's (diffusers
    # ``WuerstchenDecoderPipeline``: ``torch.zeros_like(image_embeddings)``).
    sem_noise_space: Literal["prior", "standardized"] = "prior"
    sem_latent_scale: float = 42.0  # Stage C's (z + shift) / scale: StageCConfig.latent_scale / latent_shift
    sem_latent_shift: float = 1.0
    # v1 draws zero / noise once per batch (np.random.rand() in Wrapper.forward, t per sample); False:
    # per sample (the same expected fractions, less variance between steps).
    sem_per_batch: bool = True
    p2: bool = True


@dataclass(frozen=True)
class StageCLossConfig:
    p_uncond: float = 0.05
    p2: bool = True


def stage_a_loss(models: dict[str, nn.Module], batch: dict[str, Tensor], cfg: StageALossConfig | None = None,
                 return_recon: bool = False):
    """Stage A (VQGAN) step. batch: "image" (B, 3, H, W) in [-1, 1]. With cfg.adversarial_weight > 0
    and models["discriminator"], adds the generator's hinge term; ``return_recon`` also returns the
    reconstruction, which ``stage_a_disc_loss`` takes (detached) for the discriminator's step."""
    cfg = cfg or StageALossConfig()
    disc = models.get("discriminator") if cfg.adversarial_weight > 0 else None
    loss, logs, x_hat = vqgan_loss(
        models["stage_a"], batch["image"], models.get("perceptual"),
        recon=cfg.recon, perceptual_weight=cfg.perceptual_weight, vq_weight=cfg.vq_weight,
        unquantized_weight=cfg.unquantized_weight, return_recon=True,
    )
    if disc is not None:
        g_adv = -disc(x_hat).mean()  # hinge generator loss (VQGAN Eq. 5)
        loss = loss + cfg.adversarial_weight * g_adv
        logs["g_adv"], logs["loss"] = g_adv.item(), loss.item()
    return (loss, logs, x_hat) if return_recon else (loss, logs)


def stage_a_disc_loss(models: dict[str, nn.Module], batch: dict[str, Tensor], recon: Tensor):
    """Discriminator step of Stage A's optional GAN term: hinge loss on real images vs reconstructions."""
    loss = hinge_d_loss(models["discriminator"](batch["image"]), models["discriminator"](recon.detach()))
    return loss, {"d_loss": loss.item()}


def perturb_semantic(z: Tensor, cfg: StageBLossConfig) -> Tensor:
    """v1's semantic-latent augmentation (see ``StageBLossConfig``): zero with p_sem_zero, else noise
    with p_sem_noise at t ~ U(0, tmax) per sample, in cfg.sem_noise_space; drawn per batch or sample."""
    n = 1 if cfg.sem_per_batch else z.shape[0]
    u_zero, u_noise = torch.rand(2, n, device=z.device)  # v1 draws twice: zero, else noise
    zero, noise = u_zero < cfg.p_sem_zero, (u_zero >= cfg.p_sem_zero) & (u_noise < cfg.p_sem_noise)
    t = torch.rand(z.shape[0], device=z.device) * cfg.sem_noise_tmax
    if cfg.sem_noise_space == "prior":
        p = (z + cfg.sem_latent_shift) / cfg.sem_latent_scale  # as stage_c.to_prior_space
        noised = add_noise(p, t, torch.randn_like(z)) * cfg.sem_latent_scale - cfg.sem_latent_shift
    else:
        noised = add_noise(z, t, torch.randn_like(z))
    view = (-1,) + (1,) * (z.dim() - 1)
    z = torch.where(noise.view(view), noised, z)
    return torch.where(zero.view(view), torch.zeros_like(z), z)


def stage_b_loss(models: dict[str, nn.Module], batch: dict[str, Tensor], cfg: StageBLossConfig | None = None):
    """Stage B step; the compressor trains jointly when it is given images.

    batch: "latent_a" (B, 4, h, w) Stage A latents, or "image" (B, 3, H, W) with models["stage_a"]
    (encoded here, frozen); "image_sem" (B, 3, H', W') images for the compressor, or
    "latent_sem" (B, 16, h', w') precomputed compressor latents; "text_tokens" (B, L, c_clip);
    optional "text_tokens_uncond" (1 or B, L, c_clip), the empty-caption states used for CFG
    dropout (zeros when absent).
    """
    cfg = cfg or StageBLossConfig()
    x0 = batch.get("latent_a")
    if x0 is None:
        with torch.no_grad():
            x0 = models["stage_a"].encode(batch["image"])
    z = batch["latent_sem"] if "latent_sem" in batch else models["compressor"](batch["image_sem"])
    z = perturb_semantic(z, cfg)
    text = drop_condition(batch["text_tokens"], cfg.p_uncond, batch.get("text_tokens_uncond"))
    loss, mse = eps_loss(models["stage_b"], x0, {"sem": z, "text": text}, p2=cfg.p2)
    return loss, {"loss": loss.item(), "mse": mse.mean().item()}


def stage_c_loss(models: dict[str, nn.Module], batch: dict[str, Tensor], cfg: StageCLossConfig | None = None):
    """Stage C step.

    batch: "latent_sem" (B, 16, h, w) precomputed compressor latents (preferred: precompute
    once), or "image_sem" with a frozen models["compressor"]; "text_tokens" (B, L, c_clip);
    optional "text_tokens_uncond" as in `stage_b_loss`.
    """
    cfg = cfg or StageCLossConfig()
    net = models["stage_c"]
    z = batch.get("latent_sem")
    if z is None:
        with torch.no_grad():
            z = models["compressor"](batch["image_sem"])
    x0 = to_prior_space(z, net.cfg)
    text = drop_condition(batch["text_tokens"], cfg.p_uncond, batch.get("text_tokens_uncond"))
    loss, mse = eps_loss(net, x0, {"text": text}, p2=cfg.p2)
    return loss, {"loss": loss.item(), "mse": mse.mean().item()}


def _ts(steps: int | Tensor | None, default: Tensor) -> Tensor:
    if steps is None:
        return default
    return linear_timesteps(steps) if isinstance(steps, int) else steps


@torch.no_grad()
def sample_stage_c(
    models: dict[str, nn.Module],
    text_tokens: Tensor,
    text_tokens_uncond: Tensor | None = None,
    *,
    sem_size: tuple[int, int],
    steps: int | Tensor | None = None,
    guidance: float = 4.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text -> compressor latent z (B, 16, *sem_size). Default: 29 steps, guidance 4."""
    net = models["stage_c"]
    shape = (text_tokens.shape[0], net.cfg.c_in, *sem_size)
    uncond = None if text_tokens_uncond is None else {"text": text_tokens_uncond.expand_as(text_tokens)}
    x = sample(net, shape, {"text": text_tokens}, _ts(steps, stage_c_timesteps()), uncond, guidance, generator)
    return from_prior_space(x, net.cfg)


@torch.no_grad()
def sample_stage_b(
    models: dict[str, nn.Module],
    sem: Tensor,
    text_tokens: Tensor,
    text_tokens_uncond: Tensor | None = None,
    *,
    latent_size: tuple[int, int],
    steps: int | Tensor | None = 12,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Compressor latent + text -> Stage A latent (B, 4, *latent_size). Unconditional = zero sem."""
    net = models["stage_b"]
    shape = (text_tokens.shape[0], net.cfg.c_in, *latent_size)
    cond = {"sem": sem, "text": text_tokens}
    uncond = None
    if text_tokens_uncond is not None:
        uncond = {"sem": torch.zeros_like(sem), "text": text_tokens_uncond.expand_as(text_tokens)}
    return sample(net, shape, cond, _ts(steps, linear_timesteps(12)), uncond, guidance, generator)


@torch.no_grad()
def sample_three_stage(
    models: dict[str, nn.Module],
    text_tokens_c: Tensor,
    text_tokens_b: Tensor,
    text_tokens_c_uncond: Tensor | None = None,
    text_tokens_b_uncond: Tensor | None = None,
    *,
    image_size: tuple[int, int],
    sem_size: tuple[int, int] | None = None,
    steps_c: int | Tensor | None = None,
    steps_b: int | Tensor | None = 12,
    guidance_c: float = 4.0,
    guidance_b: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text -> images (B, 3, *image_size) in [-1, 1]: Stage C -> Stage B -> Stage A decode.

    text_tokens_c feed Stage C (CLIP-bigG in the paper), text_tokens_b Stage B (CLIP-H).
    sem_size defaults to models["compressor"].latent_size(image_size).
    """
    if sem_size is None:
        if "compressor" not in models:
            raise ValueError("pass sem_size or include models['compressor']")
        sem_size = models["compressor"].latent_size(image_size)
    stage_a = models["stage_a"]
    latent_size = tuple(s // stage_a.downscale for s in image_size)
    z = sample_stage_c(models, text_tokens_c, text_tokens_c_uncond, sem_size=sem_size, steps=steps_c,
                       guidance=guidance_c, generator=generator)
    lat = sample_stage_b(models, z, text_tokens_b, text_tokens_b_uncond, latent_size=latent_size, steps=steps_b,
                         guidance=guidance_b, generator=generator)
    return stage_a.decode(lat).clamp(-1, 1)
