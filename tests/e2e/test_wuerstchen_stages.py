"""The six Würstchen stages through the real runner, Ray Data and Ray Train + DeepSpeed, on a tiny
fake shard: losses fall, encodes cover exactly the training rows, sampling is seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from data_prep import demo_data
from data_prep.images import decode_rgb, encode
from data_prep.splits import heldout_mask
from workflows import runner
from workflows.config import PipelineConfig, RayConfig, RunConfig
from workflows.stage import Stage
from workflows.store import Artifact, Store
from workflows.train import TrainConfig
from workflows.train.export import read_history

pytestmark = pytest.mark.slow


def make_fake_shard(art: Artifact, n: int, resolutions=(16, 32, 64), seed: int = 0, files: int = 2) -> pa.Table:
    """A shard artifact as data_prep/shard.py lays it out: parquet/NNNNN.parquet with sample_id, key,
    caption, recaption, scores and jpg_{R} (encoded R×R centre crops) per resolution."""
    rows = []
    for item in demo_data.generate(n, seed, min_size=64, max_size=128, photos=False):
        img = decode_rgb(item.data)
        row = {"sample_id": item.sample_id, "key": item.sample_id, "caption": item.caption,
               "recaption": item.caption, "clip_sim": 0.3, "aesthetic": 5.5}
        for r in resolutions:
            row[f"jpg_{r}"] = encode(ImageOps.fit(img, (r, r), Image.Resampling.BICUBIC), "jpg", quality=95)
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    step = -(-n // files)
    for i in range(files):
        art.write_parquet(f"parquet/{i:05d}.parquet", table.slice(i * step, step))
    return table


@dataclass(frozen=True)
class FakeShardConfig:
    n: int = 64


def _shard_stage(inputs, cfg: FakeShardConfig, out: Artifact):
    return {"rows": make_fake_shard(out, cfg.n).num_rows}


def _train(**kw) -> TrainConfig:
    base = {"num_workers": 1, "cpus_per_worker": 0.5, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5,
            "total_steps": 60, "log_every": 3, "ckpt_every": 0, "preview_images": 4, "ema_decay": 0.9}
    return TrainConfig(**{**base, **kw})


def _configs(n: int):
    from workflows import wuerstchen_encode as enc
    from workflows import wuerstchen_stages as ws

    return {
        "shard": FakeShardConfig(n=n),
        "wuerstchen_stage_a": ws.StageATrainConfig(resolution=32, in_memory=True, train=_train()),
        "wuerstchen_encode_a": enc.EncodeAConfig(resolution=64, batch_size=32),
        "wuerstchen_stage_b": ws.StageBTrainConfig(in_memory=True, train=_train(), preview_steps=4),
        "wuerstchen_encode_semantic": enc.EncodeSemanticConfig(batch_size=32),
        "wuerstchen_stage_c": ws.StageCTrainConfig(in_memory=True, train=_train(lr=3e-3), preview_steps=8),
        "wuerstchen_sample": ws.SampleConfig(prompts=["a red circle on a white background", "a blue square"],
                                             n_per_prompt=2, steps_c=8, steps_b=4, seed=3),
    }


def _losses(art: Artifact) -> list[float]:
    return [r["loss"] for r in read_history(art)]


@pytest.mark.timeout(900)
def test_six_stages_train_encode_and_sample(ray_cluster, tmp_path):
    from workflows import sample_wuerstchen
    from workflows import wuerstchen_stages as ws

    n = 64
    stages = [Stage("shard", _shard_stage, FakeShardConfig)] + ws.STAGES
    cfg = PipelineConfig(run=RunConfig(root=str(tmp_path / "root")), ray=RayConfig(), stages=_configs(n))
    store = Store(cfg.run.root)
    steps = runner.plan(stages, cfg, store)
    assert [s.action for s in steps] == ["run"] * 7
    summary = runner.execute(steps, cfg, store, "run1")
    arts = {s.stage.name: s.artifact for s in steps}
    walls = {r["stage"]: r["wall_s"] for r in summary["stages"]}
    print("stage wall seconds:", json.dumps(walls))

    for name in ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c"):
        losses = _losses(arts[name])
        k = max(1, len(losses) // 10)
        assert np.mean(losses[:k]) > np.mean(losses[-k:]), (name, losses)
        assert arts[name].exists("preview.png") and arts[name].exists("model_config.json")

    ids = [i for f in arts["shard"].list(".parquet")
           for i in pq.read_table(arts["shard"].child(f), columns=["sample_id"]).column("sample_id").to_pylist()]
    train_rows = int((~heldout_mask(ids, 0.1)).sum())
    assert 0 < train_rows < n
    for name in ("wuerstchen_encode_a", "wuerstchen_encode_semantic"):
        assert arts[name].manifest["counts"]["rows"] == train_rows
    info = arts["wuerstchen_encode_a"].read_json("info.json")
    assert info["shapes"] == {"latent_a": [4, 16, 16], "text_tokens": [77, 64]}
    assert arts["wuerstchen_encode_semantic"].read_json("info.json")["shapes"]["latent_sem"] == [16, 4, 4]

    sample = arts["wuerstchen_sample"]
    with Image.open(sample.child("grid.png")) as grid:
        assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 2 prompts x 2 samples of 64 px, 2 px gaps
    assert len(sample.list(".png", subdir="samples")) == 4
    assert [r["prompt_index"] for r in sample.read_json("prompts.json")] == [0, 0, 1, 1]

    # Same seed, same pixels: the CLI from the run root reproduces the stage's grid byte for byte.
    out = tmp_path / "cli.png"
    argv = ["--root", cfg.run.root, "--prompt", "a red circle on a white background", "--prompt", "a blue square",
            "--n", "2", "--steps-c", "8", "--steps-b", "4", "--seed", "3", "--out", str(out)]
    assert sample_wuerstchen.main(argv) == 0
    assert out.read_bytes() == sample.read_bytes("grid.png")
    assert sample_wuerstchen.main(argv[:-1] + [str(tmp_path / "cli2.png")]) == 0
    assert (tmp_path / "cli2.png").read_bytes() == out.read_bytes()
    a, b, c = sample_wuerstchen.from_sample_artifact(sample.uri)
    assert (a.uri, b.uri, c.uri) == tuple(arts[k].uri for k in ("wuerstchen_stage_a", "wuerstchen_stage_b",
                                                                  "wuerstchen_stage_c"))

    # Second plan: everything cached.
    assert {s.action for s in runner.plan(stages, cfg, store)} == {"cached"}
