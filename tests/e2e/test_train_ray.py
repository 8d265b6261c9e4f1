"""fit() through real Ray Train + Ray Data + DeepSpeed on CPU: ZeRO-2 with resume, ZeRO-3 with an
injected worker failure, and the in-process local mode. A handful on purpose: each costs ~a minute."""

import json

import numpy as np
import pytest

from pipeline.store import Store
from workflows.train import TrainConfig, fit, load_weights, synthetic
from workflows.train.export import read_history

ROWS = 160  # 20 steps per epoch at 2 workers x batch 4


def _cfg(**kw) -> TrainConfig:
    base = {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 4, "lr": 3e-3, "log_every": 2,
            "warmup_steps": 4, "schedule": "constant", "ema_decay": 0.9}
    return TrainConfig(**{**base, **kw})


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _attempts(path):
    """Per-rank records split into attempts (a restart goes back to an earlier step)."""
    runs, last = [[]], -1
    for rec in _jsonl(path):
        if rec["step"] < last:
            runs.append([])
        runs[-1].append(rec)
        last = rec["step"]
    return runs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_two_workers_train_and_resume_without_replaying_data(ray_cluster, tmp_path):
    out = Store(str(tmp_path / "root")).artifact("train", "k")
    rec1, rec2 = tmp_path / "rec1", tmp_path / "rec2"
    rec1.mkdir(), rec2.mkdir()
    ds = synthetic.dataset(ROWS)

    s1 = fit(synthetic.spec(record_dir=str(rec1)), _cfg(zero_stage=2, total_steps=12), out, {"train": ds},
             {"model": "synthetic"})
    hist = read_history(out)
    assert s1["steps"] == 12 and s1["world_size"] == 2 and s1["resumed_from_step"] == 0
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], [h["loss"] for h in hist]
    final1 = load_weights(out, "denoiser", raw=True)

    # Same command, larger total: continues at step 12 from the same storage (Train V2 semantics).
    s2 = fit(synthetic.spec(record_dir=str(rec2)), _cfg(zero_stage=2, total_steps=20), out, {"train": ds},
             {"model": "synthetic"})
    assert s2["resumed_from_step"] == 12 and s2["steps"] == 20 and s2["images"] == 160 and s2["epoch"] == 0
    hist = read_history(out)
    assert [h["step"] for h in hist] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert all(h["lr/denoiser"] == pytest.approx(3e-3) for h in hist if h["step"] > 12)  # no second warmup
    for rank in (0, 1):
        first = next(r for r in _jsonl(rec2 / f"rank{rank}.jsonl") if "checksum" in r)
        assert first["step"] == 12
        assert first["checksum"] == pytest.approx(float(sum(v.double().sum() for v in final1.values())), abs=1e-9)
    ids1 = [i for rk in (0, 1) for r in _jsonl(rec1 / f"rank{rk}.jsonl") for i in r["ids"]]
    ids2 = [i for rk in (0, 1) for r in _jsonl(rec2 / f"rank{rk}.jsonl") for i in r["ids"]]
    assert len(ids1) == 96 and len(ids2) == 64 and sorted(ids1 + ids2) == list(range(ROWS))
    assert out.exists("preview.png") and out.exists("loss_curve.png") and out.list(subdir="logs/tensorboard")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_restores_the_last_checkpoint_after_a_worker_fails(ray_cluster, tmp_path):
    out = Store(str(tmp_path / "root")).artifact("train", "k")
    rec, flag = tmp_path / "rec", tmp_path / "fail-once"
    rec.mkdir()
    flag.touch()
    spec = synthetic.spec(record_dir=str(rec), fail_at_step=6, fail_flag=str(flag), fail_rank=1)
    s = fit(spec, _cfg(zero_stage=3, total_steps=10, ckpt_every=4, max_failures=1), out,
            {"train": synthetic.dataset(ROWS)})
    assert not flag.exists()  # the failure happened
    assert s["steps"] == 10 and s["resumed_from_step"] == 4 and s["zero_stage"] == 3
    for rank in (0, 1):
        first, second = _attempts(rec / f"rank{rank}.jsonl")
        assert [r["step"] for r in second] == list(range(4, 10))
        # The restart starts from exactly the step-4 weights (this rank's ZeRO-3 partition).
        assert second[0]["checksum"] == next(r for r in first if r["step"] == 4)["checksum"]
        assert max(r["step"] for r in first) in (5, 6)  # rank 1 died entering step 6
    ids_before_ckpt = {i for rk in (0, 1) for r in _attempts(rec / f"rank{rk}.jsonl")[0] if r["step"] < 4
                       for i in r["ids"]}
    ids_after = [i for rk in (0, 1) for r in _attempts(rec / f"rank{rk}.jsonl")[1] for i in r["ids"]]
    assert len(ids_before_ckpt) == 32 and not ids_before_ckpt & set(ids_after) and len(set(ids_after)) == 48
    hist = read_history(out)
    assert [h["step"] for h in hist] == [2, 4, 6, 8, 10]  # the lost step-6 line was replaced
    assert hist[-1]["loss"] < 0.85 * hist[0]["loss"]
    sd = load_weights(out, "denoiser")  # gathered from ZeRO-3 partitions
    assert {k: tuple(v.shape) for k, v in sd.items()} == \
        {k: tuple(v.shape) for k, v in synthetic.Denoiser().state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_mode_runs_in_process_with_a_ray_dataset(ray_cluster, tmp_path):
    out = Store(str(tmp_path / "root")).artifact("train", "k")
    s = fit(synthetic.spec(), _cfg(num_workers=0, zero_stage=2, total_steps=8, batch_size=8), out,
            {"train": synthetic.dataset(64)})
    assert s["steps"] == 8 and s["world_size"] == 1 and s["epoch"] == 0  # exactly one epoch
    assert out.read_json("ray_train/latest.json")["step"] == 8
    # Resuming at the very end of an epoch: the remainder is empty and epoch 1 starts.
    s = fit(synthetic.spec(), _cfg(num_workers=0, zero_stage=2, total_steps=10, batch_size=8), out,
            {"train": synthetic.dataset(64)})
    assert s["resumed_from_step"] == 8 and s["steps"] == 10 and s["epoch"] == 1
    assert np.isfinite(s["final_loss"]) and out.read_json("metrics.json")["steps"] == 10
