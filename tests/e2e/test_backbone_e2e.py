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
from workflows import full_pipeline as fp

pytestmark = pytest.mark.slow
PIPELINE = [sys.executable, str(REPO / "workflows" / "full_pipeline.py")]
DEMO_YAML = REPO / "workflows" / "configs" / "demo.yaml"


def cli(*args, env=None, timeout=600):
    return subprocess.run([*PIPELINE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_bad_config_fails_fast_with_the_key(tmp_path, capsys):
    t = time.time()
    r = cli("--config", "workflows/configs/demo.yaml", f"run.root={tmp_path}", "urls.n=lots")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: stages.urls.n: expected int, got 'lots'"]
    assert time.time() - t < 60  # no stage work, no Ray start
    # The same exit path in-process (a CLI process costs ~7 CPU-s of imports on 2 cores).
    assert fp.main(["--config", str(DEMO_YAML), f"run.root={tmp_path}", "urls.source=/no/such.parquet"]) == 2
    err = capsys.readouterr().err
    assert "stages.urls.source" in err and "/no/such.parquet" in err
    assert fp.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: file not found" in capsys.readouterr().err
    assert not list(Path(tmp_path).glob("urls/*/manifest.json"))


def test_dry_run_prints_plan_and_does_nothing(tmp_path, capsys):
    assert fp.main(["--config", str(DEMO_YAML), f"run.root={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "urls" in out and "run" in out
    assert not list(Path(tmp_path).glob("*/*/manifest.json"))
