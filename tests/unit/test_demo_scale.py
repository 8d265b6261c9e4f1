"""The demo site's scale mode: distinct files per row, the failure mix, and each failure as a
client sees it over 127.0.0.1 (through the download stage's own guarded fetch)."""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter

import pytest
from PIL import Image

from data_prep.demo.scale import FAILURE_MIX, ScaleSite, build, failure_kinds, serve_scale
from data_prep.fetch import FetchError, FetchLimits, check_header, fetch
from data_prep.images import BadImage, decode_rgb
from data_prep.url_policy import UrlPolicy

LOOPBACK = UrlPolicy(allow_networks=("127.0.0.1/32",))


def test_every_row_has_its_own_bytes_and_its_scene_labels():
    site = ScaleSite(n=300, pool=7, seed=1)
    files, behaviour, rows = build(site)
    assert len(rows) == 300 and len(files) == 300 and not behaviour
    assert len({hashlib.sha256(d).hexdigest() for d in files.values()}) == 300  # no exact duplicates
    assert rows[0]["caption"] == rows[7]["caption"] and rows[0]["labels"] == rows[7]["labels"]
    assert rows[0]["labels"] is not None and {r["expected"] for r in rows} == {"ok"}
    img = Image.open(io.BytesIO(files[rows[8]["path"]]))
    assert img.size == (rows[8]["width"], rows[8]["height"])
    again = build(site)[0]
    assert again == files  # deterministic in the seed


def test_failure_mix_shares():
    got = Counter(failure_kinds(20_000, seed=0))
    for kind, share in FAILURE_MIX:
        assert abs(got[kind] / 20_000 - share) < 0.005, (kind, got[kind])
    assert abs(got["ok"] / 20_000 - (1 - sum(s for _, s in FAILURE_MIX))) < 0.01


def test_each_failure_as_the_downloader_sees_it():
    site = ScaleSite(n=400, pool=4, failures=True, slow_s=1.5, latency_ms=20)
    files, behaviour, rows = build(site)
    first = {}
    for r in rows:
        first.setdefault(r["expected"], r["path"])
    limits = FetchLimits(timeout_s=0.5)
    with serve_scale(site, files, behaviour) as base:
        t = time.monotonic()
        ok = fetch(f"{base}/{first['ok']}", LOOPBACK, limits)
        assert time.monotonic() - t >= 0.02  # the added latency
        check_header(ok.body, 10**8)
        with pytest.raises(FetchError, match="HTTP Error 404"):
            fetch(f"{base}/{first['http_404']}", LOOPBACK, limits)
        with pytest.raises(FetchError, match="network_error"):
            fetch(f"{base}/{first['connection_reset']}", LOOPBACK, limits)
        with pytest.raises(FetchError, match="timed out"):
            fetch(f"{base}/{first['slow_host']}", LOOPBACK, limits)
        html = fetch(f"{base}/{first['not_image']}", LOOPBACK, limits).body
        with pytest.raises(FetchError, match="decode_error"):
            check_header(html, 10**8)
        cut = fetch(f"{base}/{first['truncated']}", LOOPBACK, limits).body
        check_header(cut, 10**8)  # a JPEG cut in half: its header is fine, its decode is not
        with pytest.raises(BadImage):
            decode_rgb(cut)
    assert set(behaviour.values()) == {"slow_host", "connection_reset"}


def test_cli_writes_the_scale_site_and_its_url_list(tmp_path):
    import pyarrow.parquet as pq

    from data_prep.demo import cli

    cli.main(["--out", str(tmp_path), "--scale", "30", "--failures", "--seed", "2"])
    t = pq.read_table(tmp_path / "urls.parquet")
    assert t.num_rows == 30 and t.column("sample_id").to_pylist() == [f"scale-{i:07d}" for i in range(30)]
    written = {p.name for p in (tmp_path / "site" / "images").iterdir()}
    missing = {f"{r['sample_id']}.jpg" for r in t.to_pylist() if r["expected"] == "http_404"}
    assert written == {f"scale-{i:07d}.jpg" for i in range(30)} - missing
