"""Smoke test (opt-in: ``-m smoke``): the six Würstchen stages through the real runner, Ray Data and
Ray Train + DeepSpeed on a tiny fake shard, 20 training steps a stage: losses fall, encodes cover
exactly the shard's training rows, sampling is seeded and the CLI finds the set by role."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import runner
from pipeline.config import PipelineConfig, RayConfig, RunConfig
from pipeline.stage import Stage
from pipeline.store import Artifact, Store
from tests.fakes import write_fake_shard
from workflows import shard_data, text_clip, wuerstchen
from workflows.train import TrainConfig
from workflows.train.export import read_history
from workflows.wuerstchen import encode, stages
from workflows.wuerstchen import sample as sample_mod

pytestmark = pytest.mark.smoke


@dataclass(frozen=True)
class FakeShardConfig:
    n: int = 64


def _shard_stage(inputs, cfg: FakeShardConfig, out: Artifact):
    return {"rows": write_fake_shard(out, cfg.n, recaption="copy").num_rows}


STEPS = 20  # training steps per stage: a smoke test, not a convergence test


def _train(**kw) -> TrainConfig:
    base = {"num_workers": 1, "cpus_per_worker": 0.5, "batch_size": 8, "lr": 2e-3, "warmup_steps": 3,
            "total_steps": STEPS, "log_every": 2, "ckpt_every": 0, "preview_images": 4, "ema_decay": 0.9}
    return TrainConfig(**{**base, **kw})


def _configs(n: int):
    return {
        "shard": FakeShardConfig(n=n),
        "clip": text_clip.ClipConfig(steps=0),  # random text encoders (the demo trains its CLIP)
        "wuerstchen_stage_a": stages.StageATrainConfig(resolution=32, in_memory=True, train=_train()),
        "wuerstchen_encode_a": encode.EncodeAConfig(resolution=64, batch_size=32),
        "wuerstchen_stage_b": stages.StageBTrainConfig(in_memory=True, train=_train(), preview_steps=4),
        "wuerstchen_encode_semantic": encode.EncodeSemanticConfig(batch_size=32),
        "wuerstchen_stage_c": stages.StageCTrainConfig(in_memory=True, train=_train(lr=3e-3), preview_steps=8),
        "wuerstchen_sample": sample_mod.SampleConfig(prompts=["a red circle on a white background", "a blue square"],
                                                     n_per_prompt=2, steps_c=8, steps_b=4, seed=3),
    }


def _losses(art: Artifact) -> list[float]:
    return [r["loss"] for r in read_history(art)]


@pytest.mark.timeout(900)
def test_six_stages_train_encode_and_sample(ray_cluster, tmp_path):
    n = 64
    table = [Stage("shard", _shard_stage, FakeShardConfig), text_clip.STAGE] + wuerstchen.STAGES
    cfg = PipelineConfig(run=RunConfig(root=str(tmp_path / "root")), ray=RayConfig(), stages=_configs(n))
    store = Store(cfg.run.root)
    steps = runner.plan(table, cfg, store)
    assert [s.action for s in steps] == ["run"] * 8
    summary = runner.execute(steps, cfg, store, "run1")
    arts = {s.stage.name: s.artifact for s in steps}
    walls = {r["stage"]: r["wall_s"] for r in summary["stages"]}
    print("stage wall seconds:", json.dumps(walls))

    for name in ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c"):
        losses = _losses(arts[name])
        k = max(1, len(losses) // 10)
        assert np.mean(losses[:k]) > np.mean(losses[-k:]), (name, losses)
        assert arts[name].exists("preview.png") and arts[name].exists("model_config.json")

    train_ids = shard_data.split_ids(arts["shard"])[shard_data.TRAIN]
    assert 0 < len(train_ids) < n
    for name in ("wuerstchen_encode_a", "wuerstchen_encode_semantic"):
        assert arts[name].manifest["counts"]["rows"] == len(train_ids)
        encoded = [i for f in arts[name].list(".parquet", subdir=encode.DATA)
                   for i in pq.read_table(arts[name].child(f), columns=["sample_id"]).column("sample_id").to_pylist()]
        assert sorted(encoded) == sorted(train_ids)  # every training row once, nothing held out
    assert set(arts["wuerstchen_stage_b"].manifest["inputs"]) == {"latents", "stage_a"}  # by role
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
    assert sample_mod.main(argv) == 0
    assert out.read_bytes() == sample.read_bytes("grid.png")
    assert sample_mod.main(argv[:-1] + [str(tmp_path / "cli2.png")]) == 0
    assert (tmp_path / "cli2.png").read_bytes() == out.read_bytes()
    a, b, c = sample_mod.from_sample_artifact(sample.uri)
    assert (a.uri, b.uri, c.uri) == tuple(arts[k].uri for k in ("wuerstchen_stage_a", "wuerstchen_stage_b",
                                                                  "wuerstchen_stage_c"))

    # Second plan: everything cached.
    assert {s.action for s in runner.plan(table, cfg, store)} == {"cached"}
