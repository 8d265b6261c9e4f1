"""The training loop in-process (no Ray): engines, accumulation, EMA, resume, data position, export."""

import json
import logging

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, build
from pipeline.store import Store
from workflows.train import OptimGroup, TrainConfig, TrainSpec, engines, load_weights, loop, synthetic
from workflows.train.checkpoint import DirCheckpoints
from workflows.train.data import drop_consumed, rebatch, step_stream
from workflows.train.distributed import process_group

ROWS = 192  # 12 steps per epoch at global batch 16


def _cfg(**kw) -> TrainConfig:
    base = {"num_workers": 1, "batch_size": 8, "grad_accum": 2, "lr": 3e-3, "total_steps": 20, "log_every": 2,
            "ckpt_every": 5, "ema_decay": 0.9, "warmup_steps": 2, "schedule": "cosine"}
    return TrainConfig(**{**base, **kw})


def _run(tmp_path, name, cfg, spec=None, rows=ROWS, shuffle_seed=0, data=None):
    out = Store(str(tmp_path / name)).artifact("train", "k")
    data = data or synthetic.numpy_source(rows, 5, shuffle_seed)  # 5: the loop must re-batch
    summary = loop.run(spec or synthetic.spec(), cfg, out, checkpoints=DirCheckpoints(out, cfg.ckpt_keep), data=data)
    return out, summary


def _records(record_dir):
    with open(record_dir / "rank0.jsonl") as f:
        return [json.loads(line) for line in f]


def _max_dw(out_a, out_b, names=("denoiser",)):
    """max |w_a - w_b| over the raw and EMA weights of ``names``."""
    return max(float((a[k] - b[k]).abs().max()) for n in names for raw in (False, True)
               for a, b in [(load_weights(out_a, n, raw), load_weights(out_b, n, raw))] for k in a)


def test_config_validation_and_derived_values():
    with pytest.raises(ConfigError, match=r"train\.zero_stage: expected 0-3"):
        build(TrainConfig, {"zero_stage": 4}, "train")
    with pytest.raises(ConfigError, match=r"train\.offload: needs"):
        build(TrainConfig, {"offload": True, "zero_stage": 0}, "train")
    with pytest.raises(ConfigError, match=r"train\.betas"):
        build(TrainConfig, {"betas": [0.9, 1.5]}, "train")
    cfg = build(TrainConfig, {"num_workers": 4, "batch_size": 8, "grad_accum": 2, "total_images": 1000,
                              "betas": [0.5, 0.99]}, "train")
    assert cfg.global_batch == 64 and cfg.steps == 16 and cfg.betas == (0.5, 0.99)
    cfg = TrainConfig(warmup_steps=4, schedule="cosine", total_steps=14)
    assert [cfg.lr_factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cfg.lr_factor(9) == pytest.approx(0.5) and cfg.lr_factor(14) == pytest.approx(0.0)
    assert not cfg.bf16(on_gpu=False) and cfg.bf16(on_gpu=True)


def test_rebatch_drops_consumed_ids_and_keeps_exact_sizes():
    src = [{"row_id": np.arange(i, i + 7), "x": np.arange(i, i + 7) * 10} for i in range(0, 35, 7)]
    skip = np.array([0, 3, 8, 30, 34])
    out = list(rebatch(drop_consumed(iter(src), skip, "row_id"), 4))
    assert all(len(b["row_id"]) == 4 for b in out)
    ids = np.concatenate([b["row_id"] for b in out])
    assert len(ids) == 28 and not np.isin(ids, skip).any()  # 30 rows left, a tail of 2 dropped
    assert (np.concatenate([b["x"] for b in out]) == ids * 10).all()  # columns stay aligned
    keys = [{"key": np.array(["a", "b", "c"], dtype=object)}]  # string ids, as Arrow hands them out
    assert next(drop_consumed(keys, np.array(["b"]), "key"))["key"].tolist() == ["a", "c"]
    with pytest.raises(KeyError, match="stable id column 'row_id'"):
        list(drop_consumed(iter([{"x": np.zeros(3)}]), None, "row_id"))


def test_step_stream_rolls_epochs_and_skips_only_the_restored_epoch():
    cfg = _cfg(batch_size=4, grad_accum=2)
    data = synthetic.numpy_source(20, 3, shuffle_seed=None)  # 2 steps of 8 rows per epoch, 4 rows left over
    stream = step_stream(data, cfg, epoch=3, skip=np.arange(8), id_col="row_id")
    epoch, micro = next(stream)
    assert epoch == 3 and np.concatenate([m["row_id"] for m in micro]).tolist() == list(range(8, 16))
    epoch, micro = next(stream)  # 4 rows left in epoch 3: not a step, so epoch 4 starts from row 0
    assert epoch == 4 and np.concatenate([m["row_id"] for m in micro]).tolist() == list(range(8))
    with pytest.raises(RuntimeError, match="no complete step"):
        next(step_stream(synthetic.numpy_source(7, 7), cfg, 0, None, "row_id"))


def test_torch_engine_trains_and_exports_the_artifact(tmp_path):
    cfg = _cfg(engine="torch", total_steps=24, preview_every=10, preview_images=4)
    out, s = _run(tmp_path, "a", cfg)
    hist = [json.loads(line) for line in out.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [h["step"] for h in hist] == list(range(2, 25, 2))
    assert hist[-1]["loss"] < 0.75 * hist[0]["loss"]
    assert s["steps"] == 24 and s["images"] == 24 * 16 and s["epoch"] == 1 and s["final_loss"] == hist[-1]["loss"]
    assert {"lr/denoiser", "grad_norm/denoiser", "images_per_s", "step_s", "data_s"} <= set(hist[-1])
    for name in ["model_config.json", "train_config.json", "metrics.json", "loss_curve.png", "preview.png",
                 "weights/denoiser.safetensors", "weights/raw/denoiser.safetensors", "logs/metrics.jsonl",
                 "logs/previews/step_00000020.png"]:
        assert out.exists(name), name
    assert out.list(subdir="logs/tensorboard")
    assert out.read_json("train_config.json")["total_steps"] == 24
    # 24 steps x 16 rows > one epoch: the audit of trained rows holds every row id exactly once.
    assert out.read_json("trained_rows.json")["row_ids"] == list(range(ROWS))
    ema, raw = load_weights(out, "denoiser"), load_weights(out, "denoiser", raw=True)
    assert ema.keys() == raw.keys() and not all(torch.equal(ema[k], raw[k]) for k in ema)
    assert max(out.list(subdir="ray_train")) == "ray_train/latest.json"
    assert {n.split("/")[1] for n in out.list(subdir="ray_train") if n.count("/") > 1} == \
        {"checkpoint_00000020", "checkpoint_00000024"}  # ckpt_keep=2


def test_resume_after_a_failure_is_exact(tmp_path):
    """Weights, EMA, Adam state, LR schedule, RNG and data position all come back: a run that
    dies at step 13 and is re-run (restoring step 10) ends bit-identical to an unbroken run."""
    cfg = _cfg(zero_stage=2)
    (tmp_path / "rec_a").mkdir()
    (tmp_path / "rec_b").mkdir()
    out_a, _ = _run(tmp_path, "a", cfg, synthetic.spec(record_dir=str(tmp_path / "rec_a")))
    flag = tmp_path / "fail"
    flag.touch()
    spec_b = synthetic.spec(record_dir=str(tmp_path / "rec_b"), fail_at_step=13, fail_flag=str(flag), fail_rank=0)
    with pytest.raises(RuntimeError, match="injected failure at step 13"):
        _run(tmp_path, "b", cfg, spec_b)
    out_b, s = _run(tmp_path, "b", cfg, spec_b)
    assert s["resumed_from_step"] == 10 and s["steps"] == 20
    for raw in (False, True):
        a, b = load_weights(out_a, "denoiser", raw), load_weights(out_b, "denoiser", raw)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert out_a.read_bytes("metrics.jsonl").count(b"\n") == out_b.read_bytes("metrics.jsonl").count(b"\n") == 10
    la = [json.loads(x)["loss"] for x in out_a.read_bytes("metrics.jsonl").splitlines()]
    lb = [json.loads(x)["loss"] for x in out_b.read_bytes("metrics.jsonl").splitlines()]
    assert la == lb
    rec_a, rec_b = _records(tmp_path / "rec_a"), _records(tmp_path / "rec_b")
    # Steps 10-12 ran twice in b (lost with the failure); everything else exactly once.
    first_try = [r for r in rec_b[: len(rec_b) - 2 * 10] if r["step"] < 10]
    second_try = rec_b[len(rec_b) - 2 * 10:]
    assert [r["ids"] for r in first_try + second_try] == [r["ids"] for r in rec_a]
    assert second_try[0]["step"] == 10


def test_resume_with_a_local_shuffle_buffer_is_exact(tmp_path):
    """PaGoDA's generator stages: two optimizer groups (two DeepSpeed engines), noise from torch's
    global RNG, a collate drawing from numpy's and python's, rows read through a local shuffle
    buffer reseeded every epoch. Killed at step 8 and resumed from step 5, the run replays epoch 0
    (same rows, same shuffle, the consumed ones dropped) and ends where an unbroken run ends. The
    old resume, which drops the consumed rows before the buffer (still used when an epoch cannot be
    replayed: another worker count, deterministic_data=False), reorders the rest and drifts."""
    def spec(rec, **kw):
        (tmp_path / rec).mkdir()
        return synthetic.spec(two_groups=True, record_dir=str(tmp_path / rec), fail_rank=0,
                              collate=synthetic.noisy_collate, **kw)

    def data():
        return synthetic.numpy_source(ROWS, 5, shuffle_buffer=64)

    cfg = _cfg(zero_stage=2, total_steps=16)  # 12 steps an epoch: the resumed run crosses into epoch 1
    out_a, _ = _run(tmp_path, "a", cfg, spec("rec_a"), data=data())
    for name, c in (("b", cfg), ("c", _cfg(zero_stage=2, total_steps=16, deterministic_data=False))):
        flag = tmp_path / f"fail_{name}"
        flag.touch()
        spec_k = spec(f"rec_{name}", fail_at_step=8, fail_flag=str(flag))
        with pytest.raises(RuntimeError, match="injected failure at step 8"):
            _run(tmp_path, name, c, spec_k, data=data())
        out, s = _run(tmp_path, name, c, spec_k, data=data())
        assert s["resumed_from_step"] == 5 and s["steps"] == 16 and s["epoch"] == 1
    out_b, out_c = (Store(str(tmp_path / n)).artifact("train", "k") for n in "bc")
    assert _max_dw(out_a, out_b, ("denoiser", "critic")) <= 1e-6  # measured: 0.0 (bit-identical)
    la, lb = ([json.loads(x)["loss"] for x in o.read_bytes("metrics.jsonl").splitlines()] for o in (out_a, out_b))
    assert la == lb and len(la) == 8  # the loss curve, too
    rec_a, rec_b, rec_c = (_records(tmp_path / f"rec_{n}") for n in "abc")
    resumed_b = [r["ids"] for r in rec_b[2 * 8:]]  # after the 8 lost steps (2 micro-batches each)
    assert resumed_b == [r["ids"] for r in rec_a[2 * 5:]]  # the same rows, in the same order, from step 5 on
    before = {i for r in rec_c[:2 * 5] for i in r["ids"]}  # epoch 0, before the checkpoint
    epoch0 = [i for r in rec_c[2 * 8:2 * 8 + 2 * 7] for i in r["ids"]]  # epoch 0 after the restore (steps 5-11)
    assert not before & set(epoch0) and len(set(epoch0)) == len(epoch0)  # old way: no row twice, but
    assert _max_dw(out_a, out_c, ("denoiser", "critic")) > 1e-4  # another order, other weights


def test_an_unreproducible_order_resumes_correctly_and_says_so(tmp_path, caplog):
    """A source whose order changes from run to run cannot be replayed: the resumed epoch still
    trains on no row twice (the consumed ids are dropped wherever they arrive), with a warning."""
    calls = []
    base = synthetic.numpy_source(64, 8, shuffle_seed=0)

    def data(epoch, skip):
        calls.append(skip)
        return base(epoch + 100 * len(calls), skip)  # another permutation on every call

    (tmp_path / "rec").mkdir()
    spec = synthetic.spec(record_dir=str(tmp_path / "rec"))
    cfg = _cfg(engine="torch", grad_accum=1, total_steps=3, ckpt_every=0)
    _run(tmp_path, "a", cfg, spec, data=data)
    with caplog.at_level(logging.WARNING, logger="genmodels.train"):
        _, s = _run(tmp_path, "a", _cfg(engine="torch", grad_accum=1, total_steps=8, ckpt_every=0), spec, data=data)
    assert s["resumed_from_step"] == 3 and s["epoch"] == 0 and calls == [None, None]  # replayed: the whole epoch
    ids = [i for r in _records(tmp_path / "rec") for i in r["ids"]]
    assert sorted(ids) == list(range(64))  # one epoch of 8 steps x 8 rows: every row once
    assert "data order differs from the interrupted run's" in caplog.text


def test_extending_a_finished_run_continues_the_epoch(tmp_path):
    cfg = _cfg(engine="torch", schedule="constant", total_steps=5, ckpt_every=0)
    (tmp_path / "rec").mkdir()
    spec = synthetic.spec(record_dir=str(tmp_path / "rec"))
    _run(tmp_path, "a", cfg, spec)
    out, s = _run(tmp_path, "a", _cfg(engine="torch", schedule="constant", total_steps=12, ckpt_every=0), spec)
    assert s["resumed_from_step"] == 5 and s["steps"] == 12 and s["images"] == 12 * 16 and s["epoch"] == 0
    ids = [i for r in _records(tmp_path / "rec") for i in r["ids"]]
    assert sorted(ids) == list(range(ROWS))  # 12 steps = one epoch: every row once, none twice
    steps = [json.loads(x)["step"] for x in out.read_bytes("metrics.jsonl").splitlines()]
    assert steps == [2, 4, 5, 6, 8, 10, 12]
    assert out.read_json("ray_train/latest.json")["step"] == 12
    # Resuming at the very end of an epoch: its replay drops every row, and epoch 1 starts.
    out, s = _run(tmp_path, "a", _cfg(engine="torch", schedule="constant", total_steps=13, ckpt_every=0), spec)
    assert s["resumed_from_step"] == 12 and s["epoch"] == 1
    epoch1 = np.random.default_rng(1).permutation(ROWS)[:16].tolist()  # numpy_source's order of epoch 1
    assert [i for r in _records(tmp_path / "rec")[-2:] for i in r["ids"]] == epoch1


def test_two_groups_under_zero3_match_plain_torch(tmp_path):
    """Two DeepSpeed engines (generator/critic alternation, frozen critic in the generator loss,
    per-group LR and betas, accumulation, clipping) reproduce the plain-PyTorch updates."""
    spec = synthetic.spec(two_groups=True)
    out_t, _ = _run(tmp_path, "t", _cfg(engine="torch", total_steps=8, ckpt_every=0), spec)
    out_z, s = _run(tmp_path, "z", _cfg(zero_stage=3, total_steps=8, ckpt_every=0), spec)
    for name in ("denoiser", "critic"):
        a, b = load_weights(out_t, name, raw=True), load_weights(out_z, name, raw=True)
        assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a), name
    assert s["params"] == {"denoiser": 11011, "critic": 705}
    hist = json.loads(out_z.read_bytes("metrics.jsonl").splitlines()[-1])
    assert hist["lr/critic"] == pytest.approx(0.5 * hist["lr/denoiser"]) and "grad_norm/critic" in hist


def test_step_function_contract_is_checked(tmp_path):
    base = synthetic.spec()

    def twice(ctx, batch, step):
        base.step(ctx, batch, step)
        if ctx.micro == 0:
            ctx.backward_step("denoiser", ctx.models["denoiser"](batch["image"]).pow(2).mean())
        return {}

    bad = TrainSpec(base.build_models, base.optimizers, twice)
    with pytest.raises(RuntimeError, match="backward_step called 3 times"):
        _run(tmp_path, "a", _cfg(engine="torch", total_steps=2), bad)
    shared = TrainSpec(base.build_models, {"a": OptimGroup(("denoiser",)), "b": OptimGroup(("denoiser",))}, base.step)
    with pytest.raises(ValueError, match="more than one optimizer group"):
        _run(tmp_path, "b", _cfg(engine="torch"), shared)


def test_deepspeed_load_from_a_wrong_directory_raises(tmp_path):
    cfg = _cfg(zero_stage=2)
    with process_group(cfg, torch.device("cpu")):
        box = engines.Box({"m": torch.nn.Linear(4, 4)})
        grp = engines.DeepSpeedGroup(box, cfg, OptimGroup(("m",)), on_gpu=False)
        with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
            grp.load(str(tmp_path))


def test_no_data_mode_counts_steps_and_images(tmp_path):
    base = synthetic.spec()

    def step(ctx, batch, step):
        assert batch is None
        x = torch.rand(ctx.cfg.batch_size, 3, 8, 8) * 2 - 1
        return base.step(ctx, {"image": x, "row_id": torch.zeros(0)}, step)

    spec = TrainSpec(base.build_models, base.optimizers, step, ema_modules=())
    out = Store(str(tmp_path)).artifact("train", "k")
    s = loop.run(spec, _cfg(engine="torch", total_steps=4), out, checkpoints=DirCheckpoints(out))
    assert s["steps"] == 4 and s["images"] == 64
    assert not out.exists("weights/raw/denoiser.safetensors") and out.exists("weights/denoiser.safetensors")


def test_s3_output_resumes_prunes_checkpoints_and_uploads_logs(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="train-test")
    out = Store("s3://train-test/root").artifact("train", "k")
    for total in (6, 10):
        cfg = _cfg(engine="torch", batch_size=8, grad_accum=1, total_steps=total, ckpt_every=3, ckpt_keep=1)
        s = loop.run(synthetic.spec(), cfg, out, checkpoints=DirCheckpoints(out, 1),
                     data=synthetic.numpy_source(64, 8))
    assert s["resumed_from_step"] == 6 and s["steps"] == 10 and s["epoch"] == 1
    names = out.list()
    assert {n.split("/")[1] for n in names if n.startswith("ray_train/checkpoint_")} == {"checkpoint_00000010"}
    assert "logs/metrics.jsonl" in names and any(n.startswith("logs/tensorboard/") for n in names)
    assert [json.loads(x)["step"] for x in out.read_bytes("metrics.jsonl").splitlines()] == [2, 4, 6, 8, 10]
    assert load_weights(out, "denoiser").keys() == synthetic.Denoiser().state_dict().keys()


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_radam_without_clipping_trains_as_the_official_pagoda_code(tmp_path, engine):
    """optimizer=radam (PaGoDA's cm/train_util.py) with grad_clip=0: RAdam is the optimizer both
    engines step, and the loss goes down."""
    cfg = _cfg(engine=engine, optimizer="radam", grad_clip=0.0, total_steps=24, ckpt_every=0)
    box = torch.nn.Linear(4, 4)
    assert isinstance(engines._optimizer(box, cfg, OptimGroup(modules=("m",))), torch.optim.RAdam)
    out, s = _run(tmp_path, engine, cfg)
    hist = [json.loads(line) for line in out.read_bytes("metrics.jsonl").decode().splitlines()]
    # RAdam's first steps are rectified (momentum SGD), so it starts slower than AdamW here.
    assert s["steps"] == 24 and hist[-1]["loss"] < 0.95 * hist[0]["loss"]
    from pipeline.config import ConfigError, build

    with pytest.raises(ConfigError, match="t.optimizer"):
        build(TrainConfig, {"optimizer": "sgd"}, "t")
