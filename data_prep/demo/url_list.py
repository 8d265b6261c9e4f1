"""The LAION-style URL parquet that points at the demo site."""

from __future__ import annotations

import posixpath
import urllib.parse
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

URL_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("url", "caption", "sample_id", "expected")]
    + [("width", pa.int32()), ("height", pa.int32()), ("labels", pa.string())]
)


def write_url_parquet(rows: Iterable[dict], base_url: str, fs: pafs.FileSystem, path: str) -> pa.Table:
    """Write a LAION-style URL parquet (url, caption + metadata) sorted by sample_id; return it."""
    base = base_url.rstrip("/")
    records = [
        {"url": f"{base}/{urllib.parse.quote(r['path'])}", **{k: r[k] for k in URL_SCHEMA.names[1:]}}
        for r in sorted(rows, key=lambda r: r["sample_id"])
    ]
    table = pa.Table.from_pylist(records, schema=URL_SCHEMA)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return table
