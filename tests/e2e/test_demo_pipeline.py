"""The README's demo, end to end, through the real CLI: URLs → data → Würstchen + PaGoDA → evaluate → report.

One full run (module fixture) into a fresh root on the session's Ray head, then: counts add
up, every training loss fell, grids and the report exist with numbers, a second run is all
cached and quick, and ``--force`` of one stage reruns exactly it and its downstream.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from workflows.store import open_artifact
from workflows.train.export import read_history

pytestmark = pytest.mark.slow
TRAINING = ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c", "pagoda_teacher", "pagoda_distill",
            "pagoda_grow_32", "pagoda_grow_64")


def run_demo(root: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "workflows" / "full_pipeline.py"), "--config", "workflows/configs/demo.yaml",
           f"run.root={root}", f"urls.port={port}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3000, env=dict(os.environ))


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "root"
    port = free_port()
    t = time.time()
    r = run_demo(root, port)
    wall = time.time() - t
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    print(f"\n[demo] first run: {wall:.0f}s")
    return {"root": root, "port": port, "stdout": r.stdout, "wall": wall}


def manifests(root: Path) -> dict[str, dict]:
    out = {}
    for p in root.glob("*/*/manifest.json"):
        m = json.loads(p.read_text())
        out[m["stage"]] = m | {"_path": str(p.parent)}
    return out


def losses(art_dir: str) -> list[float]:
    recs = read_history(open_artifact(art_dir))
    key = "loss_rec" if any("loss_rec" in r for r in recs) else "loss"  # PaGoDA's G: the reconstruction term
    return [r[key] for r in recs if isinstance(r.get(key), (int, float))]


def test_demo_prints_where_outputs_are(demo):
    out = demo["stdout"]
    assert f"outputs: {demo['root']}" in out
    report = re.search(r"report: (\S+report\.html)", out).group(1)
    assert Path(report).exists()


def test_data_funnel_adds_up(demo):
    m = manifests(demo["root"])
    urls, dl, fl, rc, sh = (m[s]["counts"] for s in ("urls", "download", "filter", "recaption", "shard"))
    assert dl["rows_in"] == urls["rows"]
    assert dl["rows_in"] == dl["rows_out"] + sum(dl["failed_by_reason"].values())
    assert dl["failed_by_reason"]["http_error"] >= 1 and dl["failed_by_reason"]["decode_error"] >= 1
    assert fl["rows_in"] == dl["rows_out"]
    assert fl["rows_in"] == fl["rows_out"] + sum(fl["rejected_by_reason"].values())
    assert rc["rows_out"] == fl["rows_out"] == sh["rows_out"]


@pytest.mark.parametrize("stage", TRAINING)
def test_every_training_loss_decreased(demo, stage):
    curve = losses(manifests(demo["root"])[stage]["_path"])
    k = len(curve) // 3  # thirds: one noisy logging window cannot decide it
    first, last = sum(curve[:k]) / k, sum(curve[-k:]) / k
    assert len(curve) >= 10 and last < first, (stage, first, last)


def test_samples_and_metrics(demo):
    m = manifests(demo["root"])
    assert Path(m["wuerstchen_sample"]["_path"], "grid.png").exists()
    assert all(Path(m["pagoda_sample"]["_path"], f"grid_{r}.png").exists() for r in (16, 32, 64))
    swd = json.loads(Path(m["pagoda_sample"]["_path"], "swd.json").read_text())
    assert swd["trained"]["swd"] < swd["init"]["swd"], swd
    table = json.loads(Path(m["evaluate"]["_path"], "metrics.json").read_text())
    assert {"wuerstchen", "pagoda_16", "pagoda_32", "pagoda_64"} <= set(table)
    assert all(isinstance(v["swd"], float) and v["swd"] > 0 for v in table.values())


def test_report_has_every_section_with_numbers(demo):
    report = re.search(r"report: (\S+report\.html)", demo["stdout"]).group(1)
    md = Path(report.replace(".html", ".md")).read_text()
    for section in ("## Stages", "## Data funnel", "## Loss curves", "## Samples", "## Metrics"):
        assert section in md
    assert re.search(r"\| download \| \d+ \| \d+ \| .*http_error=1", md)
    for stage in TRAINING:
        assert re.search(rf"- {stage}: final loss[\w_]* [\d.e-]+", md), stage
    assert re.search(r"\| pagoda_64 \| .*\d", md) and re.search(r"\| wuerstchen \| .*\d", md)
    html = Path(report).read_text()
    assert html.count("data:image/png;base64,") >= 3  # loss curves + both sample grids


def test_second_run_is_all_cached_and_quick(demo):
    t = time.time()
    r = run_demo(demo["root"], demo["port"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran 0 stage(s)" in r.stdout
    assert time.time() - t < 60


def test_force_reruns_one_stage_and_downstream_only(demo):
    before = {s: os.path.getmtime(Path(m["_path"], "manifest.json")) for s, m in manifests(demo["root"]).items()}
    r = run_demo(demo["root"], demo["port"], "--force", "wuerstchen_sample")
    assert r.returncode == 0, r.stderr[-3000:]
    after = {s: os.path.getmtime(Path(m["_path"], "manifest.json")) for s, m in manifests(demo["root"]).items()}
    changed = {s for s in before if after[s] != before[s]}
    assert changed == {"wuerstchen_sample", "evaluate"}
