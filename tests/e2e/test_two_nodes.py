"""Two Ray nodes, one job: a head and a worker node on 127.0.0.1 (each its own raylet, temp dir
and ports, as two machines of a cluster would be) and one ``ray job submit --working-dir .`` of
the demo's data stages and Würstchen Stage A with one Ray Train worker per node (STRICT_SPREAD),
so DeepSpeed's gradient all-reduce runs over gloo between the two nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ray_head, ray_worker_node, submit_pipeline

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_one_job_spans_two_nodes_with_a_training_worker_on_each(tmp_path):
    root = tmp_path / "root"  # one machine: both nodes see the same local root
    with ray_head(num_cpus=2) as head, ray_worker_node(head["address"], num_cpus=2) as worker_tmp:
        r = submit_pipeline(head["dashboard"], root, "urls,download,filter,recaption,shard,wuerstchen_stage_a",
                            "wuerstchen_stage_a.train.num_workers=2",
                            "wuerstchen_stage_a.train.placement_strategy=STRICT_SPREAD",
                            "wuerstchen_stage_a.train.zero_stage=2", "wuerstchen_stage_a.train.total_steps=10",
                            "wuerstchen_stage_a.train.log_every=2", timeout=840)
        worker_logs = list(Path(worker_tmp).glob("session_*/logs/worker-*.out"))
    assert r.returncode == 0 and "succeeded" in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = root.glob("wuerstchen_stage_a/*/manifest.json")
    counts = json.loads(path.read_text())["counts"]
    # Two workers, each on its own node, trained in one DeepSpeed ZeRO-2 group.
    assert counts["world_size"] == 2 and counts["nodes"] == 2, counts
    assert counts["engine"] == "deepspeed" and counts["zero_stage"] == 2 and counts["steps"] == 10
    history = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 5 and all(h["loss"] == h["loss"] for h in history)  # logged, no NaN
    assert worker_logs, "no Ray worker process ran on the worker node"
    # One run summary, every requested stage ran, and the download funnel adds up.
    (summary,) = root.glob("runs/*/summary.json")
    stages = {s["stage"]: s for s in json.loads(summary.read_text())["stages"]}
    assert {n for n, s in stages.items() if s["action"] == "run"} == {
        "urls", "download", "filter", "recaption", "shard", "wuerstchen_stage_a"}
    dl = stages["download"]["counts"]
    assert dl["rows_out"] > 0 and dl["rows_in"] == dl["rows_out"] + dl["failed"]
    assert stages["shard"]["counts"]["rows_train"] > 0
