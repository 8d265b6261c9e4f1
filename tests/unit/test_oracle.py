"""Ground truth for the demo (issue 11): the demo's labels, the oracle that learns them, and the
grades evaluate computes with it."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from data_prep import demo
from genmodels.metrics.oracle import OracleConfig, SceneOracle, accuracy, fit
from pipeline.store import Store
from tests.fakes import write_fake_shard
from workflows import evaluate, oracle, shard_data
from workflows.family import Generator
from workflows.train.export import captioned_grid


def test_labels_name_what_was_drawn_largest_first():
    items = list(demo.generate(40, 3))
    drawn = [it for it in items if it.shapes]
    assert all(it.labels is None for it in items if not it.shapes)  # photos: no ground truth
    for it in drawn:
        spec = json.loads(it.labels)
        radii = [o["r"] for o in spec["objects"]]
        assert radii == sorted(radii, reverse=True) and len(radii) == len(it.shapes)
        main = max(it.shapes, key=lambda s: s.r)
        assert (spec["objects"][0]["shape"], spec["objects"][0]["colour"]) == (main.kind, main.colour)
        assert spec["background"] == it.background
        for o in spec["objects"]:
            assert f"{o['colour']} {o['shape']}" in it.caption  # the caption names every labelled object


def test_simple_scenes_one_whole_object_on_a_plain_background():
    items = [it for it in demo.generate(60, 1, scene="simple") if it.shapes]
    assert len(items) > 40
    for it in items:
        (s,) = it.shapes
        assert s.size in ("medium", "large")
        side = min(it.width, it.height)  # inside the centre square: a centre crop keeps it whole
        x0, y0 = (it.width - side) / 2, (it.height - side) / 2
        assert x0 + s.r <= s.cx <= x0 + side - s.r and y0 + s.r <= s.cy <= y0 + side - s.r
        assert not any(w in it.caption for w in ("gradient", "striped", "speckled", "noisy"))
        px = np.asarray(Image.open(io.BytesIO(it.data)).convert("RGB"))[s.probe[1], s.probe[0]].astype(float)
        assert np.abs(px - demo.shapes.OBJECT_COLOURS[s.colour]).max() < 40  # the labelled colour is drawn
    # The default scenes are untouched: the data stages' tests keep their 1-3 shape scenes.
    assert max(len(it.shapes) for it in demo.generate(60, 1)) == 3
    with pytest.raises(ValueError, match="scene"):
        next(demo.generate(5, 0, scene="busy"))


def test_scene_labels_parse_main_object_and_first_background_colour():
    spec = {"background": "beige to light blue", "objects": [{"shape": "star", "colour": "red", "r": 0.3},
                                                              {"shape": "ring", "colour": "blue", "r": 0.1}]}
    got = shard_data.scene_labels([json.dumps(spec), None, "", json.dumps({"background": "white", "objects": []})])
    assert got == [{"colour": "red", "shape": "star", "background": "beige"}, None, None, None]


def _toy(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squares or discs, red or blue, on white: two attributes a few steps can learn."""
    g = torch.Generator().manual_seed(seed)
    colour, shape = torch.randint(2, (n,), generator=g), torch.randint(2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x = torch.ones(n, 3, 16, 16)
    for i in range(n):
        cx, cy = 5 + 6 * torch.rand(2, generator=g)
        inside = ((xx - cx).abs() <= 3.5) & ((yy - cy).abs() <= 3.5) if shape[i] else \
            (xx - cx) ** 2 + (yy - cy) ** 2 <= 4.0 ** 2 * 0.6
        rgb = torch.tensor([1.0, -1, -1]) if colour[i] else torch.tensor([-1.0, -1, 1])
        x[i][:, inside] = rgb[:, None]
    return x, {"colour": colour, "shape": shape}


def test_oracle_learns_a_toy_scene_and_is_judged_on_held_out_images():
    torch.manual_seed(0)
    x, y = _toy(256, 0)
    model = SceneOracle({"colour": 2, "shape": 2}, OracleConfig(size=16, width=8))
    losses = fit(model, x, y, steps=120, batch_size=32, lr=5e-3, seed=0)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    xt, yt = _toy(128, 1)
    pred, feats = model.predict(xt)
    assert feats.shape == (128, 16 * 8)  # mean and max pool of 8 * width channels
    assert accuracy(pred["colour"], yt["colour"]) == 1.0
    assert accuracy(pred["shape"], yt["shape"]) > 0.9
    assert np.isnan(accuracy(pred["shape"], torch.full((128,), -1)))  # no labelled item: no grade
    # Any resolution is judged after resizing to the oracle's input.
    big = torch.nn.functional.interpolate(xt, size=64, mode="nearest")
    assert accuracy(model.predict(big)[0]["colour"], yt["colour"]) == 1.0


@pytest.fixture(scope="module")
def labelled_shard(tmp_path_factory):
    art = Store(str(tmp_path_factory.mktemp("oracle"))).artifact("shard", "k")
    write_fake_shard(art, 48, resolutions=(16, 32), heldout_fraction=0.25, scene="simple", photos=True)
    return art


def test_oracle_stage_trains_on_train_rows_and_reports_held_out_accuracy(labelled_shard, tmp_path):
    out = Store(str(tmp_path)).artifact("oracle", "k")
    cfg = oracle.OracleStageConfig(resolution=32, judged_at=[16, 32], steps=20, batch_size=16, size=16, width=8)
    counts = oracle.run({"shard": labelled_shard}, cfg, out)
    train_x, train_labels, _ = shard_data.labelled(labelled_shard, 32, shard_data.TRAIN)
    _, held_labels, _ = shard_data.labelled(labelled_shard, 32, shard_data.HELDOUT)
    assert counts["labelled_train"] == len(train_labels) and counts["labelled_heldout"] == len(held_labels) > 0
    assert train_x.shape == (len(train_labels), 3, 32, 32)
    meta = out.read_json("oracle.json")
    assert meta["classes"]["colour"] == sorted({lab["colour"] for lab in train_labels})
    assert set(meta["heldout_accuracy"]) == {"16", "32"}
    assert all(0.0 <= v <= 1.0 for acc in meta["heldout_accuracy"].values() for v in acc.values())
    assert meta["chance"] == oracle.chance(held_labels)
    model, again = oracle.load(out)
    x, _, _ = shard_data.labelled(labelled_shard, 32, shard_data.HELDOUT)
    pred, _ = model.predict(torch.from_numpy(x))
    want = oracle.targets(held_labels, again["classes"])
    assert accuracy(pred["colour"], want["colour"]) == pytest.approx(meta["heldout_accuracy"]["32"]["colour"])


def test_oracle_stage_without_labels_writes_an_empty_judge(tmp_path):
    shard = Store(str(tmp_path)).artifact("shard", "k")
    table = write_fake_shard(shard, 12, resolutions=(16,))
    table = table.set_column(table.schema.get_field_index("labels"), "labels",
                             pa.array([None] * table.num_rows, pa.string()))  # real data: no ground truth
    shard.write_parquet("parquet/00000.parquet", table)
    shard.fs.delete_file(shard.child("parquet/00001.parquet"))
    out = Store(str(tmp_path)).artifact("oracle", "k")
    assert oracle.run({"shard": shard}, oracle.OracleStageConfig(resolution=16), out) == {"labelled_train": 0}
    assert oracle.load(out) is None


def test_evaluate_grades_prompts_floors_and_chance(labelled_shard, tmp_path, monkeypatch):
    """A generator that draws the held-out real image of each prompt scores the oracle's own accuracy; one
    that draws noise scores far lower; both get an ``(init)`` row, and chance comes from the held-out truth."""
    judge_art = Store(str(tmp_path)).artifact("oracle", "k")
    oracle.run({"shard": labelled_shard}, oracle.OracleStageConfig(resolution=32, judged_at=[32], steps=60,
                                                                    batch_size=16, size=16, width=8), judge_art)
    cfg = evaluate.EvaluateConfig(n_samples=64, metrics=["swd"], swd_patches_per_image=8, prompt_repeats=2,
                                  grid_images=4)
    real, caps, truth = evaluate.heldout_reals(labelled_shard, 32, cfg)
    by_caption = dict(zip(caps, real))

    def load(arts, initial=False):
        def copy(prompts, seed):
            return torch.stack([by_caption[p] for p in prompts])

        def noise(prompts, seed):
            return torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        return Generator("pagoda_32", 32, noise if initial else copy, nfe=1)

    from workflows import pagoda
    monkeypatch.setattr(pagoda, "load_generator", load)
    out = Store(str(tmp_path)).artifact("evaluate", "k")
    counts = evaluate.run({"shard": labelled_shard, "oracle": judge_art, "pagoda_32.generator": "g"}, cfg, out)
    assert counts["models"] == 1
    table = out.read_json("metrics.json")
    model, meta = oracle.load(judge_art)
    known = [t for t in truth if t]
    pred, _ = model.predict(real[[i for i, t in enumerate(truth) if t]])
    own = accuracy(pred["colour"], oracle.targets(known, meta["classes"])["colour"])
    assert table["pagoda_32"]["colour_acc"] == pytest.approx(own)
    assert table["pagoda_32"]["oracle_fd"] < table["pagoda_32 (init)"]["oracle_fd"]
    assert table["chance"] == {f"{k}_acc": v for k, v in oracle.chance(known).items()}
    assert set(table["oracle on real 32 px"]) == {"colour_acc", "shape_acc", "background_acc"}
    png = Image.open(io.BytesIO(out.read_bytes("grid_pagoda_32.png")))
    assert png.size[0] > 4 * 96  # four captioned cells


def test_captioned_grid_lays_out_cells_with_room_for_the_prompt():
    png = Image.open(io.BytesIO(captioned_grid(torch.zeros(5, 3, 16, 16), ["a red star"] * 5, cell=64, ncol=4)))
    assert png.size == (4 * 68 + 4, 2 * (64 + 40 + 4) + 4)
    px = np.asarray(png.convert("RGB"))
    assert (px[4:68, 4:68] == 127).all() or (px[4:68, 4:68] == 128).all()  # the image, enlarged
    assert (px[4 + 64 + 2:4 + 64 + 40, 4:68] < 128).any()  # text under it
