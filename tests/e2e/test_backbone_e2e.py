"""The runner for real: the demo CLI twice and an S3 root on a loopback moto server (`ray job submit`
against a two-node cluster: test_two_nodes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow
PIPELINE = [sys.executable, str(REPO / "workflows" / "full_pipeline.py")]


def cli(*args, env=None, timeout=600):
    return subprocess.run([*PIPELINE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_bad_config_fails_fast_with_the_key(tmp_path):
    t = time.time()
    r = cli("--config", "workflows/configs/demo.yaml", f"run.root={tmp_path}", "urls.n=lots")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: stages.urls.n: expected int, got 'lots'"]
    r = cli("--config", "workflows/configs/demo.yaml", f"run.root={tmp_path}", "urls.source=/no/such.parquet")
    assert r.returncode == 2 and "stages.urls.source" in r.stderr and "/no/such.parquet" in r.stderr
    r = cli("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "--config: file not found" in r.stderr
    assert time.time() - t < 60  # no stage work, no Ray start
    assert not list(Path(tmp_path).glob("urls/*/manifest.json"))


def test_dry_run_prints_plan_and_does_nothing(tmp_path):
    r = cli("--config", "workflows/configs/demo.yaml", f"run.root={tmp_path}", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "plan:" in r.stdout and "urls" in r.stdout and "run" in r.stdout
    assert not list(Path(tmp_path).glob("*/*/manifest.json"))


def test_runner_writes_to_s3_root(moto_s3, ray_cluster, tmp_path):  # the session's Ray: no local start per run
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="genmodels-test")
    root = "s3://genmodels-test/run1"
    # Every kind of writer on S3, without the whole DAG: the data stages, one training stage (Ray
    # Train storage of a one-worker group + DeepSpeed checkpoints; the demo's local mode writes its
    # checkpoints itself) and one Ray Data encode stage.
    args = ["--config", "workflows/configs/demo.yaml", f"run.root={root}", "urls.n=12", f"urls.port={free_port()}",
            "--stages", "urls,download,filter,recaption,shard,wuerstchen_stage_a,wuerstchen_encode_a",
            "wuerstchen_stage_a.train.total_steps=20", "wuerstchen_stage_a.train.num_workers=1"]
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_s3).list_objects_v2(
        Bucket="genmodels-test", Prefix="run1/")["Contents"]]
    manifest_key = next(k for k in keys if k.startswith("run1/urls/") and k.endswith("manifest.json"))
    body = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket="genmodels-test", Key=manifest_key)["Body"]
    manifest = json.loads(body.read())
    assert manifest["counts"]["rows"] > 12 and manifest["files"] > 12
    assert any(k.endswith("urls.parquet") for k in keys)
    assert any(k.startswith("run1/runs/") and k.endswith("summary.json") for k in keys)
    for stage in ("shard", "wuerstchen_stage_a", "wuerstchen_encode_a"):
        assert any(k.startswith(f"run1/{stage}/") and k.endswith("manifest.json") for k in keys), stage
    assert any(k.startswith("run1/wuerstchen_stage_a/") and k.endswith(".safetensors") for k in keys)
    r = cli(*args)
    assert r.returncode == 0 and "ran 0 stage(s)" in r.stdout
