"""PaGoDA training steps as pure functions for the harness (Stages 1, 2a, 2b, 3; Sec. 3-4).

Every step takes `models` (a dict), a `batch` (a dict of tensors) and a PagodaConfig and returns
(loss, logs); the harness owns optimizers, backward, EMA and distribution. For Stage 2b/3 it
alternates `generator_loss` (optimizer over G's trainable params) and `discriminator_loss`
(optimizer over D's trainable params; D's frozen backbone has requires_grad False). The
generator step backpropagates through D, so zero D's grads before its own backward (the usual
opt.zero_grad(); loss.backward(); opt.step()).

models: "teacher" EDMPrecond (frozen), "generator" Generator, "discriminator" ProjectedDiscriminator,
        "rec_discriminator" ProjectedDiscriminator (only with cfg.rec_discriminator; its step: rec_discriminator_loss),
        "perceptual" feature net(s) for L_rec / L_dstl (losses.FrozenFeatures, TinyFeatures, or a list),
        "clip_image" (text-to-image with w_clip > 0) callable [-1, 1] images -> (B, D) embeddings.
batch:  "image"      (B, 3, R, R) in [-1, 1] at the stage's resolution R (teacher: base resolution)
        "latent"     (B, 3, r, r) inverted latent z at the sigma_max scale, r = base resolution
        "label"      (B,) int64 class, -1 = unconditional (or (B, K) one-hot)     [class-conditional]
        "text"       (B, L, c) text token states (genmodels.clip.encode_text_tokens)  [text-to-image]
        "text_mask"  (B, L) bool, True = real token                                 [optional]
        "text_embed" (B, D) pooled CLIP text embedding (D's condition, CLIP reg)    [text-to-image]
        "noise"      (B, 3, r, r) fresh z ~ N(0, sigma_max^2) for fakes            [optional; drawn if absent]
        "omega"      (B,) CFG scales for the omega-conditioned G                   [optional; drawn if absent]
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genmodels.pagoda.edm import EDMConfig, Guided, edm_loss
from genmodels.pagoda.losses import (
    adaptive_weight,
    clip_loss,
    d_hinge_loss,
    g_hinge_loss,
    last_layer_grad_norm,
    rec_loss,
)
from genmodels.pagoda.ode import ode_invert, ode_sample
from genmodels.pagoda.perceptual import RecAugment


@dataclass(frozen=True)
class PagodaConfig:
    """What the losses need. Optimization (the paper: RAdam, lr_G 8e-6, lr_D 2e-3, EMA 0.999, batch
    96/256/360/512) is the harness's alone: workflows.pagoda.stages' `train` section (lr, ema_decay,
    batch_size) and `lr_d`, so there is one place to set it."""

    resolution: int = 16  # output resolution of this stage
    edm: EDMConfig = field(default_factory=EDMConfig)
    inversion_points: int = 40  # Stage 2a: 40-point Karras grid, 0.002 -> 80 (78 evaluations)
    w_adv: float = 0.2  # 0.2 at the base resolution (Stage 2b), 1.0 while growing (Stage 3)
    adaptive: bool = True  # VQGAN adaptive lambda; False: lambda = 1
    # Above this resolution the fresh-noise term takes lambda = 1: the official 256/512 scripts
    # (sony/pagoda commands/res64to256.sh, res64to512.sh) leave --decoder_adaptive_weight False, which
    # makes cm/karras_diffusion.py pass a zero L_rec to get_adaptive_weight and so weight 1.
    adaptive_max_resolution: int = 128
    # W of lambda: "last_block" (the last decoder ResBlock's second conv, official) or "head" (output conv)
    lambda_layer: str = "last_block"
    lambda_min: float = 0.01
    lambda_max: float = 10.0
    lambda_eps: float = 1e-4
    separate_updates: bool = False  # >= 256: even steps L_rec, odd steps L_adv (own optimizer steps)
    w_rec_adv: float = 0.0  # 512: adversarial loss on the reconstructions G(z_inv) (0.5)
    # True: that loss uses its own discriminator models["rec_discriminator"] trained on reals vs
    # reconstructions (official --recon_discriminator=True at 512); False: the main D judges them too.
    rec_discriminator: bool = False
    # L_rec's distance: the same random DiffAugment on G's output and the target, per step and net
    # (official; sony/pagoda cm/enc_dec_lib.py get_xl_feature, perceptual.py); False: no augmentation.
    rec_augment: bool = True
    omega_range: tuple[float, float] = (0.0, 0.0)  # text-to-image: omega ~ U(range) (not public)
    # The adversarial game's omega. "zero": fakes G(eps, c, 0) against reals, D told omega = 0 for both,
    # as the official D sees the same data condition for reals and fakes and no guidance (cm/karras_
    # diffusion.py get_decoder_discriminator_loss); guidance is L_dstl's (and CLIP's). "shared": fakes at
    # omega ~ U(omega_range) and reals shown with the fakes' omega (our earlier choice; it pulls guided
    # samples toward the unguided data, i.e. against guidance).
    adv_omega: str = "zero"
    # text-to-image: L_dstl toward the teacher's CFG-omega ODE solution (not public). Its targets come
    # precomputed in the batch (``dstl_noise``, ``dstl_omega``, ``dstl_target``: pagoda_invert); without
    # them the teacher (models["teacher"]) solves the ODE from the fakes' noise online (dstl_points).
    w_dstl: float = 0.0
    dstl_points: int = 40
    w_clip: float = 0.0  # text-to-image: CLIP regularization (not public)

    @property
    def adaptive_adv(self) -> bool:
        """Whether the fresh-noise adversarial term gets the adaptive lambda at this resolution."""
        return self.adaptive and self.resolution <= self.adaptive_max_resolution


PRESETS = {
    "tiny": PagodaConfig(resolution=16),
    "tiny_grow": PagodaConfig(resolution=32, w_adv=1.0, separate_updates=True, w_rec_adv=0.5),
    "tiny_text": PagodaConfig(resolution=16, omega_range=(0.0, 4.0), w_dstl=1.0, dstl_points=4, w_clip=0.1),
    "paper": PagodaConfig(resolution=64),
    "paper128": PagodaConfig(resolution=128, w_adv=1.0),
    "paper256": PagodaConfig(resolution=256, w_adv=1.0, separate_updates=True),
    "paper512": PagodaConfig(resolution=512, w_adv=1.0, separate_updates=True, w_rec_adv=0.5, rec_discriminator=True),
    # Text-to-image weights and the omega range are not published; these are our defaults.
    "paper_text": PagodaConfig(resolution=64, omega_range=(0.0, 8.0), w_dstl=1.0, w_clip=0.1),
}


def _cond(batch: dict) -> dict:
    return {k: batch[k] for k in ("label", "text", "text_mask") if batch.get(k) is not None}


def _d_cond(batch: dict) -> dict:
    return {k: batch[k] for k in ("label", "text_embed") if batch.get(k) is not None}


def teacher_loss(models: dict, batch: dict, cfg: PagodaConfig) -> tuple[Tensor, dict]:
    """Stage 1: EDM loss of the base-resolution teacher with condition dropout (Sec. 3.1)."""
    loss = edm_loss(models["teacher"], batch["image"], cfg.edm, **_cond(batch))
    return loss, {"loss": loss.detach()}


@torch.no_grad()
def invert_latents(models: dict, batch: dict, cfg: PagodaConfig) -> dict:
    """Stage 2a: latents of each image and of its horizontal flip (each flip gets its own z)."""
    teacher, e = models["teacher"], cfg.edm
    x = batch["image"].float()
    r = teacher.net.cfg.img_resolution
    if x.shape[-1] != r:
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp(-1, 1)
    kw = dict(num_points=cfg.inversion_points, sigma_min=e.sigma_min, sigma_max=e.sigma_max, rho=e.rho, **_cond(batch))
    return {"latent": ode_invert(teacher, x, **kw), "latent_flip": ode_invert(teacher, x.flip(-1), **kw)}


def _fresh(batch: dict, gen: nn.Module, cfg: PagodaConfig) -> tuple[Tensor, Tensor | None]:
    """Noise and omega of the adversarial fakes (batch "noise" / "omega" override the draws)."""
    z = batch["latent"]
    noise = batch.get("noise")
    if noise is None:
        noise = torch.randn_like(z, dtype=torch.float32) * gen.cfg.sigma_max
    omega = None
    if gen.cfg.omega_cond:
        omega = batch.get("omega")
        if omega is None:
            lo, hi = cfg.omega_range if cfg.adv_omega == "shared" else (0.0, 0.0)
            omega = torch.rand(z.shape[0], device=z.device) * (hi - lo) + lo
    return noise, omega


def _augment(cfg: PagodaConfig) -> RecAugment | None:
    return RecAugment() if cfg.rec_augment else None


def _lambda(
    cfg: PagodaConfig, adaptive: bool, l_rec: Tensor | None, l_adv: Tensor, w: Tensor, rec_norm: Tensor | None = None
) -> Tensor:
    if not adaptive or not w.requires_grad:
        return torch.ones((), device=l_adv.device)
    return adaptive_weight(l_rec, l_adv, w, cfg.lambda_min, cfg.lambda_max, cfg.lambda_eps, rec_grad_norm=rec_norm)


def generator_loss(models: dict, batch: dict, cfg: PagodaConfig, step: int = 0) -> tuple[Tensor, dict]:
    """Stage 2b/3 generator step (Sec. 3.2-3.3, Sec. 4.2):

    L = L_rec(G(z_inv, c), x) + w_adv * lambda * L_adv(G(eps, c))
        [+ w_rec_adv * lambda_r * L_adv(G(z_inv, c))] [+ w_dstl * L_dstl + w_clip * L_clip],
    fakes from fresh noise eps ~ N(0, 80^2 I) (at omega 0 unless adv_omega="shared"); L_dstl =
    d(G(eps_d, c, omega_d), teacher's CFG-omega_d solution from eps_d), read from the batch when
    precomputed, and CLIP on that guided output. lambda is adaptive up to cfg.adaptive_max_resolution
    and 1 above it; lambda_r is adaptive whenever cfg.adaptive. With separate_updates, even steps
    return the reconstruction terms and odd steps the adversarial ones (an adaptive lambda's
    ||grad_W L_rec|| is then taken with the trunk below W run without autograd, so only one big
    graph lives at a time).
    """
    gen, disc, feats = models["generator"], models["discriminator"], models["perceptual"]
    cond, d_cond = _cond(batch), _d_cond(batch)
    z, x = batch["latent"], batch["image"]
    w = gen.adaptive_layer(cfg.lambda_layer)
    disc_rec = models["rec_discriminator"] if cfg.rec_discriminator else disc
    omega0 = 0.0 if gen.cfg.omega_cond else None  # reconstructions are the unguided (omega = 0) decoder
    rec_phase = not cfg.separate_updates or step % 2 == 0
    adv_phase = (not cfg.separate_updates or step % 2 == 1) and (cfg.w_adv > 0 or cfg.w_dstl > 0 or cfg.w_clip > 0)
    loss, logs, l_rec = torch.zeros((), device=z.device), {}, None
    aug = _augment(cfg)

    if rec_phase:
        x_rec = gen(z, omega=omega0, **cond)
        l_rec = rec_loss(feats, x_rec, x, aug)
        loss = loss + l_rec
        logs["l_rec"] = l_rec.detach()
        if cfg.w_rec_adv > 0:
            l_rec_adv = g_hinge_loss(disc_rec(x_rec, omega=omega0, **d_cond))
            lam_r = _lambda(cfg, cfg.adaptive, l_rec, l_rec_adv, w)  # official: adaptive at 512 too
            loss = loss + cfg.w_rec_adv * lam_r * l_rec_adv
            logs.update(l_rec_adv=l_rec_adv.detach(), lambda_rec=lam_r)

    if adv_phase:
        noise, omega = _fresh(batch, gen, cfg)
        # fakes reuse the batch's conditions (data label/prompt marginal); with precomputed L_dstl targets
        # and no adversarial term, CLIP and L_dstl need only the L_dstl fake
        stored = cfg.w_dstl > 0 and batch.get("dstl_target") is not None
        fake = gen(noise, omega=omega, **cond) if cfg.w_adv > 0 or not stored else None
        if cfg.w_adv > 0:
            l_adv = g_hinge_loss(disc(fake, omega=omega, **d_cond))
            rec_norm = None
            if l_rec is None and cfg.adaptive_adv and w.requires_grad:
                tail = 0 if cfg.lambda_layer == "head" else 1
                l_rec_w = rec_loss(feats, gen.forward_split(z, omega=omega0, grad_tail=tail, **cond), x, aug)
                rec_norm = last_layer_grad_norm(l_rec_w, w)
                logs["l_rec"] = l_rec_w.detach()  # L_rec at the current weights, so every step logs it
            lam = _lambda(cfg, cfg.adaptive_adv, l_rec, l_adv, w, rec_norm)
            loss = loss + cfg.w_adv * lam * l_adv
            logs.update(l_adv=l_adv.detach(), lambda_adv=lam)
        guided = fake  # G's guided output for CLIP: the L_dstl fake where there is one
        if cfg.w_dstl > 0:
            guided, target = _dstl_pair(models, batch, cfg, noise, omega, fake, cond)
            l_dstl = rec_loss(feats, guided, target, aug)
            loss = loss + cfg.w_dstl * l_dstl
            logs["l_dstl"] = l_dstl.detach()
        if cfg.w_clip > 0:
            l_clip = clip_loss(models["clip_image"], guided, batch["text_embed"])
            loss = loss + cfg.w_clip * l_clip
            logs["l_clip"] = l_clip.detach()

    logs["loss"] = loss.detach()
    return loss, logs


def _dstl_pair(models: dict, batch: dict, cfg: PagodaConfig, noise: Tensor, omega: Tensor | None, fake: Tensor,
               cond: dict) -> tuple[Tensor, Tensor]:
    """(G's output, the teacher's CFG-omega ODE solution from the same noise) for L_dstl.

    Precomputed (batch ``dstl_target`` from ``dstl_noise`` at ``dstl_omega``, pagoda_invert): one more G
    pass on that noise. Otherwise the teacher solves from the adversarial fakes' noise and omega online
    (2 * dstl_points - 1 guided evaluations, i.e. ~2x that many teacher passes, every step).
    """
    gen = models["generator"]
    if batch.get("dstl_target") is not None:
        w = batch["dstl_omega"] if gen.cfg.omega_cond else None
        return gen(batch["dstl_noise"], omega=w, **cond), batch["dstl_target"]
    if "teacher" not in models:
        raise KeyError("w_dstl > 0 needs the batch's precomputed dstl_target (pagoda_invert dstl) or models['teacher']")
    if gen.cfg.omega_cond and cfg.adv_omega != "shared":  # the adversarial fakes are unguided: draw omega here
        lo, hi = cfg.omega_range
        omega = torch.rand(noise.shape[0], device=noise.device) * (hi - lo) + lo
        fake = gen(noise, omega=omega, **cond)
    e = cfg.edm
    with torch.no_grad():
        target = ode_sample(Guided(models["teacher"], 0.0 if omega is None else omega), noise,
                            cfg.dstl_points, e.sigma_min, e.sigma_max, e.rho, **cond)
    return fake, target


def discriminator_loss(models: dict, batch: dict, cfg: PagodaConfig) -> tuple[Tensor, dict]:
    """Hinge D step: E relu(1 - D(x)) + E relu(1 + D(G(eps))) [+ w_rec_adv E relu(1 + D(G(z_inv)))]."""
    gen, disc = models["generator"], models["discriminator"]
    cond, d_cond = _cond(batch), _d_cond(batch)
    noise, omega = _fresh(batch, gen, cfg)
    with torch.no_grad():
        fake = gen(noise, omega=omega, **cond)
    # Reals take the fakes' omega: 0 by default (adv_omega "zero", the official game without guidance);
    # with "shared", the fakes' random omega (the earlier choice, which works against guidance).
    real_logits = disc(batch["image"], omega=omega, **d_cond)
    fake_logits = disc(fake, omega=omega, **d_cond)
    loss = d_hinge_loss(real_logits, fake_logits)
    logs = {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
    if cfg.w_rec_adv > 0 and not cfg.rec_discriminator:
        omega0 = 0.0 if gen.cfg.omega_cond else None
        with torch.no_grad():
            x_rec = gen(batch["latent"], omega=omega0, **cond)
        rec_logits = disc(x_rec, omega=omega0, **d_cond)
        loss = loss + cfg.w_rec_adv * F.relu(1 + rec_logits).mean()
        logs["d_rec"] = rec_logits.detach().mean()
    logs["loss"] = loss.detach()
    return loss, logs


def rec_discriminator_loss(models: dict, batch: dict, cfg: PagodaConfig) -> tuple[Tensor, dict]:
    """Hinge step of the separate reconstruction discriminator (512 px, `rec_discriminator`):
    E relu(1 - D_r(x)) + E relu(1 + D_r(G(z_inv))) (sony/pagoda cm/karras_diffusion.py, recon=True)."""
    gen, disc = models["generator"], models["rec_discriminator"]
    cond, d_cond = _cond(batch), _d_cond(batch)
    omega0 = 0.0 if gen.cfg.omega_cond else None
    with torch.no_grad():
        x_rec = gen(batch["latent"], omega=omega0, **cond)
    real_logits = disc(batch["image"], omega=omega0, **d_cond)
    rec_logits = disc(x_rec, omega=omega0, **d_cond)
    loss = d_hinge_loss(real_logits, rec_logits)
    return loss, {"loss": loss.detach(), "d_rec_real": real_logits.detach().mean(), "d_rec": rec_logits.detach().mean()}


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (parameters); buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
