"""Per-shard bookkeeping shared by the filter, recaption and shard stages.

Every data stage after ``download`` works per input shard (one img2dataset tar, id
``<partition>_<shard>``) and writes ``<subdir>/shard=<id>/*.parquet`` (hive layout). A shard
is done when its files hold exactly as many rows as expected (row counts from parquet
footers); anything else is the remains of an interrupted write and is deleted and redone,
which makes each stage exactly-once on rerun.

This module also reads the inputs those stages share: the download tars (as a Ray Data
webdataset, or streamed in one process by :func:`tar_batches`, plus the common columns of a raw
sample) and the filter's ``shards.parquet``; and runs a model pass over the shards in plain Ray
tasks (:func:`task_pass`), where an actor pool would cost more to start than the rows.
"""

from __future__ import annotations

import itertools
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import download as download_mod
from data_prep import images, tars
from pipeline.stage import ActorPoolConfig, in_tasks
from pipeline.store import Artifact

log = logging.getLogger("genmodels")

# The filter artifact's per-input-shard summary: shard, rows, kept.
SHARDS = "shards.parquet"
# Optional URL-list column of ground truth (a JSON string, null when absent), carried from the
# URL list through img2dataset's json, the filter's rows and into every final shard row.
LABELS = "labels"


def shard_dir(subdir: str, shard: str) -> str:
    return f"{subdir}/shard={shard}"


def written_rows(art: Artifact, subdir: str) -> dict[str, int]:
    """Rows per shard under ``art/subdir/shard=<id>/``; -1 when a file is unreadable (cut short)."""
    rows: dict[str, int] = {}
    for name in art.list(".parquet", subdir=subdir):
        shard = posixpath.basename(posixpath.dirname(name)).removeprefix("shard=")
        try:
            with art.fs.open_input_file(art.child(name)) as f:
                n = pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowInvalid):
            n = None
        rows[shard] = -1 if n is None or rows.get(shard, 0) < 0 else rows.get(shard, 0) + n
    return rows


def pending_shards(art: Artifact, subdir: str, expected: dict[str, int]) -> list[str]:
    """Shards whose output is not complete; incomplete directories are deleted first.

    Complete means exactly ``expected[shard]`` rows. Anything else is the remains of an
    interrupted write (or of an older run), which is why it is safe to delete; so are the temp
    files of a write that was killed before its rename.
    """
    if art.remove_temp(subdir):
        log.info("[%s] removed the temp files of an interrupted write", subdir)
    have = written_rows(art, subdir)
    pending = []
    for shard, n in sorted(expected.items()):
        if n == 0 or have.get(shard) == n:
            continue
        if shard in have:
            log.info("[%s] shard %s incomplete (%s of %d rows): redoing it", subdir, shard, have[shard], n)
            art.fs.delete_dir(art.child(shard_dir(subdir, shard)))
        pending.append(shard)
    for shard in sorted(set(have) - set(expected)):  # not an input shard of this run
        art.fs.delete_dir(art.child(shard_dir(subdir, shard)))
    return pending


def write_by_shard(ds, art: Artifact, subdir: str) -> None:
    """Streamed write, one directory per input shard (the unit of completion)."""
    art.fs.create_dir(art.child(subdir), recursive=True)
    ds.write_parquet(art.child(subdir), filesystem=art.fs, partition_cols=["shard"])


def read_shard_rows(art: Artifact, subdir: str, shard: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of one shard, sorted by key (small: one shard)."""
    names = art.list(".parquet", subdir=shard_dir(subdir, shard))
    tables = []
    for n in names:
        with art.fs.open_input_file(art.child(n)) as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or ["key"])})
    t = pa.concat_tables(tables, promote_options="default")
    return t.sort_by("key") if "key" in t.column_names else t


def hive():
    """Ray Data partitioning of the ``shard=<id>`` directories (ids stay strings)."""
    from ray.data.datasource import Partitioning  # lazy: Ray is only needed inside a running stage

    return Partitioning("hive", field_types={"shard": str})


def read_by_shard(art: Artifact, subdir: str, columns: list[str] | None = None):
    """Every shard's rows under ``subdir`` as one Ray dataset (with the ``shard`` column)."""
    import ray  # lazy: Ray is only needed inside a running stage

    return ray.data.read_parquet(art.child(subdir), filesystem=art.fs, columns=columns, partitioning=hive())


def tally(batch: pa.Table, *, keys: list[str]) -> pa.Table:
    """Row counts per distinct ``keys`` within one batch; summed on the driver (tiny), which
    avoids a shuffle for what is only a count."""
    return batch.group_by(keys).aggregate([([], "count_all")])


def tally_files(art: Artifact, subdir: str, keys: list[str]) -> list[dict[str, Any]]:
    """:func:`tally` of every file under ``subdir`` (``shard`` from its directory), read on the
    caller with a few threads, only the ``keys`` columns. Replaces a Ray Data pass whose start
    (operators, tasks) cost more than reading a few small string columns; the result is one row
    per file and distinct key tuple, so it stays small at any row count."""
    from concurrent.futures import ThreadPoolExecutor

    cols = [k for k in keys if k != "shard"]

    def one(name: str) -> list[dict[str, Any]]:
        shard = posixpath.basename(posixpath.dirname(name)).removeprefix("shard=")
        with art.fs.open_input_file(art.child(name)) as f:
            t = pq.read_table(f, columns=cols)
        t = t.append_column("shard", pa.array([shard] * t.num_rows, pa.string())) if "shard" in keys else t
        return tally(t, keys=keys).to_pylist()

    with ThreadPoolExecutor(8) as pool:
        return [row for rows in pool.map(one, art.list(".parquet", subdir=subdir)) for row in rows]


def write_shard_file(art: Artifact, subdir: str, shard: str, table: pa.Table) -> None:
    """One shard's rows as one file in the layout Ray Data's partitioned write leaves (the
    ``shard`` column only in the directory name); atomic, so :func:`pending_shards` sees all
    of it or nothing."""
    art.write_parquet(f"{shard_dir(subdir, shard)}/part-00000.parquet",
                      table.drop_columns(["shard"]) if "shard" in table.column_names else table)


# ---------------------------------------------------------------------------------------------
# The download tars
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarPassConfig(ActorPoolConfig):
    """A stage that runs a model over the download tars (filter, recaption).

    task_rows: on CPU, a pass runs in plain Ray tasks instead of a Ray Data actor pool: each task
        streams its share of the tars through the model and writes each shard's rows itself
        (:func:`task_pass`). ``min(actors, rows // task_rows)`` tasks, at least one: every task
        imports and builds the model once (8-9 s of a core for torch, open_clip and the tiny
        model), so it gets at least ``task_rows`` rows to pay for it. 0 = always the actor pool
        (GPU actors always use it). Measured on 2 cores: the pool's start (Ray Data's operators,
        the actor processes and their imports) took 14-16 s of a 403-row demo pass whose rows
        took 1-2 s; at 20,000 rows, with the shard stage's tasks beside it, filter → shard per
        core went from 0.345 to 0.44-0.47 of the plain loop (BENCHMARKS.md, issue 13).
    """

    task_rows: int = 1000

    def validate_pool(self) -> None:
        super().validate_pool()
        if self.task_rows < 0:
            raise ValueError(f"task_rows: must be >= 0, got {self.task_rows}")

    def tasks_for(self, rows: int) -> int:
        """How many Ray tasks run a pass over ``rows`` rows; 0 = the actor pool."""
        if self.gpus_per_actor > 0 or self.task_rows == 0:
            return 0
        return max(1, min(self.actors, rows // self.task_rows))


# A WebDataset member name: the sample key (directories included) and every extension after the
# first dot of the file name, the split Ray Data's read_webdataset makes.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_samples(art: Artifact, path: str) -> Iterator[dict[str, Any]]:
    """One WebDataset tar's samples, streamed, as ``read_webdataset(decoder=None,
    include_paths=True)`` gives them: ``__key__``, ``path`` and the raw bytes per extension."""
    sample: dict[str, Any] | None = None
    with art.fs.open_input_stream(path, buffer_size=tars.BUFFER) as f:
        for name, data in tars.members(f):
            match = _MEMBER.match(name)
            if not match:
                continue
            key, ext = match.groups()
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "path": path}
            sample[ext] = data
    if sample is not None:
        yield sample


def tar_batches(art: Artifact, path: str, batch_size: int) -> Iterator[dict[str, list]]:
    """:func:`tar_samples` as column batches of ``batch_size`` (None where a sample lacks a file)."""
    samples = tar_samples(art, path)
    while buf := list(itertools.islice(samples, batch_size)):
        yield {k: [s.get(k) for s in buf] for k in dict.fromkeys(k for s in buf for k in s)}


def arrow_column(v: np.ndarray) -> pa.Array:
    """A numpy batch column as Arrow. Object columns are strings here; one that is null in every
    row of a batch (``labels`` when the URL list has none) reaches the actor as None or NaN
    (Ray's numpy conversion) and must still be a string column, or shards' files would
    disagree on its type."""
    if v.dtype != object:
        return pa.array(v)
    arr = pa.array(list(v), from_pandas=True)  # NaN → null
    return pa.nulls(len(arr), pa.string()) if arr.null_count == len(arr) else arr


def as_table(batch: pa.Table | dict[str, np.ndarray]) -> pa.Table:
    """A model's output batch (a table, or numpy columns) as Arrow."""
    return batch if isinstance(batch, pa.Table) else pa.table({k: arrow_column(v) for k, v in batch.items()})


def in_tasks_label(tasks: int) -> str:
    """A pass's phase name suffix: how it ran (``" in 2 tasks"``; nothing for the actor pool)."""
    return f" in {tasks} task{'s' if tasks > 1 else ''}" if tasks else ""


def balance(rows: dict[str, int], k: int) -> list[list[str]]:
    """The shards of ``rows`` (shard → rows) in at most ``k`` groups of near-equal row totals
    (largest first into the lightest group), each group in shard order; no empty group."""
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, k))]
    for shard in sorted(rows, key=lambda s: (-rows[s], s)):
        i = min(range(len(groups)), key=lambda j: (groups[j][0], j))
        groups[i] = (groups[i][0] + rows[shard], groups[i][1] + [shard])
    return [sorted(g) for _, g in groups if g]


def task_pass(make: Callable[[], Callable[[dict[str, list]], Any]], download: Artifact, rows: dict[str, int],
              path_to_shard: dict[str, str], out: Artifact, subdir: str, batch_size: int, num_cpus: float,
              tasks: int, stage: str) -> None:
    """``make()``'s callable over every sample of the shards in ``rows`` (shard → input rows), in
    ``tasks`` Ray tasks side by side, each over a share balanced by rows (:func:`balance`). Each
    shard's output is one file, written atomically once the shard is done
    (:func:`write_shard_file`), so a killed pass leaves whole shards that :func:`pending_shards`
    counts and skips."""
    groups = balance(rows, tasks)
    in_tasks(_task_pass, [(make, download, g, path_to_shard, out, subdir, batch_size, stage) for g in groups],
             num_cpus=num_cpus, name=f"{stage}_pass")


def _task_pass(make, download: Artifact, shards: list[str], path_to_shard: dict[str, str], out: Artifact,
               subdir: str, batch_size: int, stage: str) -> None:
    t0 = time.time()
    fn = make()
    paths = {s: p for p, s in path_to_shard.items()}
    done = 0
    log.info("[%s] task: model ready in %.1fs; %d shards to go", stage, time.time() - t0, len(shards))
    for i, shard in enumerate(shards, 1):
        parts = [as_table(fn(b)) for b in tar_batches(download, paths[shard], batch_size)]
        table = pa.concat_tables(parts, promote_options="default")
        write_shard_file(out, subdir, shard, table)
        done += table.num_rows
        log.info("[%s] task: shard %s written (%d of %d shards, %d rows, %.1f rows/s)", stage, shard, i,
                 len(shards), done, done / max(time.time() - t0, 1e-9))


def tar_shards(download: Artifact) -> tuple[dict[str, int], dict[str, str]]:
    """(samples per shard, tar path in the download fs → shard) from the download index."""
    index = download_mod.read_index(download)
    return {r["shard"]: int(r["ok"]) for r in index}, {download.child(r["tar"]): r["shard"] for r in index}


def read_tars(download: Artifact, shards: list[str], path_to_shard: dict[str, str]):
    import ray  # lazy: Ray is only needed inside a running stage

    wanted = set(shards)
    paths = sorted(p for p, s in path_to_shard.items() if s in wanted)
    return ray.data.read_webdataset(paths, filesystem=download.fs, decoder=None, include_paths=True,
                                    file_extensions=["tar"], override_num_blocks=max(1, len(paths)))


def sample_columns(batch: dict[str, Any], path_to_shard: dict[str, str]) -> dict[str, list]:
    """Common columns of a raw webdataset batch: shard, key, sample_id, caption, meta, image bytes."""
    keys = [str(k) for k in batch["__key__"]]
    paths = [str(p) for p in batch["path"]]
    shards = [path_to_shard[p] for p in paths]
    metas = []
    for raw in batch.get("json", [None] * len(keys)):
        try:
            metas.append(json.loads(raw) if raw is not None else {})
        except (ValueError, TypeError):
            metas.append({})
    image_col = next((c for c in ("jpg", "png", "webp", "jpeg") if c in batch), None)
    data = [bytes(x) if x is not None else b"" for x in batch[image_col]] if image_col else [b""] * len(keys)
    return {"shard": shards, "key": [f"{s.split('_')[0]}_{k}" for s, k in zip(shards, keys)],
            "sample_id": [str(m.get("sample_id") or f"{s}_{k}") for m, s, k in zip(metas, shards, keys)],
            "caption": [images.clean_caption(m.get("caption")) for m in metas],
            "labels": [labels_text(m.get(LABELS)) for m in metas], "meta": metas, "data": data}


def labels_text(value: Any) -> str | None:
    """The URL list's ``labels`` value as the string it was written as (JSON ground truth), or
    None when the row has none. img2dataset copies the column into each sample's json as is;
    a value some other writer stored already parsed is serialised back to JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The filter's per-shard summary
# ---------------------------------------------------------------------------------------------


def write_shards(art: Artifact, per_shard: dict[str, tuple[int, int]]) -> None:
    """``shards.parquet``: shard → (rows, kept), one row per input shard."""
    table = pa.table({"shard": list(per_shard), "rows": [v[0] for v in per_shard.values()],
                      "kept": [v[1] for v in per_shard.values()]})
    art.write_parquet(SHARDS, table)


def read_shards(art: Artifact) -> dict[str, dict[str, int]]:
    """``shards.parquet`` of a filter artifact: shard → {rows, kept}."""
    t = pq.read_table(art.child(SHARDS), filesystem=art.fs)
    return {r["shard"]: {"rows": r["rows"], "kept": r["kept"]} for r in t.to_pylist()}
