"""Stage ``download``: URL parquet → WebDataset tars with img2dataset, one Ray task per partition.

Input: the ``urls`` artifact (``*.parquet`` with ``url``, ``caption`` and usually ``sample_id``;
every other column is carried along into each sample's json). The rows are cut into
partitions of ``rows_per_partition`` consecutive rows (per file, in sorted file order, so the
cut is deterministic). Each partition is one Ray task that runs one real
``img2dataset.download`` call (its own downloader, resizer and per-shard status parquet) and
then commits the partition by writing ``parts/<p>/_partition.json`` last. By default
(``processes_per_task: 0``) img2dataset runs inside the Ray task's process rather than in
spawned children: a Ray worker keeps img2dataset imported between partitions, while each
spawn paid an interpreter start and a torch import (seconds per partition, as long as
fetching a 200-row partition from 127.0.0.1).

Output layout (``p`` = 5-digit partition, ``s`` = 5-digit img2dataset shard)::

    parts/<p>/<s>.tar          WebDataset: <key>.jpg, <key>.txt (caption), <key>.json (metadata)
    parts/<p>/<s>.parquet      one row per input row, success or not: status, error_message,
                               width/height (stored), original_width/height, sha256, all columns
    parts/<p>/<s>_stats.json   img2dataset's per-shard stats (its resume marker)
    parts/<p>/_partition.json  commit: rows, ok, failed_by_reason, shards
    index.parquet              one row per shard: shard, tar, parquet, partition, rows, ok

``shard`` ids are ``<p>_<s>``; downstream stages work per shard and name their outputs by it.
The img2dataset ``key`` is unique within a partition only, so the stage-wide sample key is
``<p>_<key>`` (column ``key`` downstream); ``sample_id`` is the URL list's id, kept as is.

Resume: a committed partition is never redone. On a local root img2dataset writes straight
into ``parts/<p>`` and, when the task reruns after a crash, skips every shard whose
``_stats.json`` exists. On S3 img2dataset writes to a local temp dir and the files are uploaded
per partition before the commit, so an interrupted partition is redone whole.

Failures are never dropped: every input row is in a shard parquet with its status, and the
counts hold ``failed_by_reason`` (``http_error``, ``network_error``, ``decode_error``,
``too_small``, ``too_large``, ``bad_aspect``, ``bad_url``, ``opted_out``, ``other``) with
``rows_in == ok + sum(failed_by_reason)`` checked before the stage returns.

Safety (the URL list is untrusted): img2dataset's own urllib fetch is replaced, inside its
worker processes, by :mod:`data_prep.fetch` under the policy of :mod:`data_prep.url_policy`.
Only ``allowed_schemes`` are fetched; private, loopback, link-local, multicast, reserved and
cloud-metadata addresses are refused (at every redirect hop, for every address a name resolves
to) unless inside ``allow_networks``; bodies over ``max_bytes`` and images whose header
announces more than ``max_image_area`` pixels are refused before cv2 decodes anything. Refused
rows are status rows like any other failure (``bad_url: ...``, ``too_large: ...``) and are never
fetched. Each process that ran a shard (the Ray worker itself by default, its peak reset
before each shard) reports its peak RSS: ``peak_rss_mb`` (and ``base_rss_mb`` before the
shard, mostly imports) in the partition commit, and the largest ``peak_rss_mb`` in the counts.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep.fetch import FetchLimits, img2dataset_guard, worker_memory
from data_prep.url_policy import UrlPolicy
from pipeline.store import Artifact, is_local

log = logging.getLogger("genmodels")

COMMIT = "_partition.json"
INDEX = "index.parquet"
# Names img2dataset uses for its own metadata; URL-list columns with these names are renamed
# to ``src_<name>`` so they cannot collide (LAION parquet has its own width/height).
RESERVED = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
            "exif", "sha256", "md5", "url", "caption"}


@dataclass(frozen=True)
class DownloadConfig:
    """Settings of the download stage (``stages.download`` in the pipeline YAML).

    url_col / caption_col: column names in the URL parquet (LAION: ``url``/``URL``, ``caption``/``TEXT``).
    rows_per_partition: rows per Ray task (one ``img2dataset.download`` call each); a multiple of
        ``rows_per_shard``. The unit of retry and of resume on S3.
    rows_per_shard: img2dataset ``number_sample_per_shard``: samples per tar (10,000 for LAION).
    resize_mode: img2dataset resize mode. ``keep_ratio_largest`` + ``resize_only_if_bigger`` keeps
        originals up to ``image_size`` on their longest side; ``no`` stores bytes as decoded+re-encoded.
    image_size: the target side for ``resize_mode`` (longest side for ``keep_ratio_largest``).
    resize_only_if_bigger: never upscale (keep the original resolution when it is smaller).
    min_image_size: rows whose shorter side is smaller fail with reason ``too_small`` (0: off).
    max_image_area: decompression-bomb guard: a header announcing more width*height pixels fails
        ``too_large`` before any decode (and cv2 is capped to it as well).
    max_aspect_ratio: long/short side above this fails ``bad_aspect`` (0: off).
    encode_format / encode_quality: how stored images are encoded.
    threads: img2dataset download threads per process (it is I/O bound; DNS is the real limit).
    processes_per_task: img2dataset processes inside one Ray task. 0 (default): none, the shards
        run in the Ray task's own process (no interpreter spawn nor torch import per partition;
        scale out with more partitions instead); n ≥ 1: img2dataset's own spawned pool of n.
    timeout_s / retries: per-URL HTTP timeout and retries.
    cpus_per_task: Ray CPUs reserved per partition task (fractional is fine; downloads mostly wait).
    task_retries: Ray retries of a failed partition task (crashes, preempted nodes).
    allowed_schemes: URL schemes that are fetched (a subset of http, https); others fail ``bad_url``.
    allow_networks: CIDRs whose addresses are fetched although private/loopback/link-local
        (default none: on a cluster only public addresses). The demo sets ``["127.0.0.1/32"]``.
    max_bytes: responses longer than this fail ``too_large`` (the stream is cut there).
    max_redirects: redirect hops followed, each checked against the same policy.
    """

    url_col: str = "url"
    caption_col: str = "caption"
    rows_per_partition: int = 100_000
    rows_per_shard: int = 10_000
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio_largest"
    image_size: int = 1024
    resize_only_if_bigger: bool = True
    min_image_size: int = 0
    max_image_area: int = 89_478_485
    max_aspect_ratio: float = 0.0
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    threads: int = 64
    processes_per_task: int = 0
    timeout_s: int = 10
    retries: int = 0
    cpus_per_task: float = 1.0
    task_retries: int = 2
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allow_networks: tuple[str, ...] = ()
    max_bytes: int = 16 << 20
    max_redirects: int = 5

    def policy(self) -> UrlPolicy:
        return UrlPolicy(schemes=tuple(self.allowed_schemes), allow_networks=tuple(self.allow_networks))

    def limits(self) -> FetchLimits:
        return FetchLimits(timeout_s=self.timeout_s, max_bytes=self.max_bytes, max_pixels=self.max_image_area,
                           max_redirects=self.max_redirects)

    def validate(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard: must be ≥ 1, got {self.rows_per_shard}")
        if self.rows_per_partition < self.rows_per_shard or self.rows_per_partition % self.rows_per_shard:
            raise ValueError(f"rows_per_partition: must be a multiple of rows_per_shard ({self.rows_per_shard}), "
                             f"got {self.rows_per_partition}")
        if self.image_size < 1:
            raise ValueError(f"image_size: must be ≥ 1, got {self.image_size}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task: must be > 0, got {self.cpus_per_task}")
        if self.processes_per_task < 0:
            raise ValueError(f"processes_per_task: must be ≥ 0 (0: in the Ray task), got {self.processes_per_task}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality: must be in 1..100, got {self.encode_quality}")
        if self.max_bytes < 1 or self.max_image_area < 1:
            raise ValueError(f"max_bytes / max_image_area: must be ≥ 1, got {self.max_bytes} / {self.max_image_area}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects: must be ≥ 0, got {self.max_redirects}")
        if not self.allowed_schemes:
            raise ValueError("allowed_schemes: must name at least one scheme")
        self.policy().validate()


@dataclass(frozen=True)
class Partition:
    index: int
    file: str  # name inside the urls artifact
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


# ---------------------------------------------------------------------------------------------
# Reasons
# ---------------------------------------------------------------------------------------------


REASONS = ("http_error", "network_error", "decode_error", "too_small", "too_large", "bad_aspect", "bad_url",
           "opted_out", "hash_mismatch", "other")


def failure_reason(status: str, error: str | None) -> str:
    """Map an img2dataset status + error_message to one counted reason.

    The guarded fetcher (:mod:`data_prep.fetch`) writes ``"<reason>: <detail>"``; the rest are
    img2dataset's and cv2's own messages."""
    e = (error or "").lower()
    prefix = e.split(":", 1)[0]
    if prefix in REASONS:
        return prefix
    if "validateinputimagesize" in e:  # cv2's own pixel cap (OPENCV_IO_MAX_IMAGE_PIXELS)
        return "too_large"
    if "http error" in e:
        return "http_error"
    if "image too small" in e:
        return "too_small"
    if "image area too large" in e or "decompression" in e:
        return "too_large"
    if "aspect ratio too large" in e:
        return "bad_aspect"
    if "x-robots-tag" in e or "disallowed" in e:
        return "opted_out"
    if "unknown url type" in e or "no host given" in e or "invalid url" in e or "url can't contain" in e:
        return "bad_url"
    if any(s in e for s in ("timed out", "urlopen error", "connection", "remote end closed", "reset by peer",
                             "name or service", "incompleteread", "ssl")):
        return "network_error"
    if "hash mismatch" in e:
        return "hash_mismatch"
    if status == "failed_to_resize":  # cv2 could not decode what was downloaded
        return "decode_error"
    return "other"


# ---------------------------------------------------------------------------------------------
# Planning (driver side: metadata only)
# ---------------------------------------------------------------------------------------------


def url_files(urls: Artifact) -> list[str]:
    files = [f for f in urls.list(".parquet") if f != INDEX]
    if not files:
        raise ValueError(f"download: no *.parquet URL list in {urls.uri}")
    return files


def plan_partitions(urls: Artifact, cfg: DownloadConfig) -> list[Partition]:
    """Cut every URL file into ``rows_per_partition`` slices; checks the required columns."""
    parts: list[Partition] = []
    for name in url_files(urls):
        with urls.fs.open_input_file(urls.child(name)) as f:
            pf = pq.ParquetFile(f)
            columns = pf.schema_arrow.names
            n = pf.metadata.num_rows
        for col, key in ((cfg.url_col, "url_col"), (cfg.caption_col, "caption_col")):
            if col not in columns:
                raise ValueError(f"download.{key}: {name} has no column {col!r} (columns: {', '.join(columns)})")
        for start in range(0, n, cfg.rows_per_partition):
            parts.append(Partition(len(parts), name, start, min(n, start + cfg.rows_per_partition)))
    return parts


def read_slice(art: Artifact, name: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that overlap."""
    with art.fs.open_input_file(art.child(name)) as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    return table.slice(start - (first or 0), stop - start)


# ---------------------------------------------------------------------------------------------
# One partition (runs inside a Ray task)
# ---------------------------------------------------------------------------------------------


def _url_table(table: pa.Table, cfg: DownloadConfig) -> pa.Table:
    """The partition's URL list as img2dataset reads it: url, caption, then the extra columns."""
    cols = {"url": pa.array([u or "" for u in table.column(cfg.url_col).to_pylist()], pa.string()),
            "caption": pa.array([c if isinstance(c, str) else "" for c in table.column(cfg.caption_col).to_pylist()],
                                pa.string())}
    for name in table.column_names:
        if name in (cfg.url_col, cfg.caption_col):
            continue
        col = table.column(name)
        if pa.types.is_nested(col.type) or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            continue  # img2dataset's json writer cannot carry these
        cols[f"src_{name}" if name in RESERVED else name] = col
    return pa.table(cols)


def download_partition(part: Partition, cfg: DownloadConfig, urls: Artifact, out: Artifact) -> dict[str, Any]:
    """Run img2dataset on one partition and commit it; returns the commit record."""
    # cv2 reads its pixel cap once, at import: set it before img2dataset imports cv2 here.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(cfg.max_image_area))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else every worker's import asks PyPI for news
    import img2dataset  # lazy: only the partition tasks run it

    t0 = time.time()
    table = _url_table(read_slice(urls, part.file, part.start, part.stop), cfg)
    n = table.num_rows
    rel = f"parts/{part.name}"
    with tempfile.TemporaryDirectory(prefix=f"dl-{part.name}-") as tmp:
        url_list = os.path.join(tmp, "urls.parquet")
        pq.write_table(table, url_list)
        local = is_local(out.fs)
        folder = out.child(rel) if local else os.path.join(tmp, "out")
        os.makedirs(folder, exist_ok=True)
        reports = os.path.join(tmp, "rss")  # one small JSON per shard from the worker that ran it
        with img2dataset_guard(cfg.policy(), cfg.limits(), reports, in_process=cfg.processes_per_task == 0):
            img2dataset.download(
                url_list=url_list, input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=[c for c in table.column_names if c not in ("url", "caption")] or None,
                output_folder=folder, output_format="webdataset", processes_count=max(1, cfg.processes_per_task),
                thread_count=cfg.threads, number_sample_per_shard=cfg.rows_per_shard,
                resize_mode=cfg.resize_mode, image_size=cfg.image_size, resize_only_if_bigger=cfg.resize_only_if_bigger,
                min_image_size=cfg.min_image_size, max_image_area=float(cfg.max_image_area),
                max_aspect_ratio=cfg.max_aspect_ratio or float("inf"), encode_format=cfg.encode_format,
                encode_quality=cfg.encode_quality, timeout=cfg.timeout_s, retries=cfg.retries,
                enable_wandb=False, extract_exif=False, compute_hash="sha256", incremental_mode="incremental",
                max_shard_retry=1)
        n_shards = (n + cfg.rows_per_shard - 1) // cfg.rows_per_shard
        shards, reasons, ok, seen = [], Counter(), 0, 0
        for s in range(n_shards):
            base = f"{s:05d}"
            if not os.path.exists(os.path.join(folder, f"{base}_stats.json")):
                # img2dataset logs and moves on when a whole shard fails: make the task fail
                # instead, so Ray retries it and nothing is silently missing.
                raise RuntimeError(f"download: partition {part.name} shard {base} has no stats after img2dataset")
            status = pq.read_table(os.path.join(folder, f"{base}.parquet"), columns=["status", "error_message"])
            st, err = status.column("status").to_pylist(), status.column("error_message").to_pylist()
            shard_ok = sum(1 for x in st if x == "success")
            reasons.update(failure_reason(x, e) for x, e in zip(st, err) if x != "success")
            ok += shard_ok
            seen += len(st)
            shards.append({"shard": f"{part.name}_{base}", "tar": f"{rel}/{base}.tar",
                           "parquet": f"{rel}/{base}.parquet", "partition": part.name, "rows": len(st), "ok": shard_ok})
        if seen != n:
            raise RuntimeError(f"download: partition {part.name} has {seen} status rows for {n} input rows")
        if not local:  # stream each file up (a tar can be GBs); the commit below comes after all of them
            out.fs.create_dir(out.child(rel), recursive=True)
            for fn in sorted(os.listdir(folder)):
                if fn.endswith((".tar", ".parquet", "_stats.json")):
                    pafs.copy_files(os.path.join(folder, fn), out.child(f"{rel}/{fn}"),
                                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out.fs)
        else:
            shutil.rmtree(os.path.join(folder, "_tmp"), ignore_errors=True)
        memory = worker_memory(reports)
    record = {"partition": part.name, "source": asdict(part), "rows": n, "ok": ok,
              "failed_by_reason": dict(sorted(reasons.items())), "shards": shards, "wall_s": round(time.time() - t0, 3),
              **memory}
    out.write_json(f"{rel}/{COMMIT}", record)  # last: the partition is done
    return record


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------


def run(inputs: dict[str, Artifact], cfg: DownloadConfig, out: Artifact) -> dict[str, Any]:
    import ray  # lazy: Ray is only needed inside a running stage

    urls = inputs["urls"]
    parts = plan_partitions(urls, cfg)
    done = {p.name for p in parts if out.exists(f"parts/{p.name}/{COMMIT}")}
    todo = [p for p in parts if p.name not in done]
    rows_todo = sum(p.stop - p.start for p in todo)
    log.info("[download] %d partitions (%d already committed), %d rows to fetch", len(parts), len(done), rows_todo)
    t0 = time.time()
    task = ray.remote(download_partition).options(num_cpus=cfg.cpus_per_task, max_retries=cfg.task_retries,
                                                  retry_exceptions=True)
    pending = {task.remote(p, cfg, urls, out): p for p in todo}
    finished = rows_done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        part = pending.pop(ready[0])
        rec = ray.get(ready[0])
        finished += 1
        rows_done += rec["rows"]
        log.info("[download] partition %s committed (%d/%d): %d rows, %d ok, %s, %.1fs, peak RSS %s MB; "
                 "%d/%d rows, %.1f rows/s so far", part.name, finished, len(todo), rec["rows"], rec["ok"],
                 rec["failed_by_reason"] or "no failures", rec["wall_s"], rec.get("peak_rss_mb"), rows_done,
                 rows_todo, rows_done / max(time.time() - t0, 1e-9))
    wall = time.time() - t0

    records = [out.read_json(f"parts/{p.name}/{COMMIT}") for p in parts]
    index = pa.Table.from_pylist([s for r in records for s in r["shards"]], schema=INDEX_SCHEMA)
    out.write_parquet(INDEX, index)

    reasons: Counter = Counter()
    for r in records:
        reasons.update(r["failed_by_reason"])
    rows_in = sum(r["rows"] for r in records)
    ok = sum(r["ok"] for r in records)
    if rows_in != ok + sum(reasons.values()):
        raise RuntimeError(f"download: {rows_in} rows in but {ok} ok + {sum(reasons.values())} failed")
    counts = {"rows_in": rows_in, "rows_out": ok, "failed": rows_in - ok,
              "failed_by_reason": dict(sorted(reasons.items())), "partitions": len(parts),
              "partitions_resumed": len(done), "shards": index.num_rows,
              "rows_per_s": round(rows_todo / wall, 2) if todo and wall > 0 else None,
              "peak_rss_mb": max((r["peak_rss_mb"] for r in records if r.get("peak_rss_mb") is not None), default=None)}
    log.info("[download] summary: rows in %d, rows out %d, failed %s, %.1f rows/s", rows_in, ok,
             json.dumps(counts["failed_by_reason"]), counts["rows_per_s"] or 0.0)
    return counts


INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("tar", pa.string()), ("parquet", pa.string()),
                          ("partition", pa.string()), ("rows", pa.int64()), ("ok", pa.int64())])


def read_index(art: Artifact) -> list[dict[str, Any]]:
    """The download artifact's shard list (small: one row per tar), sorted by shard id."""
    if not art.exists(INDEX):
        raise ValueError(f"{art.uri}: no {INDEX}; is this a download artifact?")
    rows = pq.read_table(posixpath.join(art.path, INDEX), filesystem=art.fs).to_pylist()
    return sorted(rows, key=lambda r: r["shard"])
