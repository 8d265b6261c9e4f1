"""Artifact store, config validation and the cached stage runner, on a toy DAG (no Ray)."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import pytest

from pipeline import config as C
from pipeline import runner
from pipeline.stage import Stage
from pipeline.store import MANIFEST, Store

CALLS: list[str] = []


@dataclass(frozen=True)
class NumCfg:
    n: int = 3
    scale: float = 1.0
    fail_after: int = -1  # raise after writing this many rows (crash simulation)


def _writer(name):
    def run(inputs, cfg, out):
        CALLS.append(name)
        base = sum(len(a.list(".txt")) for a in inputs.values())
        for i in range(cfg.n):
            if i == cfg.fail_after:
                raise RuntimeError("injected crash")
            if out.exists(f"part-{i:03d}.txt"):  # resume: keep what a crashed run finished
                continue
            out.write_bytes(f"part-{i:03d}.txt", f"{name} {i * cfg.scale + base}\n".encode())
        return {"rows": cfg.n, "inputs": base}
    return run


# a -> b -> c, and d independent of them
TOY = [
    Stage("a", _writer("a"), NumCfg),
    Stage("b", _writer("b"), NumCfg, inputs=("a",)),
    Stage("c", _writer("c"), NumCfg, inputs=("b",)),
    Stage("d", _writer("d"), NumCfg),
]
TOY_CFGS = {s.name: s.config for s in TOY}


def _run(root, overrides=(), **plan_kw):
    cfg = C.load(None, [f"run.root={root}", *overrides], TOY_CFGS)
    store = Store(cfg.run.root)
    steps = runner.plan(TOY, cfg, store, **plan_kw)
    CALLS.clear()
    summary = runner.execute(steps, cfg, store, "r")
    return steps, summary, store


def _manifests(store):
    out = {}
    for s in TOY:
        for name in sorted(os.listdir(os.path.join(store.path, s.name))):
            p = os.path.join(store.path, s.name, name, MANIFEST)
            if os.path.exists(p):
                out.setdefault(s.name, []).append(json.load(open(p)))
    return out


def test_store_atomic_write_list_and_sizes(tmp_path):
    art = Store(str(tmp_path)).artifact("s", "k")
    art.write_bytes("x/b.bin", b"12345")
    art.write_json("a.json", {"v": 1})
    assert art.list() == ["a.json", "x/b.bin"]
    assert art.list(".bin") == ["x/b.bin"]
    assert art.read_json("a.json") == {"v": 1}
    assert art.sizes() == (2, 5 + len(art.read_bytes("a.json")))
    assert not [f for f in os.listdir(tmp_path / "s" / "k") if ".tmp-" in f]
    art.clear()
    assert art.list() == [] and art.sizes() == (0, 0)


def test_a_write_killed_before_its_rename_leaves_nothing_a_reader_sees(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.dataset as pads

    art = Store(str(tmp_path / "s")).artifact("stage", "k")
    monkeypatch.setattr("pipeline.store.os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the writer dies between its temp file and the rename
        art.write_parquet("rows/shard=a/part-00000.parquet", pa.table({"key": ["a0", "a1"]}))
    monkeypatch.undo()
    assert len(os.listdir(tmp_path / "s" / "stage" / "k" / "rows" / "shard=a")) == 1  # the temp file
    assert art.list(subdir="rows") == [] and art.sizes() == (0, 0)
    assert pads.dataset(art.child("rows"), format="parquet", partitioning="hive").count_rows() == 0
    assert art.remove_temp("rows") == 1 and not os.listdir(tmp_path / "s" / "stage" / "k" / "rows" / "shard=a")


def test_first_run_runs_all_second_run_all_cached(tmp_path):
    steps, _, store = _run(tmp_path)
    assert [s.action for s in steps] == ["run"] * 4 and CALLS == ["a", "b", "c", "d"]
    m = _manifests(store)
    assert m["c"][0]["counts"] == {"rows": 3, "inputs": 3}
    assert m["b"][0]["inputs"] == {"a": m["a"][0]["key"]}
    assert {"stage", "key", "config", "code_version", "wall_s", "files", "bytes", "created_at"} <= set(m["a"][0])
    steps, summary, _ = _run(tmp_path)
    assert [s.action for s in steps] == ["cached"] * 4 and CALLS == []
    assert [r["action"] for r in summary["stages"]] == ["cached"] * 4


def test_force_reruns_stage_and_downstream_only(tmp_path):
    _, _, store = _run(tmp_path)
    before = {k: v[0]["created_at"] + str(v[0]["wall_s"]) for k, v in _manifests(store).items()}
    mtime = {s: os.path.getmtime(os.path.join(store.path, s, _manifests(store)[s][0]["key"], MANIFEST)) for s in "abcd"}
    steps, _, _ = _run(tmp_path, force={"b"})
    assert {s.stage.name: s.action for s in steps} == {"a": "cached", "b": "run", "c": "run", "d": "cached"}
    assert CALLS == ["b", "c"]
    after = {s: os.path.getmtime(os.path.join(store.path, s, _manifests(store)[s][0]["key"], MANIFEST)) for s in "abcd"}
    assert after["a"] == mtime["a"] and after["d"] == mtime["d"]
    assert after["b"] > mtime["b"] and after["c"] > mtime["c"]
    assert set(before) == set("abcd")


def test_config_change_reruns_downstream_not_upstream(tmp_path):
    _run(tmp_path)
    steps, _, store = _run(tmp_path, ["b.scale=2.0"])
    assert CALLS == ["b", "c"]
    m = _manifests(store)
    assert len(m["a"]) == 1 and len(m["b"]) == 2 and len(m["c"]) == 2 and len(m["d"]) == 1


def test_stage_selection_uses_cached_upstream(tmp_path):
    _run(tmp_path)
    steps, _, _ = _run(tmp_path, ["c.n=5"], only={"c"})
    assert CALLS == ["c"]
    assert {s.stage.name: s.action for s in steps} == {"a": "cached", "b": "cached", "c": "run", "d": "cached"}


def test_selection_with_missing_upstream_is_refused(tmp_path):
    cfg = C.load(None, [f"run.root={tmp_path}"], TOY_CFGS)
    with pytest.raises(runner.PlanError, match="needs 'b'"):
        runner.plan(TOY, cfg, Store(str(tmp_path)), only={"c"})


def test_from_selects_stage_and_descendants(tmp_path):
    _run(tmp_path)
    steps, _, _ = _run(tmp_path, start="b", force={"b"})
    assert CALLS == ["b", "c"]
    assert {s.stage.name for s in steps if s.action == "run"} == {"b", "c"}


def test_crash_then_rerun_resumes_from_partial_files(tmp_path):
    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path, ["a.n=5", "a.fail_after=3"])
    store = Store(str(tmp_path))
    # No manifest was written for the crashed stage: it is not done.
    assert not any(os.path.exists(os.path.join(store.path, "a", k, MANIFEST)) for k in os.listdir(store.path + "/a"))
    cfg = C.load(None, [f"run.root={tmp_path}", "a.n=5"], TOY_CFGS)
    steps = runner.plan(TOY, cfg, store)
    assert steps[0].action == "run" and steps[0].reason.startswith("no cached")  # new key: fail_after changed
    cfg = C.load(None, [f"run.root={tmp_path}", "a.n=5", "a.fail_after=3"], TOY_CFGS)
    steps = runner.plan(TOY, cfg, store)
    assert steps[0].reason == "resuming: 3 partial files"


@pytest.mark.parametrize("override, message", [
    (["a.nn=1"], "stages.a.nn: unknown key"),
    (["a.scal=2"], "stages.a.scal: unknown key (did you mean 'scale'"),
    (["a.n=big"], "stages.a.n: expected int, got 'big'"),
    (["a.n=true"], "stages.a.n: expected int"),
    (["zzz.n=1"], "stages.zzz: unknown stage"),
    (["run.rooot=x"], "run.rooot: unknown key"),
    (["nokey"], "overrides look like"),
])
def test_bad_config_names_the_key(tmp_path, override, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(")):
        C.load(None, [f"run.root={tmp_path}", *override], TOY_CFGS)


def test_bad_yaml_file_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="file not found"):
        C.load(str(tmp_path / "nope.yaml"), [], TOY_CFGS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: {a: {n: [1, 2]}}\n")
    with pytest.raises(C.ConfigError, match=r"stages\.a\.n: expected int"):
        C.load(str(bad), [], TOY_CFGS)


def test_path_field_must_exist(tmp_path):
    @dataclass(frozen=True)
    class P:
        weights: str = C.path_field()

    with pytest.raises(C.ConfigError, match=r"s\.weights: file not found: /no/such"):
        C.build(P, {"weights": "/no/such"}, "s")
    assert C.build(P, {"weights": str(tmp_path)}, "s").weights == str(tmp_path)
    assert C.build(P, {"weights": "s3://bucket/w.pt"}, "s").weights == "s3://bucket/w.pt"


def test_unwritable_root_fails_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((ValueError, OSError)):
        Store(str(blocker / "sub")).check_writable()


# Two branches from one root: r -> (x1 -> x2) and r -> y. Stage bodies meet at a barrier, so the
# test fails (BrokenBarrierError) unless x1 and y really run at the same time.
@dataclass(frozen=True)
class BranchCfg:
    fail: bool = False
    wait_s: float = 0.0


def _branch_stage(name, barrier, events):
    def run(inputs, cfg, out):
        events.append(("start", name))
        if barrier is not None:
            barrier.wait(timeout=20)
        time.sleep(cfg.wait_s)
        if cfg.fail:
            raise RuntimeError(f"{name} failed on purpose")
        out.write_bytes("part.txt", name.encode())
        events.append(("end", name))
        return {"rows": 1}
    return run


def _branches(barrier, events):
    return [Stage("r", _branch_stage("r", None, events), BranchCfg),
            Stage("x1", _branch_stage("x1", barrier, events), BranchCfg, inputs=("r",)),
            Stage("x2", _branch_stage("x2", None, events), BranchCfg, inputs=("x1",)),
            Stage("y", _branch_stage("y", barrier, events), BranchCfg, inputs=("r",))]


def _run_branches(tmp_path, overrides=()):
    events: list = []
    stages = _branches(threading.Barrier(2), events)
    cfg = C.load(None, [f"run.root={tmp_path}", "run.parallel_stages=2", *overrides],
                 {s.name: s.config for s in stages})
    store = Store(cfg.run.root)
    return stages, cfg, store, events


def test_independent_branches_run_at_the_same_time(tmp_path):
    stages, cfg, store, events = _run_branches(tmp_path)
    summary = runner.execute(runner.plan(stages, cfg, store), cfg, store, "r")
    # Both branch heads started before either ended (the barrier proves they overlapped), and
    # x2 started only after x1 ended; the summary keeps plan order.
    assert events.index(("start", "y")) < events.index(("end", "x1"))
    assert events.index(("end", "x1")) < events.index(("start", "x2"))
    assert [r["stage"] for r in summary["stages"]] == ["r", "x1", "x2", "y"]
    assert all(r["action"] == "run" and r["counts"] == {"rows": 1} for r in summary["stages"])
    again = runner.plan(stages, cfg, store)
    assert [s.action for s in again] == ["cached"] * 4


def test_a_failed_branch_stops_new_stages_and_the_running_one_keeps_its_manifest(tmp_path):
    # x1 fails at once; y (already running, slower) still finishes and writes its manifest;
    # x2 never starts; the error is the one x1 raised.
    stages, cfg, store, events = _run_branches(tmp_path, ["x1.fail=true", "y.wait_s=0.5"])
    with pytest.raises(RuntimeError, match="x1 failed on purpose"):
        runner.execute(runner.plan(stages, cfg, store), cfg, store, "r")
    assert ("end", "y") in events and ("start", "x2") not in events
    after = {s.stage.name: s.action for s in runner.plan(stages, cfg, store)}
    assert after["r"] == "cached" and after["y"] == "cached" and after["x1"] == "run"


def test_parallel_stages_must_be_positive(tmp_path):
    with pytest.raises(C.ConfigError, match="run.parallel_stages: must be >= 1"):
        C.load(None, [f"run.root={tmp_path}", "run.parallel_stages=0"], TOY_CFGS)
