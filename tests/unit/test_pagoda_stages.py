"""PaGoDA stage glue without Ray: configs, row selection, collate, the Inverter class, model
round trips through exported artifacts, and the control CLI on random tiny weights."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from data_prep import demo_data
from data_prep.images import decode_rgb, encode
from data_prep.splits import heldout_mask
from genmodels.pagoda import EDMPrecond, Generator, UNet, grow_2x, ode_sample
from workflows.config import ConfigError, build
from workflows.pagoda_control import SampleConfig, init_generator
from workflows.pagoda_control import main as control_main
from workflows.pagoda_invert import (
    InvertConfig,
    Inverter,
    TextEncoder,
    decode_images,
    image_column,
    load_teacher,
    row_ids,
    select_rows,
    text_dims,
)
from workflows.pagoda_stages import (
    NETS,
    DistillConfig,
    GrowConfig,
    TeacherConfig,
    generator_spec,
    growth_config,
    load_generator,
    pair_collate,
    teacher_spec,
)
from workflows.store import Artifact, Store
from workflows.train import TrainConfig, export, load_weights
from workflows.train.loop import run as train_run
from workflows.train.ray_adapter import DirCheckpoints

# ------------------------------------------------------------------------------------------
# Fixtures shared with the e2e module


def make_fake_shard(art: Artifact, n: int, resolutions=(16, 32, 64), seed: int = 0, files: int = 2) -> int:
    """A shard artifact in data_prep's schema from demo_data images: sample_id, caption, recaption,
    jpg_{R} (center crop + resize), scores. Returns the row count."""
    rows: dict[str, list] = {"sample_id": [], "caption": [], "recaption": [], "clip_score": [], "aesthetic": []}
    rows.update({f"jpg_{r}": [] for r in resolutions})
    for i, item in enumerate(demo_data.generate(n, seed, min_size=64, max_size=128)):
        img = decode_rgb(item.data)
        rows["sample_id"].append(item.sample_id)
        rows["caption"].append(item.caption)
        rows["recaption"].append("" if i % 3 == 0 else f"an image: {item.caption}")  # some rows have none
        rows["clip_score"].append(0.3)
        rows["aesthetic"].append(5.0)
        for r in resolutions:
            square = ImageOps.fit(img, (r, r), method=Image.Resampling.BICUBIC)
            rows[f"jpg_{r}"].append(encode(square, "jpg", quality=95))
    table = pa.table(rows)
    per = -(-n // files)
    for f in range(files):
        art.write_parquet(f"part-{f:05d}.parquet", table.slice(f * per, per))
    return n


def tiny_teacher_artifact(art: Artifact, text: bool = True, resolution: int = 16, seed: int = 0) -> EDMPrecond:
    """An exported teacher as pagoda_teacher writes it, with random (perturbed) weights."""
    torch.manual_seed(seed)
    tmeta = {"name": "tiny-clip", "pretrained": "", "tokens": 8} if text else None
    unet = dataclasses.replace(NETS["micro"], img_resolution=resolution, text_dim=text_dims(tmeta)[0])
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
    assert build(TeacherConfig, {"size": "micro", "train": {"total_steps": 5}}, "stages.t").train.total_steps == 5
    with pytest.raises(ConfigError, match=r"^stages.t.size: expected one of"):
        build(TeacherConfig, {"size": "huge"}, "stages.t")
    with pytest.raises(ConfigError, match=r"^stages.i.fraction: expected \(0, 1\]"):
        build(InvertConfig, {"fraction": 0.0}, "stages.i")
    with pytest.raises(ConfigError, match=r"^stages.d.omega_cond: w_dstl / omega_range need omega_cond"):
        build(DistillConfig, {"w_dstl": 1.0}, "stages.d")
    g = build(GrowConfig, {"resolution": 64, "perceptual": ["tiny"]}, "stages.g")
    assert g.w_adv == 1.0 and g.perceptual == ("tiny",) and DistillConfig().w_adv == 0.2
    with pytest.raises(ConfigError, match=r"^stages.s.heldout_fraction"):
        build(SampleConfig, {"heldout_fraction": 0.0}, "stages.s")


# ------------------------------------------------------------------------------------------
# Rows and collate


def test_select_rows_drops_heldout_picks_captions_and_decodes(store):
    art = store.artifact("shard", "k")
    make_fake_shard(art, 30, resolutions=(16, 32), files=1)
    table = pq.read_table(art.child("part-00000.parquet"))
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in ("sample_id", "caption", "recaption",
                                                                              "jpg_32")}
    held = heldout_mask(batch["sample_id"], 0.3)
    assert 0 < held.sum() < 30
    out = select_rows(batch, heldout_fraction=0.3, caption_column="recaption", decode=("jpg_32", 16))
    assert list(out["sample_id"]) == list(batch["sample_id"][~held])
    assert out["image"].shape == (30 - held.sum(), 3, 16, 16) and out["image"].dtype == np.float32
    assert -1 <= out["image"].min() and out["image"].max() <= 1
    first = list(batch["sample_id"]).index(out["sample_id"][0])
    want = batch["recaption"][first] or batch["caption"][first]  # empty recaption -> original caption
    assert out["caption"][0] == want and "jpg_32" not in out
    assert np.array_equal(out["row_id"], row_ids(out["sample_id"])) and out["row_id"].dtype == np.int64
    only_held = select_rows(batch, heldout_fraction=0.3, heldout=True)
    assert set(only_held["sample_id"]) == set(batch["sample_id"][held])
    assert image_column(["jpg_16", "jpg_64"], 32) == "jpg_64" and image_column(["webp_32", "key"], 32) == "webp_32"
    with pytest.raises(ValueError, match="none at or above 128"):
        image_column(["jpg_16", "jpg_64"], 128)


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
    table = pq.read_table(shard.child("part-00000.parquet"))
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
    x = torch.from_numpy(decode_images(batch["jpg_16"], 16))
    cond = TextEncoder(tokens=8)(batch["caption"])
    rec = ode_sample(teacher, torch.from_numpy(out["latent"]), 12, text=cond["text"], text_mask=cond["text_mask"])
    assert (rec.clamp(-1, 1) - x).abs().mean() < 0.05


def test_generator_artifacts_load_and_init_generator_matches_growth(store):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart, text=False)
    gart = store.artifact("pagoda_grow_32", "k")
    gen = tiny_generator_artifact(gart, tart, grow=1)
    loaded, meta = load_generator(gart)
    z = torch.randn(2, 3, 16, 16) * 80
    assert torch.allclose(loaded(z), gen(z), atol=1e-5) and loaded(z).shape == (2, 3, 32, 32)
    assert torch.allclose(init_generator(meta)(z), gen(z), atol=1e-5)  # untrained: init == artifact


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


def test_teacher_and_growth_specs_train_in_the_harness(store):
    rng = np.random.default_rng(0)
    n = 16
    tcfg = TeacherConfig(size="micro", text=False, preview_points=4)
    unet = dataclasses.replace(NETS["micro"], img_resolution=16)
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
    pairs = {"row_id": np.arange(n), "image": rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32),
             "latent": (80 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)}
    pairs["latent_flip"] = pairs["latent"][..., ::-1].copy()
    spec = generator_spec(gcfg, 32, gmeta, lambda: grow_2x(load_generator(dart)[0].train(), growth_config(gcfg)),
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
