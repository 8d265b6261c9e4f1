"""PaGoDA stage glue without Ray: configs, the stage table (rows by role, growth rows), shard rows as
PaGoDA reads them, collate, the Inverter class, model round trips through exported artifacts, the
family face, and the control CLI on random tiny weights."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_prep.splits import heldout_mask, row_ids, subset_mask
from genmodels import clip as clip_mod
from genmodels.clip import TextEncoder
from genmodels.pagoda import EDMPrecond, Generator, UNet, edm_loss, grow_2x, ode_sample, sample_latents
from pipeline import config as config_mod
from pipeline import runner
from pipeline.config import ConfigError, build
from pipeline.stage import Stage
from pipeline.store import Artifact, Store
from tests.fakes import write_fake_shard
from workflows import pagoda, shard_data
from workflows.pagoda.control import main as control_main
from workflows.pagoda.invert import InvertConfig, Inverter
from workflows.pagoda.models import TEACHER_PRESETS, load_one_step, load_teacher
from workflows.pagoda.sample import SampleConfig, decode, init_generator
from workflows.pagoda.stages import (
    DistillConfig,
    GrowConfig,
    TeacherConfig,
    generator_spec,
    growth_config,
    pair_collate,
    run_grow,
    teacher_pagoda_config,
    teacher_spec,
)
from workflows.train import TrainConfig, export, load_weights
from workflows.train.loop import run as train_run
from workflows.train.ray_adapter import DirCheckpoints

# ------------------------------------------------------------------------------------------
# Fixtures shared with the e2e module


def make_fake_shard(art: Artifact, n: int, resolutions=(16, 32, 64), seed: int = 0, files: int = 2,
                    heldout_fraction: float = 0.1) -> int:
    """The shared fake shard (tests/fakes.py) with the demo's photos mixed in; returns the row count."""
    return write_fake_shard(art, n, resolutions, seed, files, heldout_fraction, photos=True).num_rows


def tiny_teacher_artifact(art: Artifact, text: bool = True, resolution: int = 16, seed: int = 0) -> EDMPrecond:
    """An exported teacher as pagoda_teacher writes it, with random (perturbed) weights."""
    torch.manual_seed(seed)
    tmeta = {"name": "tiny-clip", "pretrained": "", "tokens": 8} if text else None
    unet = dataclasses.replace(TEACHER_PRESETS["micro"], img_resolution=resolution,
                               text_dim=clip_mod.text_dims("tiny-clip")[0] if text else 0)
    teacher = EDMPrecond(UNet(unet))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = {"kind": "pagoda_teacher", "unet": dataclasses.asdict(unet), "sigma_data": 0.5, "text": tmeta,
            "resolution": resolution}
    sd = teacher.state_dict()
    export.write(art, weights={"teacher": sd}, ema_weights={"teacher": sd}, model_config=meta, train_config={},
                 history=[], summary={"steps": 0}, preview=None)
    return teacher


def tiny_generator_artifact(art: Artifact, teacher_art: Artifact, grow: int = 1) -> Generator:
    teacher, tmeta = load_teacher(teacher_art)
    gen = Generator.from_teacher(teacher)
    for _ in range(grow):
        gen = grow_2x(gen)
    meta = {"kind": "pagoda_generator", "unet": dataclasses.asdict(gen.net.cfg),
            "generator": dataclasses.asdict(gen.cfg), "text": tmeta["text"], "teacher": teacher_art.uri,
            "resolution": gen.net.cfg.out_resolution, "base_resolution": tmeta["resolution"]}
    sd = gen.state_dict()
    export.write(art, weights={"generator": sd}, ema_weights={"generator": sd}, model_config=meta, train_config={},
                 history=[], summary={"steps": 0}, preview=None)
    return gen


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "root"))


# ------------------------------------------------------------------------------------------
# Configs


def test_configs_validate_with_the_key_named():
    assert build(TeacherConfig, {"preset": "micro", "train": {"total_steps": 5}}, "stages.t").train.total_steps == 5
    with pytest.raises(ConfigError, match=r"^stages.t.preset: expected one of"):
        build(TeacherConfig, {"preset": "huge"}, "stages.t")
    with pytest.raises(ConfigError, match=r"^stages.t.text_cpus_per_actor: must be > 0 without GPUs"):
        build(TeacherConfig, {"text_cpus_per_actor": 0.0}, "stages.t")
    with pytest.raises(ConfigError, match=r"^stages.i.fraction: expected \(0, 1\]"):
        build(InvertConfig, {"fraction": 0.0}, "stages.i")
    with pytest.raises(ConfigError, match=r"^stages.d.omega_cond: w_dstl / omega_range need omega_cond"):
        build(DistillConfig, {"w_dstl": 1.0}, "stages.d")
    g = build(GrowConfig, {"resolution": 64, "perceptual": ["tiny"]}, "stages.g")
    assert g.w_adv == 1.0 and g.perceptual == ("tiny",) and DistillConfig().w_adv == 0.2
    # The actor pools speak the shared vocabulary, with the defaults they had.
    inv, smp = InvertConfig(), SampleConfig()
    assert (inv.actors, inv.cpus_per_actor, inv.gpus_per_actor, inv.batch_size) == (1, 0.5, 0.0, 16)
    assert (smp.actors, smp.cpus_per_actor, smp.gpus_per_actor, smp.batch_size) == (1, 1.0, 0.0, 64)
    with pytest.raises(ConfigError, match=r"^stages.s.actors: the sample stage is one task"):
        build(SampleConfig, {"actors": 2}, "stages.s")
    # The split is the shard stage's: no PaGoDA stage has a held-out fraction of its own.
    for cls in (TeacherConfig, InvertConfig, DistillConfig, GrowConfig, SampleConfig):
        with pytest.raises(ConfigError, match=r"\.heldout_fraction: unknown key"):
            build(cls, {"heldout_fraction": 0.1}, "stages.x")


# ------------------------------------------------------------------------------------------
# The stage table: inputs by role, growth rows, generators


def test_stage_rows_name_their_inputs_by_role():
    rows = {s.name: s for s in pagoda.STAGES}
    assert rows["pagoda_teacher"].inputs == {"shard": "shard", "clip": "clip"}
    assert rows["pagoda_invert"].inputs == {"shard": "shard", "teacher": "pagoda_teacher"}
    assert rows["pagoda_distill"].inputs == {"pairs": "pagoda_invert", "teacher": "pagoda_teacher"}
    assert rows["pagoda_grow_32"].inputs == {"pairs": "pagoda_invert", "generator": "pagoda_distill"}
    assert rows["pagoda_grow_64"].inputs == {"pairs": "pagoda_invert", "generator": "pagoda_grow_32"}
    assert pagoda.GENERATORS == {"pagoda_teacher": {"teacher": "pagoda_teacher"},
                                 "pagoda_16": {"generator": "pagoda_distill"},
                                 "pagoda_32": {"generator": "pagoda_grow_32"},
                                 "pagoda_64": {"generator": "pagoda_grow_64"}}
    assert rows["pagoda_sample"].inputs == {"shard": "shard", "pagoda_16": "pagoda_distill",
                                            "pagoda_32": "pagoda_grow_32", "pagoda_64": "pagoda_grow_64"}
    with pytest.raises(ValueError, match="grows 'pagoda_grow_64' \\(64 px\\) to 128 px"):
        pagoda.generators(pagoda.family_table([*pagoda.GROWTH, pagoda.grow_stage(256, after="pagoda_grow_64")]))


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


def test_a_third_growth_row_plans_and_is_sampled(tmp_path):
    """Growing to 128 px is one row plus its config section: it plans (dry run, no Ray), becomes a
    generator, and the sample stage reads it."""
    stages = [*(Stage(name, lambda inputs, cfg, out: {}, _NoConfig) for name in ("shard", "clip")),
              *pagoda.family_table([*pagoda.GROWTH, pagoda.grow_stage(128, after="pagoda_grow_64")])]
    cfg = config_mod.load(None, ["pagoda_grow_128.resolution=128"], {s.name: s.config for s in stages})
    steps = {st.stage.name: st for st in runner.plan(stages, cfg, Store(str(tmp_path / "root")))}
    assert list(steps) == ["shard", "clip", "pagoda_teacher", "pagoda_invert", "pagoda_distill", "pagoda_grow_32",
                           "pagoda_grow_64", "pagoda_grow_128", "pagoda_sample"]
    assert all(st.action == "run" for st in steps.values())
    grow = steps["pagoda_grow_128"].stage
    assert grow.inputs == {"pairs": "pagoda_invert", "generator": "pagoda_grow_64"} and grow.fn is run_grow
    assert cfg.stages["pagoda_grow_128"].resolution == 128
    assert pagoda.generators(stages)["pagoda_128"] == {"generator": "pagoda_grow_128"}
    assert steps["pagoda_sample"].stage.inputs["pagoda_128"] == "pagoda_grow_128"
    # The new row's key moves the sample stage's key; the rows above it keep theirs.
    base = {st.stage.name: st for st in runner.plan([*stages[:2], *pagoda.STAGES], cfg, Store(str(tmp_path / "b")))}
    assert base["pagoda_grow_64"].key == steps["pagoda_grow_64"].key
    assert base["pagoda_sample"].key != steps["pagoda_sample"].key


def test_growth_reads_its_resolution_from_config_and_its_parent_from_inputs(store):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart, text=False)
    dart = store.artifact("pagoda_distill", "k")
    tiny_generator_artifact(dart, tart, grow=0)  # a 16 px generator
    pairs = store.artifact("pagoda_invert", "k")
    with pytest.raises(ValueError, match="resolution: 64 is not twice the input generator's 16"):
        run_grow({"pairs": pairs, "generator": dart}, GrowConfig(resolution=64), store.artifact("g", "k"))


# ------------------------------------------------------------------------------------------
# Rows and collate


def test_shard_rows_as_pagoda_reads_them(store):
    """Training rows only (the shard's split column), the caption with its fallback, the image decoded
    at R from the smallest stored side above it; the inversion subset by id hash."""
    art = store.artifact("shard", "k")
    make_fake_shard(art, 30, resolutions=(16, 32), files=1, heldout_fraction=0.3)
    table = pq.read_table(art.child("parquet/00000.parquet"))
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in ("sample_id", "caption", "recaption",
                                                                              "split", "jpg_32")}
    held = heldout_mask(batch["sample_id"], 0.3)
    assert 0 < held.sum() < 30
    out = shard_data.select(batch, split=shard_data.TRAIN, caption_column="recaption", decode_to=("jpg_32", 16))
    assert list(out["sample_id"]) == list(batch["sample_id"][~held])
    assert out["image"].shape == (30 - held.sum(), 3, 16, 16) and out["image"].dtype == np.float32
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    first = list(batch["sample_id"]).index(out["sample_id"][0])
    want = batch["recaption"][first] or batch["caption"][first]  # empty recaption -> original caption
    assert out["caption"][0] == want and "jpg_32" not in out
    assert np.array_equal(out["row_id"], row_ids(out["sample_id"])) and out["row_id"].dtype == np.int64
    only_held = shard_data.select(batch, split=shard_data.HELDOUT)
    assert set(only_held["sample_id"]) == set(batch["sample_id"][held])
    half = shard_data.select(batch, split=shard_data.TRAIN, fraction=0.5)  # InvertConfig.fraction
    subset = subset_mask(batch["sample_id"], 0.5)
    assert list(half["sample_id"]) == list(batch["sample_id"][~held & subset])
    assert shard_data.image_column(["jpg_16", "jpg_64"], 32) == "jpg_64"
    assert shard_data.image_column(["webp_32", "key"], 32) == "webp_32"
    with pytest.raises(ValueError, match="none at or above 128"):
        shard_data.image_column(["jpg_16", "jpg_64"], 128)


def test_pair_collate_flips_image_and_latent_together():
    np.random.seed(0)
    n = 64
    img = np.random.rand(n, 3, 4, 4).astype(np.float32)
    batch = {"row_id": np.arange(n), "image": img, "latent": np.zeros((n, 3, 2, 2), np.float32),
             "latent_flip": np.ones((n, 3, 2, 2), np.float32)}
    out = pair_collate(True)(batch)
    flipped = out["latent"][:, 0, 0, 0] == 1
    assert 10 < flipped.sum() < 54 and "latent_flip" not in out
    assert torch.equal(out["image"][flipped], torch.from_numpy(img).flip(-1)[flipped])
    assert torch.equal(out["image"][~flipped], torch.from_numpy(img)[~flipped])
    assert torch.equal(pair_collate(False)(batch)["latent"], torch.zeros(n, 3, 2, 2))


def test_text_encoder_truncates_exactly():
    enc = TextEncoder(tokens=6)
    out = enc(["a red circle on a white background", ""])
    full = TextEncoder(tokens=77)(["a red circle on a white background", ""])
    assert out["text"].shape == (2, 6, 64) and out["text_embed"].shape == (2, 64)
    assert torch.allclose(out["text"], full["text"][:, :6])  # causal encoder: truncation after encoding is exact
    assert out["text_mask"][1].tolist() == [True, True, False, False, False, False]


# ------------------------------------------------------------------------------------------
# Inverter (the Ray Data callable) without Ray, and loaders


def test_inverter_round_trip_on_two_images(store):
    shard = store.artifact("shard", "k")
    make_fake_shard(shard, 2, resolutions=(16, 32), files=1)
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart)
    table = pq.read_table(shard.child("parquet/00000.parquet"))
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    report = store.artifact("pagoda_invert", "k")
    inv = Inverter(tart, points=12, carry=("jpg_32",), check=1, report=report)
    out = inv(batch)
    (name,) = report.list(".json", subdir="roundtrip")  # the first row only, once per actor
    check = report.read_json(name)
    assert check["sample_id"] == [batch["sample_id"][0]] and check["mae"][0] < 0.05, check
    inv(batch)
    assert len(report.list(".json", subdir="roundtrip")) == 1
    assert out["latent"].shape == out["latent_flip"].shape == (2, 3, 16, 16)
    assert out["text"].shape == (2, 8, 64) and out["text_mask"].dtype == bool and out["text_embed"].shape == (2, 64)
    assert list(out["jpg_32"]) == list(batch["jpg_32"]) and "jpg_16" not in out
    assert 20 < out["latent"].std() < 200  # the sigma_max = 80 scale
    assert not np.allclose(out["latent_flip"], out["latent"][..., ::-1])
    # Invert -> generate returns x_B for both images, also with the teacher loaded on its own.
    teacher, _ = load_teacher(tart)
    x = torch.from_numpy(shard_data.decode(batch["jpg_16"], 16))
    cond = TextEncoder(tokens=8)(batch["caption"])
    rec = ode_sample(teacher, torch.from_numpy(out["latent"]), 12, text=cond["text"], text_mask=cond["text_mask"])
    assert (rec.clamp(-1, 1) - x).abs().mean() < 0.05


def test_generator_artifacts_load_and_init_generator_matches_growth(store):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart, text=False)
    gart = store.artifact("pagoda_grow_32", "k")
    gen = tiny_generator_artifact(gart, tart, grow=1)
    loaded, meta = load_one_step(gart)
    z = torch.randn(2, 3, 16, 16) * 80
    assert torch.allclose(loaded(z), gen(z), atol=1e-5) and loaded(z).shape == (2, 3, 32, 32)
    assert torch.allclose(init_generator(meta)(z), gen(z), atol=1e-5)  # untrained: init == artifact


def test_family_face_samples_one_step_from_prompts(store):
    """load_generator -> workflows.family.Generator: text from the model's CLIP, z at the base
    resolution from the seed, one forward pass (what evaluate sampled PaGoDA with)."""
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart)
    gart = store.artifact("pagoda_grow_32", "k")
    tiny_generator_artifact(gart, tart, grow=1)
    face = pagoda.load_generator({"generator": gart})
    assert (face.name, face.resolution, face.nfe) == ("pagoda_32", 32, 1)
    prompts = ["a red circle", "a blue square", ""]
    x = face.sample(prompts, 7)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert torch.equal(x, face.sample(prompts, 7)) and not torch.equal(x, face.sample(prompts, 8))
    gen, meta = load_one_step(gart)
    z = sample_latents((3, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(x, decode(gen, z, TextEncoder(**meta["text"])(prompts)), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Control CLI on random tiny weights


def _png(path, size=48, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_control_cli_superres_and_interpolate(store, tmp_path):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart)
    gart = store.artifact("pagoda_grow_32", "k")
    tiny_generator_artifact(gart, tart, grow=1)
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", seed=1)
    out = tmp_path / "out"
    assert control_main(["superres", "--generator", gart.path, "--image", a, "--out", str(out), "--points", "6",
                         "--prompt", "a red circle"]) == 0
    assert Image.open(out / "superres.png").size == (32, 32) and Image.open(out / "input.png").size == (16, 16)
    assert control_main(["interpolate", "--generator", gart.path, "--image", a, "--image", b, "--num", "4",
                         "--points", "6", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:02d}.png" for i in range(4)]
    assert control_main(["inpaint", "--generator", gart.path, "--image", a, "--steps", "3", "--points", "6",
                         "--out", str(out)]) == 0
    known = np.asarray(Image.open(out / "inpaint.png"), dtype=np.int16)
    ref = np.asarray(Image.open(a).resize((32, 32)), dtype=np.int16)
    assert known.shape == (32, 32, 3) and np.abs(known[:4] - ref[:4]).mean() < 40  # known rows kept (up to resize)


# ------------------------------------------------------------------------------------------
# Step functions through the harness loop in-process (no Ray): unconditional teacher, then a
# growth step where most of G is frozen and G/D alternate as two optimizer groups.


def _source(rows: dict[str, np.ndarray], batch: int):
    def data(epoch: int, skip=None):
        for i in range(0, len(rows["row_id"]), batch):
            yield {k: v[i:i + batch] for k, v in rows.items()}
    return data



def _pairs(rng, n: int) -> dict:
    """``n`` inversion pairs as pagoda_invert writes them: 32 px images, 16 px latents and their flips."""
    pairs = {"row_id": np.arange(n), "image": rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32),
             "latent": (80 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)}
    pairs["latent_flip"] = pairs["latent"][..., ::-1].copy()
    return pairs

def test_teacher_noise_levels_come_from_the_stage_config():
    """p_mean / p_std reach EDM's log-normal sigma draw (the demo centres it at sigma = 1); paper values
    by default; a non-positive spread is refused by name."""
    paper = teacher_pagoda_config(TeacherConfig()).edm
    assert (paper.P_mean, paper.P_std, paper.cond_drop) == (-1.2, 1.2, 0.1)
    demo = teacher_pagoda_config(TeacherConfig(p_mean=0.0, p_std=1.0, cond_drop=0.2)).edm
    assert (demo.P_mean, demo.P_std, demo.cond_drop) == (0.0, 1.0, 0.2)
    net = EDMPrecond(UNet(dataclasses.replace(TEACHER_PRESETS["micro"], img_resolution=8)), 0.5)
    seen = {}
    for name, cfg in (("paper", paper), ("demo", demo)):
        sigmas = []
        net.forward = lambda x, sigma, *a, _s=sigmas: (_s.append(sigma.flatten()), x)[1]
        edm_loss(net, torch.zeros(4096, 3, 8, 8), cfg, generator=torch.Generator().manual_seed(0))
        seen[name] = torch.cat(sigmas).log().median().item()
    assert abs(seen["paper"] + 1.2) < 0.1 and abs(seen["demo"]) < 0.1, seen
    with pytest.raises(ValueError, match="p_std"):
        TeacherConfig(p_std=0.0).validate()


def test_teacher_and_growth_specs_train_in_the_harness(store):
    rng = np.random.default_rng(0)
    n = 16
    tcfg = TeacherConfig(preset="micro", text=False, preview_points=4)
    unet = dataclasses.replace(TEACHER_PRESETS["micro"], img_resolution=16)
    train = TrainConfig(engine="torch", num_workers=1, batch_size=8, total_steps=4, log_every=2, ckpt_every=0)
    tart = store.artifact("pagoda_teacher", "k")
    meta = {"kind": "pagoda_teacher", "unet": dataclasses.asdict(unet), "sigma_data": 0.5, "text": None,
            "resolution": 16}
    rows = {"row_id": np.arange(n), "image": rng.uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32)}
    s = train_run(teacher_spec(tcfg, unet, None), train, tart, checkpoints=DirCheckpoints(tart),
                  data=_source(rows, 8), model_config=meta)
    assert s["steps"] == 4 and tart.exists("weights/teacher.safetensors") and tart.exists("preview.png")

    dart = store.artifact("pagoda_distill", "k")
    tiny_generator_artifact(dart, tart, grow=0)
    gcfg = GrowConfig(resolution=32, channels=8, w_adv=0.5)
    gart = store.artifact("pagoda_grow_32", "k")
    gmeta = {**dart.read_json("model_config.json"), "resolution": 32}
    pairs = _pairs(rng, n)
    spec = generator_spec(gcfg, 32, gmeta, lambda: grow_2x(load_one_step(dart)[0].train(), growth_config(gcfg)),
                          preview=pairs)
    before = load_weights(dart, "generator")
    s = train_run(spec, train, gart, checkpoints=DirCheckpoints(gart), data=_source(pairs, 8), model_config=gmeta)
    hist = [json.loads(x) for x in gart.read_bytes("metrics.jsonl").splitlines()]
    assert {"loss_rec", "loss_adv", "lambda_adv", "loss_d", "lr/generator", "lr/discriminator"} <= set(hist[-1])
    after = load_weights(gart, "generator")
    frozen = "net.enc.16x16_conv.weight"  # the encoder does not train while growing (Fig. 3)
    assert torch.equal(after[frozen], before[frozen]) and not torch.equal(after["net.out_conv.weight"],
                                                                           before["net.out_conv.weight"])
    assert after["net.dec.32x32_block0.conv0.weight"].shape[0] == 8
    assert Image.open(io.BytesIO(gart.read_bytes("preview.png"))).size[0] > 64


def test_512_style_growth_trains_a_separate_reconstruction_discriminator(store):
    with pytest.raises(ConfigError, match=r"^stages.g.rec_discriminator: needs w_rec_adv > 0"):
        build(GrowConfig, {"rec_discriminator": True}, "stages.g")
    with pytest.raises(ConfigError, match=r"^stages.g.freeze: expected 'official' or 'top_levels'"):
        build(GrowConfig, {"freeze": "all"}, "stages.g")
    with pytest.raises(ConfigError, match=r"^stages.g.lambda_layer: expected 'last_block' or 'head'"):
        build(GrowConfig, {"lambda_layer": "conv"}, "stages.g")
    rng = np.random.default_rng(0)
    n = 8
    tart, dart = store.artifact("pagoda_teacher", "k"), store.artifact("pagoda_distill", "k")
    tiny_teacher_artifact(tart, text=False)
    tiny_generator_artifact(dart, tart, grow=0)
    gcfg = GrowConfig(resolution=32, separate_updates=True, w_rec_adv=0.5, rec_discriminator=True,
                      adaptive_max_resolution=16)  # lambda = 1 at 32 px here, as at >= 256 px by default
    gmeta = {**dart.read_json("model_config.json"), "resolution": 32}
    pairs = _pairs(rng, n)
    spec = generator_spec(gcfg, 32, gmeta, lambda: grow_2x(load_one_step(dart)[0].train(), growth_config(gcfg)),
                          preview=pairs)
    assert set(spec.optimizers) == {"generator", "discriminator", "rec_discriminator"}
    train = TrainConfig(engine="torch", num_workers=1, batch_size=4, total_steps=2, log_every=1, ckpt_every=0)
    gart = store.artifact("pagoda_grow_32", "k")
    train_run(spec, train, gart, checkpoints=DirCheckpoints(gart), data=_source(pairs, 4), model_config=gmeta)
    hist = [json.loads(x) for x in gart.read_bytes("metrics.jsonl").splitlines()]
    assert {"loss_rec", "loss_rec_adv", "loss_d_rec", "lr/rec_discriminator"} <= set(hist[0])
    assert {"loss_adv", "loss_d_rec"} <= set(hist[1]) and hist[1]["lambda_adv"] == 1.0
