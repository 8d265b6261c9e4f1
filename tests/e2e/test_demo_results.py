"""What the session's demo run (tests/e2e/conftest.py) produced: the data funnel adds up, the
shard's split is the only split, no held-out image reaches any training stage, every training
loss fell, and samples and metrics exist for every model of both families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.splits import heldout_mask, row_ids
from pipeline.store import open_artifact
from tests.e2e.conftest import demo_timeout
from workflows import shard_data
from workflows.train.export import read_history

pytestmark = [pytest.mark.slow, demo_timeout]
TRAINING = ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c", "pagoda_teacher", "pagoda_distill",
            "pagoda_grow_32", "pagoda_grow_64")
# Derived artifacts that hold per-row training data, and where their parquet files are.
DERIVED = {"wuerstchen_encode_a": "data", "wuerstchen_encode_semantic": "data", "pagoda_invert": "pairs"}


def losses(art_dir: str) -> list[float]:
    recs = read_history(open_artifact(art_dir))
    key = "loss_rec" if any("loss_rec" in r for r in recs) else "loss"  # PaGoDA's G: the reconstruction term
    return [r[key] for r in recs if isinstance(r.get(key), (int, float))]


def test_data_funnel_adds_up(demo):
    m = demo["manifests"]
    urls, dl, fl, rc, sh = (m[s]["counts"] for s in ("urls", "download", "filter", "recaption", "shard"))
    assert dl["rows_in"] == urls["rows"]
    assert dl["rows_in"] == dl["rows_out"] + sum(dl["failed_by_reason"].values())
    assert dl["failed_by_reason"]["http_error"] >= 1 and dl["failed_by_reason"]["decode_error"] >= 1
    assert fl["rows_in"] == dl["rows_out"]
    assert fl["rows_in"] == fl["rows_out"] + sum(fl["rejected_by_reason"].values())
    assert rc["rows_out"] == fl["rows_out"] == sh["rows_out"]
    assert sh["rows_train"] + sh["rows_heldout"] == sh["rows_out"] and sh["rows_heldout"] > 0


def test_the_shard_decides_the_split_once(demo):
    shard = open_artifact(demo["manifests"]["shard"]["_path"])
    ids = shard_data.split_ids(shard)
    every = sorted(ids["train"] | ids["heldout"])
    assert not ids["train"] & ids["heldout"]
    fraction = demo["manifests"]["shard"]["config"]["heldout_fraction"]
    assert {s for s, h in zip(every, heldout_mask(every, fraction)) if h} == ids["heldout"]
    # No other stage declares a held-out fraction of its own.
    for stage, man in demo["manifests"].items():
        assert stage == "shard" or "heldout_fraction" not in json.dumps(man["config"]), stage


def test_no_heldout_id_reaches_any_training_stage(demo):
    m = demo["manifests"]
    ids = shard_data.split_ids(open_artifact(m["shard"]["_path"]))
    held, train = ids["heldout"], ids["train"]
    assert len(held) >= 10 and len(train) >= 100
    for stage, subdir in DERIVED.items():
        table = shard_data.read_table(open_artifact(m[stage]["_path"]), ["sample_id"], subdir=subdir, split=None)
        seen = set(table.column("sample_id").to_pylist())
        assert seen and seen <= train and not seen & held, stage
    held_rows = set(row_ids(sorted(held)).tolist())
    for stage in TRAINING:
        trained = json.loads(Path(m[stage]["_path"], "trained_rows.json").read_text())["row_ids"]
        assert len(trained) >= 100 and not set(trained) & held_rows, stage


@pytest.mark.parametrize("stage", TRAINING)
def test_every_training_loss_decreased(demo, stage):
    curve = losses(demo["manifests"][stage]["_path"])
    k = len(curve) // 3  # thirds: one noisy logging window cannot decide it
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    assert len(curve) >= 10 and last < first, (stage, first, last)


def test_samples_and_metrics(demo):
    m = demo["manifests"]
    assert Path(m["wuerstchen_sample"]["_path"], "grid.png").exists()
    assert all(Path(m["pagoda_sample"]["_path"], f"grid_{r}.png").exists() for r in (16, 32, 64))
    swd = json.loads(Path(m["pagoda_sample"]["_path"], "swd.json").read_text())
    assert swd["trained"]["swd"] < swd["init"]["swd"], swd
    table = json.loads(Path(m["evaluate"]["_path"], "metrics.json").read_text())
    models = {"wuerstchen", "pagoda_teacher", "pagoda_16", "pagoda_32", "pagoda_64"}
    assert models | {f"{m} (init)" for m in models} | {"chance"} <= set(table)
    assert all(isinstance(table[m]["swd"], float) and table[m]["swd"] > 0 for m in models)
    assert all(Path(m["evaluate"]["_path"], f"grid_{name}.png").exists() for name in models)


def test_the_oracle_judges_colour_and_shape_on_real_images_and_grades_every_model(demo):
    """The demo's ground truth reaches the shard; the oracle learns the main object's colour (held-out
    accuracy at the generators' resolutions); evaluate grades every model and its initialisation against
    the prompts, beside the chance level."""
    m = demo["manifests"]
    judge = json.loads(Path(m["oracle"]["_path"], "oracle.json").read_text())
    assert judge["labelled_train"] >= 200 and judge["labelled_heldout"] >= 10
    # Issue 11: >= 90% on the main object's colour and shape. Measured 0.97-1.00 on the ~35 held-out
    # images and 0.99-1.00 on 1,000 fresh scenes, seeds 0-2 (chance ~0.15); trains in 15-20 s.
    acc = judge["heldout_accuracy"]
    assert all(acc[r][k] >= 0.9 for r in ("32", "64") for k in ("colour", "shape", "background")), acc
    assert judge["train_s"] <= 120, judge["train_s"]
    table = json.loads(Path(m["evaluate"]["_path"], "metrics.json").read_text())
    assert 0 < table["chance"]["colour_acc"] < 0.5
    for model in ("wuerstchen", "pagoda_teacher", "pagoda_16", "pagoda_32", "pagoda_64"):
        for row in (model, f"{model} (init)"):
            assert 0.0 <= table[row]["colour_acc"] <= 1.0 and table[row]["oracle_fd"] > 0, (row, table[row])
    assert table["pagoda_teacher"]["nfe"] > 1 == table["pagoda_16"]["nfe"]


def test_pagoda_moves_towards_the_data_and_one_step_stays_near_its_teacher(demo):
    """Judged by the oracle's features: Würstchen, the PaGoDA teacher and its base-resolution one-step
    generator end closer to the held-out images than they started, and the generator's oracle-FD is
    within 1.5x its teacher's at 1 NFE against 70 (issue 11's acceptance; PaGoDA's claim in miniature). Measured
    with the demo's config (trained / init), training seeds 0 / 1 / 2: teacher 265 / 591, 253 / 591,
    255 / 591; generator 260 / 370, 253 / 377, 297 / 348; generator / teacher 0.98, 1.00, 1.17.
    Würstchen 273 / 484, 269 / 582, 267 / 452 (0.46-0.59x)."""
    table = json.loads(Path(demo["manifests"]["evaluate"]["_path"], "metrics.json").read_text())
    fd = {row: table[row]["oracle_fd"] for row in table if "oracle_fd" in table[row]}
    for model, margin in (("pagoda_teacher", 0.8), ("pagoda_16", 0.95), ("wuerstchen", 0.8)):
        assert fd[model] < margin * fd[f"{model} (init)"], (model, fd)
    assert fd["pagoda_16"] <= 1.5 * fd["pagoda_teacher"], fd


def test_every_text_encoder_uses_the_clip_the_demo_trained(demo):
    """The clip stage trains the tiny CLIP on the training pairs (held-out image -> caption retrieval far
    above chance: 0.63-0.69 against 0.03 measured), and every text encoder of both families, the samplers'
    included, loads that checkpoint instead of random weights."""
    m = demo["manifests"]
    meta = json.loads(Path(m["clip"]["_path"], "clip.json").read_text())
    assert meta["steps"] > 0 and meta["loss_last"] < 0.5 * meta["loss_first"], meta
    assert meta["heldout_top1"] >= 5 * meta["chance_top1"], meta
    ckpt = str(Path(m["clip"]["_path"], "clip.pt"))
    teacher = json.loads(Path(m["pagoda_teacher"]["_path"], "model_config.json").read_text())
    assert teacher["text"]["pretrained"] == ckpt and teacher["text"]["pooled_token"] is True
    for stage in ("wuerstchen_encode_a", "wuerstchen_encode_semantic"):
        info = json.loads(Path(m[stage]["_path"], "info.json").read_text())
        assert info["text_encoder"]["pretrained"] == ckpt, stage


def test_prompts_steer_both_families_colours(demo):
    """Issue 11, graded by the oracle against each held-out prompt (38 prompts x 3; chance: the most
    frequent class, colour 0.158, background 0.184): colour >= 3x chance (0.474) for Würstchen and the
    base-resolution PaGoDA generator, each clearly above its own initialisation. The demo's config
    (Stage B 2,000 steps, teacher 400 x 64), training seeds 0 / 1 / 2, init in brackets:
    Würstchen 0.63 (0.23) / 0.76 (0.15) / 0.64 (0.15); pagoda_16 0.73 (0.32) / 0.59 (0.28) / 0.59 (0.33);
    teacher 0.69 / 0.70 / 0.65 (0.08); background: teacher 0.83-0.90, pagoda_16 0.78-0.89. Seed 0 in CI
    gives the solo run's figures to the digit (since the Würstchen encoders run on fixed-size batches).
    Earlier configs and their spread: BENCHMARKS.md. Shape stays at chance: the demo CLIP's
    text embedding does not carry it (BENCHMARKS.md, tenth session)."""
    table = json.loads(Path(demo["manifests"]["evaluate"]["_path"], "metrics.json").read_text())
    chance = table["chance"]

    def acc(model: str, attr: str) -> float:
        return table[model][f"{attr}_acc"]

    # (model, floor in multiples of chance colour, rise over its initialisation); measured minima over the
    # three seeds: 4.1x / +0.57 teacher, 3.7x / +0.25 pagoda_16, 4.0x / +0.40 Würstchen.
    for model, times, rise in (("pagoda_teacher", 3.0, 0.4), ("pagoda_16", 3.0, 0.15), ("wuerstchen", 3.0, 0.25)):
        assert acc(model, "colour") >= times * chance["colour_acc"], (model, table[model], chance)
        assert acc(model, "colour") >= acc(f"{model} (init)", "colour") + rise, (model, table)
    for model in ("pagoda_teacher", "pagoda_16"):
        # measured 4.2x at least
        assert acc(model, "background") >= 3.5 * chance["background_acc"], (model, table[model], chance)
    # evaluate sampled the prior at the CFG scale its stage recorded, the demo's 2 (not the paper's 4)
    c_meta = json.loads(Path(demo["manifests"]["wuerstchen_stage_c"]["_path"], "model_config.json").read_text())
    assert c_meta["sampler"] == {"guidance_c": 2.0}
