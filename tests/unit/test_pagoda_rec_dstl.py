"""Issue 12 items 8 and 9: L_rec's official feature space (fixed random projection, one augmentation
shared by both images) and text-to-image L_dstl read from targets the inversion stage precomputed,
with the adversarial game at omega 0."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genmodels.pagoda import (
    EDMPrecond,
    Generator,
    GeneratorConfig,
    Guided,
    ProjectedFeatures,
    RandomProjection,
    RecAugment,
    TinyFeatures,
    UNet,
    apply_augment,
    augment_params,
    build_timm_features,
    discriminator_loss,
    generator_loss,
    ode_sample,
    perceptual_distance,
)
from genmodels.pagoda.discriminator import PRESETS as D_PRESETS
from genmodels.pagoda.discriminator import ProjectedDiscriminator
from genmodels.pagoda.steps import PRESETS
from genmodels.pagoda.unet import PRESETS as NET_PRESETS
from pipeline.config import ConfigError, build
from pipeline.store import Store
from tests.unit.test_pagoda_stages import make_fake_shard, tiny_teacher_artifact
from workflows.fixed_batch import run_fixed
from workflows.pagoda.invert import InvertConfig, Inverter
from workflows.pagoda.stages import DistillConfig, build_perceptual, check_dstl

# ------------------------------------------------------------------------------------------
# Item 8: shared augmentation


def test_augment_params_follow_the_official_ranges():
    p = augment_params(4000, 16, 16, "cpu", generator=torch.Generator().manual_seed(0))
    assert p["brightness"].min() >= -0.5 and p["brightness"].max() <= 0.5
    assert p["saturation"].min() >= 0 and p["saturation"].max() <= 2
    assert p["contrast"].min() >= 0.5 and p["contrast"].max() <= 1.5
    assert set(p["ty"].unique().tolist()) == set(range(-2, 3))  # int(16 * 0.125 + 0.5) = 2
    assert p["cut"].tolist() == [3, 3] and p["cy"].max() <= 16  # int(16 * 0.2 + 0.5) = 3, odd: one extra


def test_apply_augment_translates_and_cuts_exactly():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 400 - 0.5
    p = augment_params(2, 8, 8, "cpu", cutout_ratio=0.25, generator=torch.Generator().manual_seed(0))
    p.update(brightness=torch.zeros(2, 1, 1, 1), saturation=torch.ones(2, 1, 1, 1), contrast=torch.ones(2, 1, 1, 1),
             ty=torch.tensor([[[1]], [[0]]]), tx=torch.tensor([[[0]], [[-1]]]),
             cy=torch.tensor([[[-9]], [[4]]]), cx=torch.tensor([[[-9]], [[4]]]))  # image 0: cutout off the image
    out = apply_augment(x, p)
    assert torch.equal(out[0, :, :7], x[0, :, 1:]) and (out[0, :, 7] == 0).all()  # one row up, zero fill
    assert (out[1, :, :, 0] == 0).all()  # one column right, zero fill
    zero = (out[1] == 0).all(0)
    assert int(zero.sum()) == 8 + 4 and zero[3:5, 3:5].all()  # the zero column plus a 2x2 cutout at (3..4, 3..4)


def test_shared_augmentation_keeps_identical_images_at_distance_zero():
    torch.manual_seed(0)
    net = TinyFeatures(size=32)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert perceptual_distance(net, x, x.clone(), RecAugment()).abs().max() < 1e-6  # the same draw for both
    y = x + 0.2 * torch.randn_like(x)
    d0 = perceptual_distance(net, x, y)
    draws = torch.stack([perceptual_distance(net, x, y, RecAugment()) for _ in range(4)])
    assert (draws - d0).abs().max() > 1e-4 and draws.std(0).max() > 1e-5  # augmented, a new draw per call
    xg = x.clone().requires_grad_(True)
    perceptual_distance(net, xg, y, RecAugment()).sum().backward()
    assert xg.grad.abs().sum() > 0  # differentiable in G's output


# ------------------------------------------------------------------------------------------
# Item 8: fixed random projection


def test_random_projection_channels_scales_and_seed():
    maps = [torch.randn(2, c, s, s) for c, s in ((24, 16), (40, 8), (112, 4), (320, 2))]  # EfficientNet-lite0
    proj = RandomProjection([24, 40, 112, 320])
    out = proj(maps)
    assert proj.channels == [64, 64, 128, 256]  # F_RandomProj(cout=64, expand=True).CHANNELS
    assert [tuple(o.shape[1:]) for o in out] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]  # CSM: 2x
    assert not any(p.requires_grad for p in proj.parameters())
    again, other = RandomProjection([24, 40, 112, 320]), RandomProjection([24, 40, 112, 320], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again(maps), out))  # fixed by its seed
    assert not torch.allclose(other(maps)[0], out[0])
    vit = RandomProjection([768] * 4, reassemble=True)  # ViT maps share one grid: 4x, 2x, 1x, 0.5x first
    out = vit([torch.randn(1, 768, 14, 14) for _ in range(4)])
    assert [tuple(o.shape[1:]) for o in out] == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14)]
    assert [m[0].out_channels for m in vit.reassemble] == [96, 192, 384, 768]  # DeiT-B's reassembly widths


def test_projected_features_reassemble_a_real_vit_and_stay_frozen():
    vit = build_timm_features("vit_tiny_patch16_224", (2, 5, 8, 11), pretrained=False)
    feats = ProjectedFeatures(vit, vit.channels)
    assert len(feats.proj.reassemble) == 4 and feats.size == 224
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = feats(x)
    assert [o.shape[-1] for o in out] == [112, 56, 28, 14]  # 14x14 tokens -> 56, 28, 14, 7, then CSM 2x
    sum(o.sum() for o in out).backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in feats.parameters())
    feats.train()
    assert not vit.backbone.training


def test_stage_builds_the_projected_distance_by_default():
    nets = build_perceptual(DistillConfig(), 16)
    assert isinstance(nets[0], ProjectedFeatures) and nets[0].channels == [8, 8]  # the tiny net's own width
    raw = build_perceptual(DistillConfig(perceptual_projection=False), 16)
    assert isinstance(raw[0], TinyFeatures)
    cfg = DistillConfig()
    assert cfg.rec_augment and cfg.adv_omega == "zero"
    with pytest.raises(ConfigError, match=r"^stages.d.adv_omega: expected 'zero' or 'shared'"):
        build(DistillConfig, {"adv_omega": "fake"}, "stages.d")


# ------------------------------------------------------------------------------------------
# Item 9: precomputed L_dstl targets


def _inverter(store, spec, rows=3, **kw):
    shard = store.artifact("shard", "k")
    make_fake_shard(shard, rows, resolutions=(16,), files=1, heldout_fraction=0.0)
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart)
    table = pq.read_table(shard.child("parquet/00000.parquet"))
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    return Inverter(tart, points=4, dstl=spec, **kw), batch, tart


def test_inverter_precomputes_dstl_targets_seeded_by_sample_id(tmp_path):
    spec = InvertConfig(dstl=True, dstl_omega_range=(1.0, 3.0), dstl_points=3, dstl_seed=5).dstl_spec()
    inv, batch, tart = _inverter(Store(str(tmp_path)), spec)
    out = inv(batch)
    n = len(batch["sample_id"])
    assert out["dstl_noise"].shape == out["dstl_target"].shape == (n, 3, 16, 16) and out["dstl_omega"].shape == (n,)
    assert ((out["dstl_omega"] >= 1) & (out["dstl_omega"] <= 3)).all() and len(set(out["dstl_omega"])) == n
    assert 40 < out["dstl_noise"].std() < 120 and np.abs(out["dstl_target"]).max() <= 1
    # The same rows in another order and batch give the same values per id (a rewritten chunk: exactly once).
    rev = {k: v[::-1] for k, v in batch.items()}
    out2 = inv(rev)
    for k in ("dstl_noise", "dstl_omega", "dstl_target"):
        np.testing.assert_allclose(out2[k][::-1], out[k], atol=1e-5)
    # The target is the CFG-omega teacher's Heun solution from the stored noise (on the inverter's
    # fixed batch: this machine's kernels differ below 16 rows, and 3 Heun points amplify it to ~4e-5).
    cond = inv.text(list(batch["caption"]))

    def solve(omega, noise, text, mask):
        return ode_sample(Guided(inv.teacher, omega), noise, 3, text=text, text_mask=mask)

    want = run_fixed(solve, inv.compute_batch, torch.from_numpy(out["dstl_omega"]), torch.from_numpy(out["dstl_noise"]),
                     cond["text"], cond["text_mask"]).clamp(-1, 1)
    np.testing.assert_allclose(out["dstl_target"], want.numpy(), atol=1e-5)
    other = Inverter(tart, points=4, dstl={**spec, "seed": 6})(batch)
    assert not np.allclose(other["dstl_noise"], out["dstl_noise"])
    assert "dstl_target" not in Inverter(tart, points=4)(batch)  # off by default


def test_inverter_rows_do_not_depend_on_how_ray_data_batched_them(tmp_path):
    """Below 16 rows this machine's convolutions differ by ~3e-7 from the same rows in a larger batch,
    and the 20-point inversion carries that into every latent. The teacher always sees
    ``compute_batch`` rows, so a row inverted in a short batch equals the same row in a full one."""
    spec = InvertConfig(dstl=True, dstl_omega_range=(1.0, 3.0), dstl_points=3).dstl_spec()
    store = Store(str(tmp_path))
    inv, batch, _ = _inverter(store, spec, rows=20, compute_batch=20, check=20, report=store.artifact("r", "whole"))
    whole = inv(batch)
    assert whole["latent"].shape == (20, 3, 16, 16)
    inv.report, inv.check = store.artifact("r", "parts"), 20
    for lo, hi in ((0, 3), (3, 17), (17, 20)):
        part = inv({k: v[lo:hi] for k, v in batch.items()})
        for k in ("latent", "latent_flip", "dstl_target", "text"):
            np.testing.assert_array_equal(part[k], whole[k][lo:hi], err_msg=f"{k} rows {lo}:{hi}")

    def roundtrip(art):  # the report of the round-trip check: mean |Heun(z) - x| per sample id
        reports = [art.read_json(f) for f in art.list(".json", "roundtrip")]
        return {i: m for r in reports for i, m in zip(r["sample_id"], r["mae"])}

    by_part, by_whole = roundtrip(store.artifact("r", "parts")), roundtrip(store.artifact("r", "whole"))
    assert len(by_whole) == 20 and by_part == by_whole


def _text_models():
    torch.manual_seed(0)
    teacher = EDMPrecond(UNet(NET_PRESETS["tiny_text"]))
    with torch.no_grad():  # off the zero-initialized output layers, so gradients reach every weight
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = Generator.from_teacher(teacher.requires_grad_(False), GeneratorConfig(omega_cond=True))
    with torch.no_grad():
        gen.map_omega[2].weight.normal_(0, 0.1)  # omega changes G's output
    disc = ProjectedDiscriminator.tiny(D_PRESETS["tiny_text"])
    return teacher, {"generator": gen, "discriminator": disc, "perceptual": TinyFeatures(size=32)}


def _text_batch(n=2):
    return {"image": torch.rand(n, 3, 16, 16) * 2 - 1, "latent": torch.randn(n, 3, 16, 16) * 80,
            "text": torch.randn(n, 5, 32), "text_mask": torch.ones(n, 5, dtype=torch.bool),
            "text_embed": torch.randn(n, 32)}


def test_dstl_reads_precomputed_targets_without_a_teacher():
    _, models = _text_models()
    cfg = dataclasses.replace(PRESETS["tiny_text"], w_adv=0.0, w_clip=0.0, rec_augment=False)
    batch = _text_batch()
    with pytest.raises(KeyError, match="precomputed dstl_target"):
        generator_loss(models, batch, cfg)
    noise, w = torch.randn(2, 3, 16, 16) * 80, torch.tensor([0.5, 3.0])
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    batch.update(dstl_noise=noise, dstl_omega=w, dstl_target=target)
    loss, logs = generator_loss(models, batch, cfg)  # no "teacher" in models: nothing solves an ODE
    gen, feats = models["generator"], models["perceptual"]
    x_rec = gen(batch["latent"], omega=0.0, text=batch["text"], text_mask=batch["text_mask"])
    guided = gen(noise, omega=w, text=batch["text"], text_mask=batch["text_mask"])
    want_rec = perceptual_distance(feats, x_rec, batch["image"]).mean()
    want_dstl = perceptual_distance(feats, guided, target).mean()
    assert logs["l_dstl"].item() == pytest.approx(want_dstl.item(), rel=1e-5)
    assert loss.item() == pytest.approx((want_rec + cfg.w_dstl * want_dstl).item(), rel=1e-5)
    loss.backward()
    assert gen.map_omega[2].weight.grad.abs().sum() > 0  # the stored omega trains G's omega path


def test_dstl_stage_needs_targets_in_the_pairs_unless_online():
    check_dstl(DistillConfig(), {})
    check_dstl(DistillConfig(omega_cond=True, w_dstl=1.0), {"dstl": {"points": 40}})
    check_dstl(DistillConfig(omega_cond=True, w_dstl=1.0, dstl_online=True), {"dstl": None})
    with pytest.raises(ValueError, match="pagoda_invert.dstl: true"):
        check_dstl(DistillConfig(omega_cond=True, w_dstl=1.0), {"dstl": None})


class _Recorder(torch.nn.Module):
    """A discriminator that records the omega each call is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.omegas: list[torch.Tensor] = []

    def forward(self, x, omega=None, **kw):
        self.omegas.append(torch.as_tensor(omega).clone())
        return x.mean((1, 2, 3)) * self.w


@pytest.mark.parametrize("mode", ["zero", "shared"])
def test_reals_and_fakes_share_omega_zero_in_the_adversarial_game(mode):
    _, models = _text_models()
    models["discriminator"] = rec = _Recorder()
    cfg = dataclasses.replace(PRESETS["tiny_text"], omega_range=(2.0, 6.0), adv_omega=mode)
    discriminator_loss(models, _text_batch(4), cfg)
    real, fake = rec.omegas
    assert torch.equal(real, fake)
    if mode == "zero":
        assert (real == 0).all()  # no guidance in the game: reals are unguided data
    else:
        assert ((real >= 2) & (real <= 6)).all()  # the earlier choice: reals at the fakes' random omega
    rec.omegas.clear()
    generator_loss(models, _text_batch(4), dataclasses.replace(cfg, w_dstl=0.0, w_clip=0.0, adaptive=False))
    (g_fake,) = rec.omegas
    assert (g_fake == 0).all() if mode == "zero" else ((g_fake >= 2) & (g_fake <= 6)).all()


def test_online_dstl_draws_its_own_guided_omega_when_the_game_is_unguided(monkeypatch):
    """dstl_online with adv_omega "zero": the adversarial fakes are at omega 0, L_dstl's pair is not."""
    from genmodels.pagoda import steps

    teacher, models = _text_models()
    models["teacher"] = teacher
    seen = []

    class Recording(Guided):
        def __init__(self, net, omega):
            seen.append(torch.as_tensor(omega).clone())
            super().__init__(net, omega)

    monkeypatch.setattr(steps, "Guided", Recording)
    cfg = dataclasses.replace(PRESETS["tiny_text"], omega_range=(2.0, 6.0), w_clip=0.0, dstl_points=2)
    _, logs = generator_loss(models, _text_batch(4), cfg)
    (w,) = seen
    assert "l_dstl" in logs and w.shape == (4,) and ((w >= 2) & (w <= 6)).all()
