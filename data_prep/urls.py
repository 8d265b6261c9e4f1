"""Stage ``urls``: the LAION-style URL list every run starts from.

``source: demo`` generates the embedded demo site (captioned shapes + bundled photos +
deliberately broken rows) and serves it on 127.0.0.1 while downstream stages run, so the
demo downloads over HTTP exactly as a real run does. Any other ``source`` is a parquet file
or directory (local or s3://) with at least ``url`` and ``caption`` columns; it is copied
into the artifact so later stages never depend on the original location.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from data_prep import demo
from pipeline.store import Artifact, filesystem

log = logging.getLogger("genmodels")
REQUIRED = ("url", "caption")


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
    limit: int = 0  # keep only the first N rows of a real source (0: all)

    def validate(self) -> None:
        if self.source == "demo" and not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.n < 1:
            raise ValueError(f"n: must be ≥ 1, got {self.n}")
        if self.source != "demo" and "://" not in self.source and not os.path.exists(self.source):
            raise ValueError(f"source: file not found: {self.source}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: {self.min_size} is larger than max_size {self.max_size}")


def run(inputs: dict[str, Artifact], cfg: UrlsConfig, out: Artifact) -> dict:
    if cfg.source == "demo":
        items = list(demo.generate(cfg.n, cfg.seed, cfg.min_size, cfg.max_size)) + demo.broken_items()
        rows = demo.write_site(out.fs, out.child("site"), items)
        table = demo.write_url_parquet(rows, base_url(cfg), out.fs, out.child("urls.parquet"))
        log.info("[urls] demo site: %d items (%d broken on purpose) served at %s", len(items),
                 sum(r != "ok" for r in table.column("expected").to_pylist()), base_url(cfg))
    else:
        table = read_source(cfg.source)
        if cfg.limit:
            table = table.slice(0, cfg.limit)
        out.write_parquet("urls.parquet", table)
    return {"rows": table.num_rows}


def read_source(source: str) -> pa.Table:
    """Read a URL parquet and check its columns; add a stable ``sample_id`` when it has none."""
    fs, path = filesystem(source)
    try:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
        raise ValueError(f"stages.urls.source: cannot read parquet at {source!r} ({e})") from e
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"stages.urls.source: {source!r} has no column {missing[0]!r} "
                         f"(columns: {', '.join(table.column_names)})")
    if "sample_id" not in table.column_names:
        ids = [hashlib.sha1(u.encode()).hexdigest()[:16] for u in table.column("url").to_pylist()]
        table = table.append_column("sample_id", pa.array(ids))
    return table


def base_url(cfg: UrlsConfig) -> str:
    return f"http://127.0.0.1:{cfg.port}"


def serve(art: Artifact, cfg: UrlsConfig):
    """While downstream stages run, serve the demo site on its fixed loopback port."""
    if cfg.source != "demo":
        return contextlib.nullcontext()
    return demo.serve(art.fs, art.child("site"), port=cfg.port)
