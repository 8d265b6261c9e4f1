"""download → filter → recaption → shard for real: img2dataset over loopback HTTP, Ray Data,
tiny CLIP and tiny LLaVA, on the demo site with its broken rows. Includes crash/rerun checks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from data_prep import demo, download, partitions, recaption, shard
from data_prep import filter as filt
from data_prep.models import save_head
from data_prep.splits import heldout_mask
from pipeline.config import build
from pipeline.store import Store
from tests.conftest import REPO

pytestmark = pytest.mark.slow

N_GOOD = 16
DOWNLOAD = {"rows_per_partition": 12, "rows_per_shard": 6, "image_size": 256, "min_image_size": 16, "threads": 4,
            "cpus_per_task": 0.5, "timeout_s": 5, "allow_networks": ["127.0.0.1/32"]}  # the site is on loopback
# Tiny random CLIP: similarities are meaningless, so the threshold keeps everything and near-dup
# detection only catches (almost) identical embeddings. That is configuration, not faking.
# task_rows 0: the Ray Data actor pools that GPU runs use (on CPU the passes would otherwise run in
# plain Ray tasks, which test_task_passes_write_what_the_actor_pools_write compares with them).
FILTER = {"clip_model": "tiny-clip", "clip_pretrained": None, "min_clip_sim": -1.0, "min_side": 32, "batch_size": 8,
          "near_dup_threshold": 0.9995, "min_aesthetic": 0.0, "task_rows": 0}
RECAPTION = {"model": "tiny", "max_new_tokens": 6, "batch_size": 8, "task_rows": 0}
TIMING = ("rows_per_s", "shards_resumed", "phase_s")  # how long, not what
SHARD = {"resolutions": [32, 64], "rows_per_shard": 5}
EXPECTED_REASON = {"http_404": "http_error", "corrupt_bytes": "decode_error", "truncated_jpeg": "decode_error",
                   "empty_file": "decode_error", "too_small": "too_small"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataprep")
    store = Store(str(root / "store"))
    urls = store.artifact("urls", "test")
    fs = pafs.LocalFileSystem()
    items = list(demo.generate(N_GOOD, seed=3)) + demo.broken_items()
    rows = demo.write_site(fs, urls.child("site"), items)
    with demo.serve(fs, urls.child("site")) as base:
        demo.write_url_parquet(rows, base, fs, urls.child("urls.parquet"))
        os.environ["GENMODELS_CACHE"] = str(root / "cache")  # tiny LLaVA built here, once
        yield {"root": root, "store": store, "urls": urls, "n": len(items)}


@pytest.fixture(scope="module")
def heads(site):
    g = torch.Generator().manual_seed(1)
    layers = [(torch.randn(8, 64, generator=g), torch.zeros(8)),
              (torch.randn(1, 8, generator=g), torch.full((1,), 5.0))]
    return save_head(str(site["root"] / "aesthetic.safetensors"), layers)


def _run(mod, cfg_cls, data, inputs, out):
    cfg = build(cfg_cls, data, f"stages.{mod.__name__.rsplit('.', 1)[1]}")
    t = time.time()
    counts = mod.run(inputs, cfg, out)
    return counts, time.time() - t


@pytest.fixture(scope="module")
def downloaded(ray_cluster, site):
    out = site["store"].artifact("download", "a")
    counts, _ = _run(download, download.DownloadConfig, DOWNLOAD, {"urls": site["urls"]}, out)
    return out, counts


@pytest.fixture(scope="module")
def filtered(downloaded, site, heads):
    out = site["store"].artifact("filter", "a")
    counts, _ = _run(filt, filt.FilterConfig, {**FILTER, "aesthetic_head": heads}, {"download": downloaded[0]}, out)
    return out, counts


@pytest.fixture(scope="module")
def recaptioned(downloaded, filtered, site):
    out = site["store"].artifact("recaption", "a")
    counts, _ = _run(recaption, recaption.RecaptionConfig, RECAPTION,
                     {"download": downloaded[0], "filter": filtered[0]}, out)
    return out, counts


@pytest.fixture(scope="module")
def sharded(downloaded, filtered, recaptioned, site):
    out = site["store"].artifact("shard", "a")
    counts, _ = _run(shard, shard.ShardConfig, SHARD,
                     {"download": downloaded[0], "filter": filtered[0], "recaption": recaptioned[0]}, out)
    return out, counts


def _status_rows(art):
    t = pads.dataset(art.child("parts"), format="parquet", exclude_invalid_files=True).to_table(
        columns=["sample_id", "expected", "status", "error_message"])
    return sorted(zip(*(t.column(c).to_pylist() for c in ("sample_id", "expected", "status"))))


def _rows(art, subdir="rows", columns=("key", "reject", "keep")):
    t = pads.dataset(art.child(subdir), format="parquet", partitioning="hive").to_table()
    return sorted(zip(*(t.column(c).to_pylist() for c in columns)))


# --------------------------------------------------------------------------------------------- download


def test_download_accounts_for_every_row_by_reason(downloaded, site):
    art, counts = downloaded
    n_bad = len(EXPECTED_REASON)
    assert counts["rows_in"] == site["n"] and counts["rows_out"] == site["n"] - n_bad
    assert counts["failed_by_reason"] == {"decode_error": 3, "http_error": 1, "too_small": 1}
    assert counts["partitions"] == 2 and counts["shards"] == 4
    rows = _status_rows(art)
    assert len(rows) == site["n"]  # nothing silently dropped: one status row per input row
    for sample_id, expected, status in rows:
        assert (status == "success") == (expected not in EXPECTED_REASON), (sample_id, expected, status)
    index = download.read_index(art)
    assert sum(r["ok"] for r in index) == counts["rows_out"] and all(art.exists(r["tar"]) for r in index)
    # Through Ray too, every partition reports its img2dataset workers' peak RSS.
    commits = [art.read_json(f"parts/{p:05d}/{download.COMMIT}") for p in range(counts["partitions"])]
    assert all(c["peak_rss_mb"] >= c["base_rss_mb"] > 0 for c in commits)
    assert counts["peak_rss_mb"] == max(c["peak_rss_mb"] for c in commits)


def test_download_rerun_after_crash_completes_only_missing(downloaded, site):
    art, counts = downloaded
    crashed = site["store"].artifact("download", "crashed")
    shutil.copytree(art.path, crashed.path)
    # Partition 1 died mid-way: no commit, its second shard unfinished (no stats, half a tar).
    os.remove(crashed.child(f"parts/00001/{download.COMMIT}"))
    os.remove(crashed.child("parts/00001/00001_stats.json"))
    with open(crashed.child("parts/00001/00001.tar"), "r+b") as f:
        f.truncate(1000)
    os.remove(crashed.child(download.INDEX))
    again, _ = _run(download, download.DownloadConfig, DOWNLOAD, {"urls": site["urls"]}, crashed)
    assert again["partitions_resumed"] == 1
    assert {k: again[k] for k in ("rows_in", "rows_out", "failed_by_reason", "shards")} == \
        {k: counts[k] for k in ("rows_in", "rows_out", "failed_by_reason", "shards")}
    assert _status_rows(crashed) == _status_rows(art)


# --------------------------------------------------------------------------------------------- filter


def test_filter_keeps_every_score_and_counts_rejections(filtered, downloaded):
    art, counts = filtered
    assert counts["rows_in"] == downloaded[1]["rows_out"]
    assert counts["skipped"] == ["pwatermark", "punsafe"]
    # The demo's caption cases: "" and a 10,000-character caption.
    assert counts["rejected_by_reason"]["caption_empty"] == 1 and counts["rejected_by_reason"]["caption_long"] == 1
    assert counts["rows_out"] + counts["rejected"] == counts["rows_in"]
    t = pads.dataset(art.child("rows"), format="parquet", partitioning="hive").to_table()
    assert t.num_rows == counts["rows_in"] and len(set(t.column("key").to_pylist())) == t.num_rows
    for col in ("clip_sim", "aesthetic", "pwatermark", "punsafe", "orig_width", "orig_height", "sha256",
                "caption_latin", "dup_of", "reject", "keep", "sample_id", "shard"):
        assert col in t.column_names, col
    assert t.column("aesthetic").null_count == 0 and t.column("punsafe").null_count == t.num_rows
    captions = dict(zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist()))
    control = captions["broken-control_chars_caption"]
    assert "\x00" not in control and "\x1b" not in control
    shards = partitions.read_shards(art)
    assert sum(v["kept"] for v in shards.values()) == counts["rows_out"]


@pytest.mark.parametrize("mode", [{}, {"task_rows": 1, "actors": 2}], ids=["actor_pool", "two_tasks"])
def test_filter_killed_midway_then_rerun_gives_the_same_rows(filtered, downloaded, site, heads, ray_cluster, mode):
    """Kill a filter run (a separate driver) once its first output file lands; rerun here. Both
    ways a pass runs: Ray Data's actor pool and plain Ray tasks (CPU's default)."""
    name = f"killed-{'tasks' if mode else 'pool'}"
    cfg_file = site["root"] / f"{name}.json"
    cfg_file.write_text(json.dumps({**FILTER, **mode, "aesthetic_head": heads}))
    script = f"""
import json, os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
from data_prep import filter as filt
from pipeline.config import build
from pipeline.store import Store
store = Store({site["store"].uri!r})
cfg = build(filt.FilterConfig, json.load(open({str(cfg_file)!r})), "filter")
filt.run({{"download": store.artifact("download", "a")}}, cfg, store.artifact("filter", {name!r}))
"""
    art = site["store"].artifact("filter", name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while not art.list(".parquet", subdir="scores"):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "filter never wrote a file"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not art.exists(partitions.SHARDS)  # it really was interrupted
    time.sleep(3)  # the dead driver's Ray workers are being torn down
    counts, _ = _run(filt, filt.FilterConfig, {**FILTER, **mode, "aesthetic_head": heads}, {"download": downloaded[0]},
                     art)
    reference = filtered[0]
    assert _rows(art) == _rows(reference)  # same rows, same decisions, no duplicates, no losses
    assert {k: v for k, v in counts.items() if k not in TIMING} == \
        {k: v for k, v in filtered[1].items() if k not in TIMING}


# --------------------------------------------------------------------------------------------- recaption


def test_recaption_keeps_the_original_caption_beside_the_new_one(recaptioned, filtered):
    art, counts = recaptioned
    assert counts["rows_in"] == counts["rows_out"] == filtered[1]["rows_out"] and counts["errors"] == 0
    rec = pads.dataset(art.child("rows"), format="parquet", partitioning="hive").to_table()
    kept = pads.dataset(filtered[0].child("rows"), format="parquet", partitioning="hive").to_table()
    kept = {k: c for k, c, keep in zip(*(kept.column(n).to_pylist() for n in ("key", "caption", "keep"))) if keep}
    got = dict(zip(rec.column("key").to_pylist(),
                   zip(rec.column("caption").to_pylist(), rec.column("recaption").to_pylist())))
    assert set(got) == set(kept)
    assert all(got[k][0] == kept[k] and isinstance(got[k][1], str) for k in kept)


def test_task_passes_write_what_the_actor_pools_write(downloaded, filtered, recaptioned, site, heads):
    """On CPU the score and caption passes run in plain Ray tasks (here two, each over its share of
    the shards): the same rows, decisions, scores and captions as the Ray Data actor pools, one
    file a shard."""
    one = {"task_rows": 1, "actors": 2}
    f_art = site["store"].artifact("filter", "one-task")
    f_counts, _ = _run(filt, filt.FilterConfig, {**FILTER, **one, "aesthetic_head": heads},
                       {"download": downloaded[0]}, f_art)
    assert "score pass (decode, CLIP) in 2 tasks" in f_counts["phase_s"]
    assert {k: v for k, v in f_counts.items() if k not in TIMING} == \
        {k: v for k, v in filtered[1].items() if k not in TIMING}
    assert _rows(f_art) == _rows(filtered[0])
    mine, pool = (_rows(a, "scores", ("key", "clip_sim", "aesthetic")) for a in (f_art, filtered[0]))
    assert [r[0] for r in mine] == [r[0] for r in pool]
    assert torch.allclose(torch.tensor([r[1:] for r in mine]), torch.tensor([r[1:] for r in pool]), atol=1e-5)
    files = f_art.list(".parquet", subdir="scores")
    assert len(files) == len({os.path.dirname(f) for f in files}) == len(partitions.read_shards(f_art))

    r_art = site["store"].artifact("recaption", "one-task")
    r_counts, _ = _run(recaption, recaption.RecaptionConfig, {**RECAPTION, **one},
                       {"download": downloaded[0], "filter": f_art}, r_art)
    assert "caption pass (decode, LLaVA) in 2 tasks" in r_counts["phase_s"]
    assert r_counts["rows_out"] == recaptioned[1]["rows_out"] > 0
    cols = ("key", "caption", "recaption", "recaption_error")
    assert _rows(r_art, columns=cols) == _rows(recaptioned[0], columns=cols)


# --------------------------------------------------------------------------------------------- shard


def test_shards_are_training_ready(sharded, filtered, recaptioned):
    art, counts = sharded
    kept = counts["rows_in"]
    assert counts["rows_out"] == kept == filtered[1]["rows_out"] and counts["decode_errors"] == 0
    assert counts["shards"] == -(-kept // SHARD["rows_per_shard"])
    t = shard.read_parquet_shards(art)
    assert t.schema.equals(shard.schema(build(shard.ShardConfig, SHARD, "s")))
    ids = t.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == kept
    # The split is decided here, once, by sample id: both sides present, exactly heldout_mask's choice.
    split = dict(zip(ids, t.column(shard.SPLIT_COLUMN).to_pylist()))
    assert set(split.values()) == {shard.TRAIN, shard.HELDOUT}
    assert [split[i] == shard.HELDOUT for i in ids] == heldout_mask(ids, 0.1).tolist()
    assert (counts["rows_train"], counts["rows_heldout"]) == (list(split.values()).count(shard.TRAIN),
                                                              list(split.values()).count(shard.HELDOUT))
    for r in (32, 64):
        for data in t.column(f"jpg_{r}").to_pylist()[:3]:
            assert Image.open(io.BytesIO(data)).size == (r, r)
    assert set(t.column("recaption").to_pylist()) != {""}
    import webdataset as wds

    keys = []
    for name in art.list(".tar", subdir="wds"):
        for sample in wds.WebDataset(art.child(name), shardshuffle=False, empty_check=False):
            keys.append(sample["__key__"])
            assert {"32.jpg", "64.jpg", "txt", "recaption.txt", "json"} <= set(sample)
            meta = json.loads(sample["json"])
            assert meta["sample_id"] in ids and meta[shard.SPLIT_COLUMN] == split[meta["sample_id"]]
    assert sorted(keys) == sorted(t.column("key").to_pylist())


def test_shard_rerun_builds_only_missing_shards(sharded, downloaded, filtered, recaptioned, site):
    art, counts = sharded
    again = site["store"].artifact("shard", "crashed")
    shutil.copytree(art.path, again.path)
    os.remove(again.child("parquet/00001.parquet"))  # died after its tar, before its parquet
    os.remove(again.child("wds/00002.tar"))
    os.remove(again.child("parquet/00002.parquet"))
    c, _ = _run(shard, shard.ShardConfig, SHARD,
                {"download": downloaded[0], "filter": filtered[0], "recaption": recaptioned[0]}, again)
    assert c["shards_written"] == 2 and c["shards_resumed"] == counts["shards"] - 2
    assert {k: c[k] for k in ("rows_out", "rows_train", "rows_heldout")} == \
        {k: counts[k] for k in ("rows_out", "rows_train", "rows_heldout")}
    assert shard.read_parquet_shards(again).equals(shard.read_parquet_shards(art))
    for name in art.list(".tar", subdir="wds"):
        assert again.read_bytes(name) == art.read_bytes(name)


def test_missing_columns_fail_with_the_column_name(ray_cluster, site, tmp_path):
    import pyarrow as pa

    store = Store(str(tmp_path))
    urls = store.artifact("urls", "bad")
    urls.write_parquet("urls.parquet", pa.table({"URL": ["http://127.0.0.1:1/x.jpg"], "TEXT": ["a"]}))
    with pytest.raises(ValueError, match="download.url_col: urls.parquet has no column 'url'"):
        _run(download, download.DownloadConfig, DOWNLOAD, {"urls": urls}, store.artifact("download", "bad"))


def test_download_partition_to_s3_uploads_then_commits(site, moto_s3):
    """S3 root (loopback moto server): img2dataset writes locally, files are uploaded, commit last."""
    import tarfile

    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="dataprep-test")
    out = Store("s3://dataprep-test/run").artifact("download", "s3")
    cfg = build(download.DownloadConfig, DOWNLOAD, "stages.download")
    part = download.plan_partitions(site["urls"], cfg)[-1]  # the last 12 rows: all good images
    rec = download.download_partition(part, cfg, site["urls"], out)
    assert rec["rows"] == part.stop - part.start == rec["ok"] and not rec["failed_by_reason"]
    assert out.list(subdir="parts/00001") == ["parts/00001/00000.parquet", "parts/00001/00000.tar",
                                             "parts/00001/00000_stats.json", "parts/00001/00001.parquet",
                                             "parts/00001/00001.tar", "parts/00001/00001_stats.json",
                                             f"parts/00001/{download.COMMIT}"]
    with tarfile.open(fileobj=io.BytesIO(out.read_bytes("parts/00001/00000.tar"))) as t:
        assert sum(1 for m in t.getmembers() if m.name.endswith(".jpg")) == 6
