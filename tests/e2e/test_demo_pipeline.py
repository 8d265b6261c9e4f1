"""The README's demo through the real CLI, read from the session's one run (tests/e2e/conftest.py):
it says where its outputs are, the report has every section with numbers, a second run is all
cached and quick, and ``--force`` of one stage reruns exactly it and its downstream.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import demo_timeout, manifests, run_demo

pytestmark = [pytest.mark.slow, demo_timeout]
TRAINING = ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c", "pagoda_teacher", "pagoda_distill",
            "pagoda_grow_32", "pagoda_grow_64")


def test_demo_prints_where_outputs_are(demo):
    out = demo["stdout"]
    assert f"outputs: {demo['root']}" in out
    report = re.search(r"report: (\S+report\.html)", out).group(1)
    assert Path(report).exists()


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
    r = run_demo(demo["root"], demo["port"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran 0 stage(s)" in r.stdout
    assert time.time() - t < 60


def test_force_reruns_one_stage_and_downstream_only(demo):
    before = {s: os.path.getmtime(Path(m["_path"], "manifest.json")) for s, m in manifests(demo["root"]).items()}
    r = run_demo(demo["root"], demo["port"], "--force", "wuerstchen_sample", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = {s: os.path.getmtime(Path(m["_path"], "manifest.json")) for s, m in manifests(demo["root"]).items()}
    changed = {s for s in before if after[s] != before[s]}
    assert changed == {"wuerstchen_sample"}
