"""The runner's CLI for real: a bad config fails fast naming the key, and a dry run only plans (the
runner on an S3 root, through `ray job submit` against a two-node cluster: test_two_nodes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

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
