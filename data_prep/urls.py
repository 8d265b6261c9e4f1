"""Stage ``urls``: the LAION-style URL list every run starts from.

``source: demo`` generates the embedded demo site (captioned shapes + bundled photos +
deliberately broken rows) and serves it on 127.0.0.1 while downstream stages run, so the
demo downloads over HTTP exactly as a real run does.

Any other ``source`` is a parquet file, or a directory of ``*.parquet`` files read in sorted
order (local or s3://; LAION-2B / laion-aesthetic parts as downloaded). It is copied into the
artifact as ``urls.parquet`` with canonical column names, so later stages never depend on the
original location or spelling:

- ``url``: from ``url_col``; by default the column named ``url`` in any case (LAION's ``URL``),
  blanks around it stripped.
- ``caption``: from ``caption_col``; by default ``caption``, else ``text``, in any case (``TEXT``).
- ``sample_id``: the list's own id as a string (``id_col``; by default ``sample_id`` in any case,
  LAION-400M's ``SAMPLE_ID``); an id seen before gets a ``~<n>`` suffix, counted in
  ``duplicate_sample_ids``. Without one (LAION-2B), ``<file tag>-<row>``: a hash of the file's
  path inside ``source`` and the row's index in that file, so duplicate URLs get distinct ids
  and a rerun gets the same ones.
- LAION's own scores, float32, when present: ``laion_similarity`` (CLIP image-text similarity,
  from ``similarity``), ``laion_punsafe`` (NSFW probability, ``punsafe``), ``laion_pwatermark``
  (watermark probability, ``pwatermark``), ``laion_aesthetic`` (``AESTHETIC_SCORE`` or
  ``aesthetic``). The filter stage reads them under these names.
- every other column as is (one whose name collides with the above becomes ``src_<name>``;
  pandas' ``__index_level_*`` is dropped); the download stage carries them into each sample.

Rows without a usable URL (null, empty or whitespace) never stop the stage: they are dropped
and counted in the manifest (``dropped_by_reason``: ``url_missing``), and ``rejected_rows.pq``
(a parquet file, named so the download stage does not read it as a URL list) holds each one
with its ``reason``, ``source_file`` and ``source_row``. ``limit`` keeps the first N input rows.
Manifest counts: ``rows`` (= ``rows_out``), ``rows_in``, ``dropped``, ``dropped_by_reason``,
``duplicate_sample_ids``, ``columns`` (canonical name <- source column, where renamed), ``scores``.
Local sources are checked when the config is loaded (a parquet file, the columns found), so a
CSV or a directory without parquet stops the run with one line before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep import demo
from pipeline.store import Artifact, filesystem, is_local

log = logging.getLogger("genmodels")

URLS_FILE = "urls.parquet"
REJECTED_FILE = "rejected_rows.pq"
# canonical name -> the names it is found under (first match wins; case-insensitive)
SCORES = {"laion_similarity": ("laion_similarity", "similarity"),
          "laion_punsafe": ("laion_punsafe", "punsafe"),
          "laion_pwatermark": ("laion_pwatermark", "pwatermark"),
          "laion_aesthetic": ("laion_aesthetic", "aesthetic_score", "aesthetic")}
CANONICAL = ("url", "caption", "sample_id", *SCORES)
REJECTED_SCHEMA = pa.schema([("sample_id", pa.string()), ("reason", pa.string()), ("source_file", pa.string()),
                             ("source_row", pa.int64()), ("url", pa.string()), ("caption", pa.string())])


@dataclass(frozen=True)
class UrlsConfig:
    source: str = "demo"  # "demo" or a parquet file/directory (local path or s3://)
    # Demo only: how many generated images, their size range, and the loopback port the site is
    # served on (fixed, because the URLs written into urls.parquet must stay valid on reruns).
    n: int = 400
    seed: int = 0
    min_size: int = 64
    max_size: int = 256
    port: int = 18650
    scene: str = "mixed"  # demo: "mixed" (1-3 shapes, any background) or "simple" (data_prep.demo.shapes.SCENES)
    limit: int = 0  # keep only the first N rows of a real source (0: all)
    # Column names in a real source; null: url / caption, text / sample_id in any case (LAION's URL, TEXT).
    url_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None

    def validate(self) -> None:
        if self.source == "demo" and not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.n < 1:
            raise ValueError(f"n: must be ≥ 1, got {self.n}")
        if self.scene not in demo.SCENES:
            raise ValueError(f"scene: one of {', '.join(demo.SCENES)}, got {self.scene!r}")
        if self.limit < 0:
            raise ValueError(f"limit: must be ≥ 0, got {self.limit}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: {self.min_size} is larger than max_size {self.max_size}")
        if "://" in self.source and not self.source.startswith(("s3://", "file://")):
            raise ValueError(f"source: 'demo', a local path or s3://bucket/prefix, got {self.source!r}")
        if self.source != "demo" and not self.source.startswith("s3://"):  # s3:// is checked by the stage
            fs, _ = filesystem(self.source)
            for path, _ in source_files(self.source):
                resolve_columns(parquet_schema(fs, path), self, path)


def run(inputs: dict[str, Artifact], cfg: UrlsConfig, out: Artifact) -> dict:
    if cfg.source == "demo":
        items = list(demo.generate(cfg.n, cfg.seed, cfg.min_size, cfg.max_size, scene=cfg.scene)) + demo.broken_items()
        rows = demo.write_site(out.fs, out.child("site"), items)
        table = demo.write_url_parquet(rows, base_url(cfg), out.fs, out.child(URLS_FILE))
        log.info("[urls] demo site: %d items (%d broken on purpose) served at %s", len(items),
                 sum(r != "ok" for r in table.column("expected").to_pylist()), base_url(cfg))
        return {"rows": table.num_rows}
    table, rejected, counts = read_source(cfg)
    out.write_parquet(URLS_FILE, table)
    out.write_parquet(REJECTED_FILE, rejected)
    log.info("[urls] %s: %d rows in, %d kept, dropped %s, %d duplicate ids made unique", cfg.source,
             counts["rows_in"], counts["rows_out"], counts["dropped_by_reason"] or "none",
             counts["duplicate_sample_ids"])
    return counts


# ---------------------------------------------------------------------------------------------
# Reading a real source
# ---------------------------------------------------------------------------------------------


def source_files(source: str) -> list[tuple[str, str]]:
    """``(filesystem path, name inside source)`` of each parquet file of ``source``, sorted."""
    fs, path = filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"source: file not found: {source}")
    if info.type == pafs.FileType.File:
        return [(path, posixpath.basename(path))]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not posixpath.basename(i.path).startswith(("_", ".")))
    if not files:
        raise ValueError(f"source: {source} is not a parquet file (a directory with no *.parquet file in it)")
    return [(f, posixpath.relpath(f, path)) for f in files]


def parquet_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    """The file's schema from its footer; ``ValueError("source: <path> is not a parquet file (...)")``."""
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowInvalid) as e:
        shown = path if is_local(fs) else f"s3://{path}"
        raise ValueError(f"source: {shown} is not a parquet file ({str(e).split('. ')[0].rstrip('.')})") from e


def _find(columns: list[str], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` among ``columns``: exact spelling first, then any case."""
    lower: dict[str, str] = {}
    for c in columns:
        lower.setdefault(c.lower(), c)
    for n in names:
        if n in columns:
            return n
        if n.lower() in lower:
            return lower[n.lower()]
    return None


def resolve_columns(schema: pa.Schema, cfg: UrlsConfig, where: str) -> dict[str, str]:
    """Canonical name -> source column for ``url``, ``caption``, ``sample_id`` (when present) and the
    LAION scores present, with their types checked; raises ``ValueError("url_col: ...")``."""
    columns = schema.names
    found: dict[str, str] = {}
    for role, key, default in (("url", "url_col", ("url",)), ("caption", "caption_col", ("caption", "text")),
                               ("sample_id", "id_col", ("sample_id",))):
        given = getattr(cfg, key)
        col = _find(columns, (given,) if given else default)
        if col is None and (given or role != "sample_id"):
            wanted = repr(given) if given else " or ".join(repr(n) for n in default) + " in any case"
            raise ValueError(f"{key}: {where} has no column {wanted} (columns: {', '.join(columns)}); "
                             f"set stages.urls.{key}")
        if col is None:
            continue
        tp = schema.field(col).type
        tp = tp.value_type if pa.types.is_dictionary(tp) else tp
        if role != "sample_id" and not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)):
            raise ValueError(f"{key}: column {col!r} of {where} holds {tp}, not text")
        found[role] = col
    for name, names in SCORES.items():
        col = _find([c for c in columns if c not in found.values()], names)
        if col is None:
            continue
        tp = schema.field(col).type
        if not (pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_decimal(tp) or pa.types.is_null(tp)):
            raise ValueError(f"source: column {col!r} ({name}) of {where} holds {tp}, not a number")
        found[name] = col
    return found


def _text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col.cast(pa.string())  # string, large_string, dictionary<string> or all-null (checked above)


def _canonical(table: pa.Table, cols: dict[str, str], name: str) -> tuple[pa.Table, pa.Table]:
    """One source file's rows as (kept rows with canonical columns, rejected rows with reasons)."""
    n = table.num_rows
    raw_url = _text(table.column(cols["url"]))
    url = pc.utf8_trim_whitespace(raw_url)
    missing = pc.fill_null(pc.equal(pc.utf8_length(url), 0), True)
    caption = _text(table.column(cols["caption"]))
    # Derived ids: the file's path inside the source and the row's index in it, never the URL.
    row = pa.array(np.arange(n, dtype=np.int64))
    derived = pc.binary_join_element_wise(hashlib.sha1(name.encode()).hexdigest()[:10], row.cast(pa.string()), "-")
    ids = derived
    if "sample_id" in cols:
        given = table.column(cols["sample_id"]).cast(pa.string())
        ids = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(given), 0), False), given, derived)
    out = {"url": url, "caption": caption, "sample_id": ids}
    out |= {canon: table.column(cols[canon]).cast(pa.float32()) for canon in SCORES if canon in cols}
    used = set(cols.values())
    for c in table.column_names:
        if c in used or c.startswith("__index_level_"):  # pandas' saved index: no information
            continue
        out[f"src_{c}" if c in CANONICAL else c] = table.column(c)
    rejected = pa.table({"sample_id": ids, "source_row": row, "url": raw_url, "caption": caption}).filter(missing)
    m = rejected.num_rows
    rejected = rejected.append_column("reason", pa.array(["url_missing"] * m, pa.string())) \
        .append_column("source_file", pa.array([name] * m, pa.string()))
    return pa.table(out).filter(pc.invert(missing)), rejected.select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)


def unique_ids(ids: pa.ChunkedArray | pa.Array) -> tuple[pa.Array | pa.ChunkedArray, int]:
    """Make ids unique in order: the first keeps its id, later copies get ``~1``, ``~2``, ...;
    returns (ids, how many were changed). Deterministic for the same input order; the common
    case (no duplicate) stays vectorized."""
    vc = pc.value_counts(ids)
    if len(vc) == len(ids):
        return ids, 0
    values = ids.to_pylist()
    taken, seen, out, changed = set(values), set(), [], 0
    for i in values:
        if i in seen:
            k = 1
            while f"{i}~{k}" in taken:
                k += 1
            i = f"{i}~{k}"
            taken.add(i)
            changed += 1
        seen.add(i)
        out.append(i)
    return pa.array(out, pa.string()), changed


def read_source(cfg: UrlsConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Read ``cfg.source`` into (canonical URL table, rejected rows, counts for the manifest)."""
    fs, _ = filesystem(cfg.source)
    try:  # an s3:// source is first checked here, with the words the config check uses
        files = [(path, name, resolve_columns(parquet_schema(fs, path), cfg, name))
                 for path, name in source_files(cfg.source)]
    except ValueError as e:
        raise ValueError(f"stages.urls.{e}") from e
    kept, rejected, rows_in = [], [], 0
    for path, name, cols in files:
        if cfg.limit and rows_in >= cfg.limit:
            break
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read()
        if cfg.limit:
            table = table.slice(0, cfg.limit - rows_in)
        rows_in += table.num_rows
        k, r = _canonical(table, cols, name)
        kept.append(k)
        rejected.append(r)
    table = pa.concat_tables(kept, promote_options="permissive")
    ids, changed = unique_ids(table.column("sample_id"))
    if changed:
        table = table.set_column(table.column_names.index("sample_id"), "sample_id", ids)
    dropped = pa.concat_tables(rejected)
    if rows_in != table.num_rows + dropped.num_rows:
        raise RuntimeError(f"urls: {rows_in} rows in but {table.num_rows} kept + {dropped.num_rows} dropped")
    counts = {"rows": table.num_rows, "rows_in": rows_in, "rows_out": table.num_rows, "dropped": dropped.num_rows,
              "dropped_by_reason": dict(sorted(Counter(dropped.column("reason").to_pylist()).items())),
              "duplicate_sample_ids": changed,
              "columns": {k: v for k, v in files[0][2].items() if k != v},  # renamed: canonical <- source
              "scores": [c for c in SCORES if c in table.column_names]}
    return table, dropped, counts


def base_url(cfg: UrlsConfig) -> str:
    return f"http://127.0.0.1:{cfg.port}"


def serve(art: Artifact, cfg: UrlsConfig):
    """While downstream stages run, serve the demo site on its fixed loopback port."""
    if cfg.source != "demo":
        return contextlib.nullcontext()
    return demo.serve(art.fs, art.child("site"), port=cfg.port)
