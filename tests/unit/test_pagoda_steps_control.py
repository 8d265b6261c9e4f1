"""PaGoDA training steps (teacher, inversion pairs, G/D alternation, growth, text) and controllable generation."""
import dataclasses

import torch

from genmodels.pagoda import control
from genmodels.pagoda.discriminator import PRESETS as D_PRESETS
from genmodels.pagoda.discriminator import ProjectedDiscriminator
from genmodels.pagoda.edm import EDMPrecond
from genmodels.pagoda.generator import Generator, GeneratorConfig
from genmodels.pagoda.growth import grow_2x
from genmodels.pagoda.losses import TinyFeatures
from genmodels.pagoda.steps import (
    PRESETS,
    discriminator_loss,
    ema_update,
    generator_loss,
    invert_latents,
    teacher_loss,
)
from genmodels.pagoda.unet import PRESETS as NET_PRESETS
from genmodels.pagoda.unet import UNet


def _teacher(preset="tiny"):
    teacher = EDMPrecond(UNet(NET_PRESETS[preset]))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher.requires_grad_(False)


def _models(preset="tiny", d_cfg=None, omega=False):
    teacher = _teacher(preset)
    gen = Generator.from_teacher(teacher, GeneratorConfig(omega_cond=omega))
    disc = ProjectedDiscriminator.tiny(d_cfg or D_PRESETS["tiny"])
    return {"teacher": teacher, "generator": gen, "discriminator": disc, "perceptual": TinyFeatures(size=32)}


def _batch(res=16, n=2):
    return {"image": torch.rand(n, 3, res, res) * 2 - 1, "latent": torch.randn(n, 3, 16, 16) * 80,
            "label": torch.arange(n)}


def test_teacher_step_and_inversion_pairs():
    torch.manual_seed(0)
    models, batch = _models(), _batch()
    loss, logs = teacher_loss({"teacher": EDMPrecond(UNet(NET_PRESETS["tiny"]))}, batch, PRESETS["tiny"])
    loss.backward()
    assert loss.ndim == 0 and "loss" in logs
    cfg = dataclasses.replace(PRESETS["tiny"], inversion_points=6)
    out = invert_latents(models, {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.arange(2)}, cfg)
    assert out["latent"].shape == out["latent_flip"].shape == (2, 3, 16, 16)
    assert not torch.allclose(out["latent_flip"], out["latent"].flip(-1))  # the flip gets its own inversion


def test_generator_rec_loss_decreases_on_fixed_pairs():
    torch.manual_seed(0)
    models, batch = _models(), _batch(n=4)
    cfg = dataclasses.replace(PRESETS["tiny"], w_adv=0.0)
    gen = models["generator"]
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss, logs = generator_loss(models, batch, cfg)
        first = first if first is not None else logs["l_rec"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["l_rec"].item() < 0.7 * first


def test_base_stage_alternation():
    torch.manual_seed(0)
    models, batch = _models(), _batch()
    gen, disc = models["generator"], models["discriminator"]
    loss, logs = generator_loss(models, batch, PRESETS["tiny"], step=0)
    loss.backward()
    assert {"l_rec", "l_adv", "lambda_adv", "loss"} <= set(logs)
    assert 0.01 <= logs["lambda_adv"].item() <= 10
    assert all(p.grad is not None for p in gen.parameters())
    gen.zero_grad()
    disc.zero_grad()
    loss, logs = discriminator_loss(models, batch, PRESETS["tiny"])
    loss.backward()
    assert {"d_real", "d_fake"} <= set(logs) and loss.item() > 0
    assert all(p.grad is None for p in gen.parameters())  # fakes are detached in the D step


def test_separate_updates_lambda_matches_joint():
    torch.manual_seed(0)
    d_cfg = dataclasses.replace(D_PRESETS["tiny"], augment=())
    models = _models(d_cfg=d_cfg)
    models["discriminator"].eval()  # freeze spectral-norm power iteration so both calls see one D
    models["generator"] = grow_2x(models["generator"])
    batch = dict(_batch(res=32), noise=torch.randn(2, 3, 16, 16) * 80)
    joint = dataclasses.replace(PRESETS["tiny_grow"], separate_updates=False, w_rec_adv=0.0)
    _, logs_joint = generator_loss(models, batch, joint)
    cfg = PRESETS["tiny_grow"]
    _loss_rec, logs_rec = generator_loss(models, batch, cfg, step=0)
    loss_adv, logs_adv = generator_loss(models, batch, cfg, step=1)
    assert {"l_rec", "l_rec_adv", "lambda_rec"} <= set(logs_rec) and "l_adv" not in logs_rec
    assert "l_adv" in logs_adv and "l_rec_adv" not in logs_adv
    assert not logs_adv["l_rec"].requires_grad  # logged at the current weights, no second graph
    assert torch.allclose(logs_adv["lambda_adv"], logs_joint["lambda_adv"], rtol=1e-4)
    loss_adv.backward()
    gen = models["generator"]
    assert all(p.grad is None for p in gen.net.enc.parameters())  # frozen encoder
    assert gen.net.dec["32x32_up"].conv0.weight.grad is not None
    _, d_logs = discriminator_loss(models, batch, cfg)
    assert "d_rec" in d_logs  # 512-style extra reconstruction term


def test_text_stage_dstl_clip_and_omega():
    torch.manual_seed(0)
    models = _models("tiny_text", D_PRESETS["tiny_text"], omega=True)
    models["clip_image"] = lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)[:, :32]
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "latent": torch.randn(2, 3, 16, 16) * 80,
             "text": torch.randn(2, 5, 32), "text_mask": torch.ones(2, 5, dtype=torch.bool),
             "text_embed": torch.randn(2, 32)}
    loss, logs = generator_loss(models, batch, PRESETS["tiny_text"])
    loss.backward()
    assert {"l_rec", "l_adv", "l_dstl", "l_clip"} <= set(logs)
    assert models["generator"].map_omega[2].weight.grad.abs().sum() > 0  # omega path trains
    loss, logs = discriminator_loss(models, batch, PRESETS["tiny_text"])
    assert torch.isfinite(loss)


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    want = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, want)


def test_slerp_and_interpolate():
    z0, z1 = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    z0[0, 0, 0, 0], z1[0, 1, 0, 0] = 2.0, 2.0
    assert torch.allclose(control.slerp(z0, z1, 0.0), z0) and torch.allclose(control.slerp(z0, z1, 1.0), z1)
    assert abs(control.slerp(z0, z1, 0.5).norm().item() - 2.0) < 1e-5  # stays on the sphere
    assert torch.allclose(control.slerp(z0, z0, 0.3), z0)  # parallel: lerp fallback
    gen = Generator.from_teacher(_teacher())
    out = control.interpolate(gen, torch.randn(2, 3, 16, 16) * 80, torch.randn(2, 3, 16, 16) * 80, 3,
                              label=torch.tensor([0, 1]))
    assert out.shape == (3, 2, 3, 16, 16)


def test_super_resolution_transfer_and_inpaint():
    torch.manual_seed(0)
    teacher = _teacher()
    gen = Generator.from_teacher(teacher)
    big = grow_2x(gen)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    label = torch.tensor([1, 2])
    assert control.super_resolution(big, teacher, y, num_points=4, label=label).shape == (2, 3, 32, 32)
    a = control.condition_transfer(gen, teacher, y, {"label": label}, {"label": torch.tensor([5, 5])}, num_points=4)
    b = control.condition_transfer(gen, teacher, y, {"label": label}, {"label": label}, num_points=4)
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(a, b)

    x = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1
    z0 = torch.randn(1, 3, 16, 16) * 80
    with torch.no_grad():
        err0 = ((gen(z0, label=label[:1]) - x) ** 2 * mask).mean()
    out, z = control.inpaint(gen, x, mask, z=z0, steps=15, lr=0.05, label=label[:1])
    with torch.no_grad():
        err1 = ((gen(z, label=label[:1]) - x) ** 2 * mask).mean()
    assert err1 < err0
    assert torch.equal(out[..., :8], x[..., :8])  # known pixels kept
    assert all(p.grad is None for p in gen.parameters())
