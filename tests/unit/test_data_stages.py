"""Data-prep stage logic without Ray: configs, planning, reasons, dedup, per-shard bookkeeping."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute below
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from data_prep import dedup, download, partitions, recaption, shard
from data_prep import filter as filt
from data_prep.splits import heldout_mask
from data_prep.stages import STAGES
from pipeline.config import ConfigError, build
from pipeline.stage import actor_resources, pool_resources
from pipeline.store import Store

# --------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("cls,data,message", [
    (download.DownloadConfig, {"rows_per_shard": 10, "rows_per_partition": 25},
     "stages.download.rows_per_partition: must be a multiple of rows_per_shard (10), got 25"),
    (download.DownloadConfig, {"resize_mode": "stretch"}, "stages.download.resize_mode: expected one of"),
    (filt.FilterConfig, {"near_dup_threshold": 1.5}, "stages.filter.near_dup_threshold: must be in [0, 1]"),
    (filt.FilterConfig, {"aesthetic_head": "/no/such/head.safetensors"},
     "stages.filter.aesthetic_head: file not found: /no/such/head.safetensors"),
    (filt.FilterConfig, {"batch_size": 0}, "stages.filter.batch_size: must be ≥ 1, got 0"),
    (recaption.RecaptionConfig, {"prompt": "Describe it."}, "stages.recaption.prompt: must contain '<image>'"),
    (shard.ShardConfig, {"resolutions": [64, 64]}, "stages.shard.resolutions: duplicates in [64, 64]"),
    (shard.ShardConfig, {"formats": ["zip"]}, "stages.shard.formats[0]: expected one of"),
    (shard.ShardConfig, {"heldout_fraction": 1.0}, "stages.shard.heldout_fraction: must be in [0, 1), got 1.0"),
    (filt.FilterConfig, {"cpus_per_actor": 0.0}, "stages.filter.cpus_per_actor: must be > 0 without GPUs"),
    (recaption.RecaptionConfig, {"gpus_per_actor": -1.0}, "stages.recaption.gpus_per_actor: must be >= 0"),
    (download.DownloadConfig, {"cpus_per_task": 0.0}, "stages.download.cpus_per_task: must be > 0"),
])
def test_bad_config_names_the_key(cls, data, message):
    section = next(s.name for s in STAGES if s.config is cls)
    with pytest.raises(ConfigError) as e:
        build(cls, data, f"stages.{section}")
    assert str(e.value).startswith(message), str(e.value)


def test_defaults_are_valid_and_laion_like():
    f = build(filt.FilterConfig, {}, "stages.filter")
    assert (f.min_clip_sim, f.min_aesthetic, f.max_pwatermark, f.max_punsafe, f.min_side) == (0.28, 5.0, 0.5, 0.99, 512)
    assert (f.max_aspect_ratio, f.max_uniform_fraction, f.use_laion_scores) == (3.0, 0.995, True)
    assert f.heads() == {"aesthetic": None, "pwatermark": None, "punsafe": None}
    build(download.DownloadConfig, {}, "stages.download")
    build(recaption.RecaptionConfig, {}, "stages.recaption")
    build(shard.ShardConfig, {"resolutions": [32, 64, 128]}, "stages.shard")


# --------------------------------------------------------------------------------------------- download


@pytest.mark.parametrize("status,error,reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_error"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "network_error"),
    ("failed_to_download", "timed out", "network_error"),
    ("failed_to_download", "unknown url type: 'not-a-url'", "bad_url"),
    ("failed_to_resize", "Image decoding error", "decode_error"),
    ("failed_to_resize", "OpenCV(4.14.0) ... !buf.empty() in function 'imdecode_'", "decode_error"),
    ("failed_to_resize", "image too small", "too_small"),
    ("failed_to_resize", "image area too large", "too_large"),
    ("failed_to_resize", "aspect ratio too large", "bad_aspect"),
    ("failed_to_download", "something new", "other"),
])
def test_failure_reasons(status, error, reason):
    assert download.failure_reason(status, error) == reason


def _urls_artifact(tmp_path, table, name="urls.parquet", row_group_size=None):
    art = Store(str(tmp_path)).artifact("urls", "k")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    art.write_bytes(name, buf.getvalue())
    return art


def test_partitions_and_slices_are_deterministic(tmp_path):
    n = 23
    table = pa.table({"url": [f"http://x/{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)]})
    art = _urls_artifact(tmp_path, table, row_group_size=4)
    cfg = build(download.DownloadConfig, {"rows_per_partition": 10, "rows_per_shard": 5}, "d")
    parts = download.plan_partitions(art, cfg)
    assert [(p.name, p.start, p.stop) for p in parts] == [("00000", 0, 10), ("00001", 10, 20), ("00002", 20, 23)]
    got = [download.read_slice(art, p.file, p.start, p.stop).column("url").to_pylist() for p in parts]
    assert [u for g in got for u in g] == table.column("url").to_pylist()


def test_missing_url_column_is_named(tmp_path):
    art = _urls_artifact(tmp_path, pa.table({"URL": ["http://x"], "caption": ["c"]}))
    message = r"download.url_col: urls.parquet has no column 'url' \(columns: URL, caption\)"
    with pytest.raises(ValueError, match=message):
        download.plan_partitions(art, download.DownloadConfig())


def test_url_table_renames_reserved_and_fills_nulls():
    t = pa.table({"url": ["http://a", None], "caption": [None, "x"], "width": [1, 2], "sample_id": ["a", "b"]})
    out = download._url_table(t, download.DownloadConfig())
    assert out.column_names == ["url", "caption", "src_width", "sample_id"]
    assert out.column("url").to_pylist() == ["http://a", ""] and out.column("caption").to_pylist() == ["", "x"]


# --------------------------------------------------------------------------------------------- filter


def _scores(n=6, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb[3] = emb[1] + 0.001  # near duplicate of row 1
    emb[4] = emb[2]  # exact duplicate of row 2 (same bytes below)
    sha = [f"h{i}" for i in range(n)]
    sha[4] = sha[2]
    return pa.table({
        "shard": ["00000_00000"] * n, "key": [f"00000_{i:06d}" for i in range(n)],
        "image_error": ["", "", "", "", "", "decode_error"],
        "orig_width": [600, 600, 100, 600, 100, 0], "orig_height": [600, 700, 900, 600, 900, 0],
        "width": [600, 600, 100, 600, 100, 0], "height": [600, 700, 900, 600, 900, 0],
        "caption_words": [3, 3, 3, 0, 3, 3], "caption_chars": [10] * n, "caption_latin": [1.0] * n,
        "clip_sim": [0.3, 0.4, 0.5, 0.4, 0.5, 0.0], "sha256": sha,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
        "aesthetic": pa.array([6.0, 4.0, 6.0, 6.0, 6.0, None], pa.float32()),
        "pwatermark": pa.nulls(n, pa.float32()), "punsafe": pa.nulls(n, pa.float32()),
    })


def test_decide_reasons_and_duplicates():
    cfg = build(filt.FilterConfig, {"min_side": 512, "min_aesthetic": 5.0, "near_dup_threshold": 0.95}, "f")
    out = filt.decide(_scores(), cfg=cfg)
    assert "embedding" not in out.column_names
    got = dict(zip(out.column("key").to_pylist(), out.column("reject").to_pylist()))
    assert got == {"00000_000000": "", "00000_000001": "aesthetic", "00000_000002": "too_small,bad_aspect",
                   "00000_000003": "caption_empty", "00000_000004": "too_small,bad_aspect",
                   "00000_000005": "decode_error"}
    # Duplicates are judged among rows that pass every threshold.
    cfg = build(filt.FilterConfig, {"min_side": 0, "max_aspect_ratio": 0, "min_aesthetic": 0.0,
                                    "near_dup_threshold": 0.95, "min_caption_words": 0}, "f")
    t = _scores()
    t = t.set_column(t.column_names.index("caption_words"), "caption_words", pa.array([3] * 6, pa.int32()))
    out = filt.decide(t, cfg=cfg)
    rows = {k: (r, d) for k, r, d in zip(out.column("key").to_pylist(), out.column("reject").to_pylist(),
                                         out.column("dup_of").to_pylist())}
    assert rows["00000_000004"] == ("dup_exact", "00000_000002")
    assert rows["00000_000003"] == ("dup_near", "00000_000001")
    assert out.column("keep").to_pylist() == [True, True, True, False, False, False]
    # Heads that are not configured (null) never reject.
    cfg = build(filt.FilterConfig, {"min_side": 0, "max_aspect_ratio": 0, "near_dup_threshold": 0.0,
                                    "dedup_exact": False}, "f")
    t = t.set_column(t.column_names.index("aesthetic"), "aesthetic", pa.nulls(6, pa.float32()))
    assert filt.decide(t, cfg=cfg).column("keep").to_pylist() == [True] * 5 + [False]


def test_near_duplicates_keep_the_first_of_each_group():
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.7, 0.7], [0, 1.0]], np.float32)
    assert dedup.near_duplicates(x, 0.99) == {1: 0, 4: 2}
    assert dedup.near_duplicates(x, 0.99, chunk=2) == {1: 0, 4: 2}  # chunking changes nothing
    assert dedup.near_duplicates(x, 1.01) == {}
    assert dedup.exact_duplicates(["a", "b", "a", "c", "b"]) == {2: 0, 4: 1}


def test_pending_shards_deletes_incomplete_output(tmp_path):
    art = Store(str(tmp_path)).artifact("filter", "k")
    for name, n in (("a", 3), ("b", 2)):
        art.write_parquet(f"rows/shard={name}/x.parquet", pa.table({"key": [f"{name}{i}" for i in range(n)]}))
    art.write_bytes("rows/shard=c/x.parquet", b"PAR1 cut short")  # a crash mid-write
    # A writer killed between its temp file and the rename (seen in CI: a killed filter driver
    # left one); the stage's listing hides it, a directory reader would read its rows twice.
    art.write_bytes("rows/shard=a/x.parquet.tmp-0123abcd", art.read_bytes("rows/shard=a/x.parquet"))
    assert pads.dataset(art.child("rows/shard=a"), format="parquet").count_rows() == 6
    assert partitions.written_rows(art, "rows") == {"a": 3, "b": 2, "c": -1}
    pending = partitions.pending_shards(art, "rows", {"a": 3, "b": 5, "c": 1, "d": 0})
    assert pending == ["b", "c"]
    assert partitions.written_rows(art, "rows") == {"a": 3}
    assert pads.dataset(art.child("rows/shard=a"), format="parquet").count_rows() == 3
    assert partitions.read_shard_rows(art, "rows", "a").column("key").to_pylist() == ["a0", "a1", "a2"]


def test_one_cluster_decides_like_decide_and_writes_complete_shards(tmp_path):
    """k = 1 skips the Ray shuffle: the rows it writes are decide()'s on all rows, split by shard,
    and the driver-side tally counts them as the stage's summary does."""
    art = Store(str(tmp_path)).artifact("filter", "one")
    t = _scores()
    t = t.set_column(0, "shard", pa.array(["00000_00000"] * 3 + ["00001_00000"] * 3))
    for shard_id in ("00000_00000", "00001_00000"):
        part = t.filter(pa.compute.equal(t.column("shard"), shard_id))
        partitions.write_shard_file(art, "scores", shard_id, part)
    cfg = build(filt.FilterConfig, {"min_side": 0, "max_aspect_ratio": 0, "min_aesthetic": 0.0,
                                    "near_dup_threshold": 0.95, "min_caption_words": 0}, "f")
    expected = {"00000_00000": 3, "00001_00000": 3}
    # a crash left half of shard 1's rows: pending_shards deletes them, the pass redoes only that shard
    partitions.write_shard_file(art, "rows", "00000_00000", filt.decide(t, cfg=cfg).slice(0, 3))
    partitions.write_shard_file(art, "rows", "00001_00000", filt.decide(t, cfg=cfg).slice(3, 1))
    pending = partitions.pending_shards(art, "rows", expected)
    assert pending == ["00001_00000"]
    filt.decide_one_cluster(art, expected, pending, cfg)
    assert partitions.pending_shards(art, "rows", expected) == []
    reference = filt.decide(t, cfg=cfg)
    got = pa.concat_tables([partitions.read_shard_rows(art, "rows", s) for s in sorted(expected)])
    assert got.column("key").to_pylist() == reference.column("key").to_pylist()
    assert got.column("reject").to_pylist() == reference.column("reject").to_pylist()
    assert "dup_exact" in got.column("reject").to_pylist()  # row 4 duplicates row 2 across the two shards
    tallies = partitions.tally_files(art, "rows", filt.TALLY_KEYS)
    per_shard, counts = filt.summarize(tallies, expected, cfg)
    assert per_shard == {"00000_00000": (3, 3), "00001_00000": (3, 0)}
    assert counts["rows_out"] == 3 and counts["rejected_by_reason"]["dup_exact"] == 1


def test_processor_size_reads_the_saved_config(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "processor_config.json").write_text('{"image_processor": {"crop_size": {"height": 48}}}')
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text('{"crop_size": 336}')
    assert recaption.processor_size(str(tmp_path / "new")) == 48
    assert recaption.processor_size(str(tmp_path / "old")) == 336


# --------------------------------------------------------------------------------------------- shard


def test_shard_plan_cuts_global_order_into_fixed_sizes():
    specs = shard.plan({"b": 3, "a": 4, "c": 0, "d": 2}, 3)
    assert specs == [[("a", 0, 3)], [("a", 3, 4), ("b", 0, 2)], [("b", 2, 3), ("d", 0, 2)]]
    assert shard.plan({}, 5) == []
    cfg = build(shard.ShardConfig, {"formats": ["parquet", "webdataset"]}, "s")
    assert shard.outputs(7, cfg) == ["wds/00007.tar", "parquet/00007.parquet"]  # parquet (the marker) last


def test_shard_split_is_decided_by_heldout_mask():
    ids = [f"demo-{i:06d}" for i in range(200)]
    labels = shard.split_labels(ids, 0.1)
    assert set(labels) == {shard.TRAIN, shard.HELDOUT}
    assert [x == shard.HELDOUT for x in labels] == heldout_mask(ids, 0.1).tolist()
    assert set(shard.split_labels(ids, 0.0)) == {shard.TRAIN}
    cfg = build(shard.ShardConfig, {"resolutions": [32]}, "s")
    assert cfg.heldout_fraction == 0.1 and shard.SPLIT_COLUMN in shard.schema(cfg).names


# --------------------------------------------------------------------------------------------- stage table


def test_data_stages_table_names_inputs_by_role_and_shares_the_pool_vocabulary():
    by_name = {s.name: s for s in STAGES}
    assert list(by_name) == ["urls", "download", "filter", "recaption", "shard"]
    assert by_name["shard"].inputs == {"download": "download", "filter": "filter", "recaption": "recaption"}
    assert by_name["recaption"].upstream == ["download", "filter"]
    assert by_name["urls"].service is not None and not by_name["urls"].uses_ray
    f = build(filt.FilterConfig, {"gpus_per_actor": 0.5, "actors": 2}, "f")
    assert by_name["filter"].resources(f) == pool_resources(f) == {"GPU": 1.0}
    assert actor_resources(f) == {"num_gpus": 0.5, "num_cpus": 0}
    r = build(recaption.RecaptionConfig, {}, "r")
    assert (r.batch_size, r.actors, r.cpus_per_actor, r.gpus_per_actor, r.cpus_per_task) == (8, 1, 0.5, 0.0, 1.0)
    assert by_name["recaption"].resources(r) == {"CPU": 0.5}
    assert by_name["download"].resources(build(download.DownloadConfig, {"cpus_per_task": 0.5}, "d")) == {"CPU": 0.5}
    assert by_name["shard"].resources(build(shard.ShardConfig, {}, "s")) == {"CPU": 1.0}


def test_tar_batches_group_members_by_sample_key_as_read_webdataset_does(tmp_path):
    import tarfile

    art = Store(str(tmp_path)).artifact("download", "k")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("000.jpg", b"j0"), ("000.json", b"{}"), ("000.txt", b"a"), ("001.jpg", b"j1"),
                           ("001.recaption.txt", b"r1"), ("d/002.jpg", b"j2"), ("noext", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    art.write_bytes("s.tar", buf.getvalue())
    path = art.child("s.tar")
    batches = list(partitions.tar_batches(art, path, 2))
    assert [len(b["__key__"]) for b in batches] == [2, 1]
    assert batches[0]["__key__"] == ["000", "001"] and batches[1]["__key__"] == ["d/002"]
    assert batches[0]["jpg"] == [b"j0", b"j1"] and batches[0]["json"] == [b"{}", None]
    assert batches[0]["recaption.txt"] == [None, b"r1"] and batches[1]["path"] == [path]


def test_cpu_passes_run_in_tasks_that_each_get_task_rows():
    cfg = filt.FilterConfig(task_rows=100, actors=4)
    assert [cfg.tasks_for(n) for n in (0, 99, 100, 250, 399, 400, 100_000)] == [1, 1, 1, 2, 3, 4, 4]
    assert filt.FilterConfig(task_rows=100, gpus_per_actor=1.0).tasks_for(10_000) == 0  # GPU: the actor pool
    assert filt.FilterConfig(task_rows=0).tasks_for(10_000) == 0
    with pytest.raises(ValueError, match="task_rows: must be >= 0"):
        build(filt.FilterConfig, {"task_rows": -1}, "filter")


def test_shards_are_balanced_by_rows_over_the_tasks():
    rows = {"00_0": 1000, "00_1": 1000, "00_2": 400, "01_0": 1000, "01_1": 600, "01_2": 0}
    groups = partitions.balance(rows, 2)
    assert sorted(s for g in groups for s in g) == sorted(rows)  # every shard once
    assert [sum(rows[s] for s in g) for g in groups] == [2000, 2000]
    assert all(g == sorted(g) for g in groups)
    assert partitions.balance({"a": 5}, 3) == [["a"]]  # no empty task


def test_in_tasks_returns_results_in_call_order_and_reports_each_finish():
    from pipeline.stage import in_tasks

    seen = []
    out = in_tasks(lambda a, b: a * b, [(2, 3), (4, 5), (6, 7)], num_cpus=1,
                   progress=lambda done, total: seen.append((done, total)))
    assert out == [6, 20, 42] and seen == [(1, 3), (2, 3), (3, 3)]
