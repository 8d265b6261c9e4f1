"""Smoke test (opt-in: ``-m smoke``): PaGoDA's own stage table through the real runner, Ray Data and
Ray Train + DeepSpeed on a tiny fake shard, at most 20 training steps a stage: teacher -> inversion
pairs -> one-step G at 16 -> grow 32 -> grow 64 -> samples + SWD, then the control CLI.

It checks wiring, not quality: every training row (and no held-out one) is inverted and round-trips,
each stage trains and exports, every generator row is sampled, SWD is measured against the held-out
split, and a second plan is all cached. Whether L_rec falls and SWD beats the generator at init needs the
demo's step counts; the demo run's e2e test owns those assertions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from data_prep.splits import subset_mask
from pipeline import config as config_mod
from pipeline import runner
from pipeline.stage import Stage
from pipeline.store import Store
from tests.conftest import REPO
from tests.unit.test_pagoda_stages import make_fake_shard
from workflows import pagoda, shard_data, text_clip
from workflows.pagoda.control import main as control_main
from workflows.train.export import read_history

pytestmark = pytest.mark.smoke

STEPS = 20  # per training stage


@dataclass(frozen=True)
class FakeShardConfig:
    n: int = 64
    resolutions: tuple[int, ...] = (16, 32, 64)


def fake_shard(inputs, cfg: FakeShardConfig, out):
    return {"rows": make_fake_shard(out, cfg.n, cfg.resolutions, files=2)}


# PaGoDA's own rows, fed by a fake shard, with the demo's PaGoDA sections (workflows/configs/demo.yaml).
STAGES = [Stage("shard", fake_shard, FakeShardConfig), text_clip.STAGE, *pagoda.STAGES]
TRAINING = tuple(stage for g in pagoda.GENERATORS.values() for stage in g.values())  # teacher first
DEMO_STAGES = {k: v for k, v in yaml.safe_load((REPO / "workflows/configs/demo.yaml").read_text())["stages"].items()
               if k.startswith("pagoda_")}


@pytest.mark.timeout(900)
def test_pagoda_stages_smoke(ray_cluster, tmp_path):
    path = tmp_path / "pagoda.yaml"
    path.write_text(yaml.safe_dump({"stages": DEMO_STAGES}))
    overrides = [f"{s}.train.{k}={v}" for s in TRAINING for k, v in
                 (("total_steps", STEPS), ("log_every", 5), ("shuffle_buffer", 0))]
    # the demo's teacher batch (64) needs more training rows than the fake shard's ~56
    overrides += ["pagoda_sample.n=8", "pagoda_sample.swd_projections=64", "clip.steps=10",
                  "pagoda_teacher.train.batch_size=16"]
    cfg = config_mod.load(str(path), overrides, {s.name: s.config for s in STAGES})
    assert cfg.stages["pagoda_teacher"].train.batch_size == 16  # nested train keys merge with the YAML's
    assert cfg.stages["pagoda_teacher"].train.lr == DEMO_STAGES["pagoda_teacher"]["train"]["lr"] == 0.002
    assert all(cfg.stages[s].train.total_steps <= STEPS for s in TRAINING)
    store = Store(str(tmp_path / "root"))
    steps = runner.plan(STAGES, cfg, store)
    summary = runner.execute(steps, cfg, store, "smoke")
    arts = {s.stage.name: s.artifact for s in steps}
    print("stage wall times (s):", json.dumps({r["stage"]: r["wall_s"] for r in summary["stages"]}))

    # Inversion: every training row has one pair, no held-out row has any; the round trip reconstructs x_B.
    splits = shard_data.split_ids(arts["shard"])
    assert len(splits["heldout"]) >= 2 and len(splits["train"]) + len(splits["heldout"]) == 64
    inv, pairs_art = arts["pagoda_invert"].manifest["counts"], arts["pagoda_invert"]
    ids = [i for n in pairs_art.list(".parquet", subdir="pairs")
           for i in pq.read_table(pairs_art.child(n), columns=["sample_id"]).column(0).to_pylist()]
    # the demo inverts a fraction of the training rows (pagoda_invert.fraction), chosen by id hash
    train = sorted(splits["train"])
    chosen = {i for i, keep in zip(train, subset_mask(train, cfg.stages["pagoda_invert"].fraction)) if keep}
    assert inv["rows"] == len(ids) == len(set(ids)) > 0 and set(ids) == chosen
    assert inv["roundtrip_n"] >= 4 and inv["roundtrip_mae_median"] < 0.2, inv  # forward Heun gives x_B back
    pairs = pq.read_table(pairs_art.child(pairs_art.list(".parquet", subdir="pairs")[0]))
    assert {"sample_id", "latent", "latent_flip", "text", "text_mask", "text_embed", "jpg_16", "jpg_32",
            "jpg_64"} <= set(pairs.column_names)

    # Each training stage ran its steps, logged finite losses and exported its EMA weights and a preview.
    for name in TRAINING:
        art = arts[name]
        assert art.manifest["counts"]["steps"] == STEPS, (name, art.manifest["counts"])
        key = "loss" if name == "pagoda_teacher" else "loss_rec"
        losses = [r[key] for r in read_history(art) if key in r]
        assert losses and all(math.isfinite(v) for v in losses), (name, losses)
        weights = "teacher" if name == "pagoda_teacher" else "generator"
        assert art.exists(f"weights/{weights}.safetensors") and art.exists("preview.png")

    # One-step samples from every generator row; SWD against the held-out split at the largest one.
    sample = arts["pagoda_sample"]
    for r in (16, 32, 64):
        assert sample.exists(f"grid_{r}.png") and len(sample.list(".png", subdir=f"samples/{r}")) == 8
    assert Image.open(sample.child("samples/64/0000.png")).size == (64, 64)
    swd = sample.read_json("swd.json")
    assert swd["resolution"] == 64 and swd["n_real"] == len(splits["heldout"])
    assert math.isfinite(swd["trained"]["swd"]) and math.isfinite(swd["init"]["swd"]), swd

    # The family face on each trained generator; the control CLI on the 64 px one.
    for model, roles in pagoda.GENERATORS.items():
        for initial in (False, True):  # the trained model and the one its stage started from
            face = pagoda.load_generator({role: arts[stage] for role, stage in roles.items()}, initial=initial)
            assert face.name == model and face.sample(["a red circle"], 0).shape == (1, 3, face.resolution,
                                                                                     face.resolution)
    out = tmp_path / "control"
    img = sample.child("samples/64/0001.png")
    assert control_main(["superres", "--generator", arts["pagoda_grow_64"].path, "--image", img, "--out", str(out),
                         "--prompt", "a red circle", "--points", "8"]) == 0
    assert Image.open(out / "superres.png").size == (64, 64)
    assert all(s.action == "cached" for s in runner.plan(STAGES, cfg, store))
