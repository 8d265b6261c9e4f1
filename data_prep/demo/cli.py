"""Write the demo site and its URL parquet to a directory, and optionally serve it.

    python -m data_prep.demo.cli --out /tmp/demo [--n 200] [--serve]
    python -m data_prep.demo.cli --out /tmp/scale --scale 20000 [--failures] [--latency-ms 50] --serve

``--scale N`` is the scale mode (:mod:`data_prep.demo.scale`): N distinct images served from
memory, with optional latency and a LAION-like failure mix (slow hosts and resets need the
server, so without ``--serve`` only the files and the parquet are written).
"""

from __future__ import annotations

import argparse
import os
import posixpath
import threading
from collections.abc import Sequence

import pyarrow.fs as pafs

from data_prep.demo.broken import broken_items
from data_prep.demo.catalog import generate
from data_prep.demo.scale import ScaleSite, serve_scale
from data_prep.demo.scale import build as build_scale
from data_prep.demo.site import serve, write_site
from data_prep.demo.url_list import write_url_parquet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (local path or s3://bucket/prefix)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--no-photos", action="store_true")
    parser.add_argument("--serve", action="store_true", help="serve the site until Ctrl-C")
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="base URL written into the parquet when not serving"
    )
    parser.add_argument("--scale", type=int, default=0, help="scale mode with this many rows (see above)")
    parser.add_argument("--failures", action="store_true", help="scale mode: LAION-like failure mix")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="scale mode: added to every response")
    args = parser.parse_args(argv)

    out = args.out if "://" in args.out else os.path.abspath(args.out)
    fs, root = pafs.FileSystem.from_uri(out)
    if args.scale:
        scale_main(args, fs, root)
        return
    items = list(generate(args.n, args.seed, args.min_size, args.max_size, photos=not args.no_photos))
    rows = write_site(fs, f"{root}/site", items + broken_items(args.seed))
    parquet = f"{root}/urls.parquet"
    if not args.serve:
        write_url_parquet(rows, args.base_url, fs, parquet)
        print(f"url parquet: {parquet}\nsite: {root}/site (serve it at {args.base_url})")
        return
    _serve_until_interrupted(serve(fs, f"{root}/site"), rows, fs, parquet)


def scale_main(args: argparse.Namespace, fs: pafs.FileSystem, root: str) -> None:
    site = ScaleSite(n=args.scale, seed=args.seed, failures=args.failures, latency_ms=args.latency_ms)
    files, behaviour, rows = build_scale(site)
    parquet = f"{root}/urls.parquet"
    if not args.serve:
        for path, data in files.items():
            fs.create_dir(f"{root}/site/{posixpath.dirname(path)}", recursive=True)
            with fs.open_output_stream(f"{root}/site/{path}") as f:
                f.write(data)
        write_url_parquet(rows, args.base_url, fs, parquet)
        print(f"url parquet: {parquet}\nsite: {root}/site ({len(files)} files; serve it at {args.base_url})")
        return
    _serve_until_interrupted(serve_scale(site, files, behaviour), rows, fs, parquet)


def _serve_until_interrupted(server, rows: list[dict], fs: pafs.FileSystem, parquet: str) -> None:
    """Write the URL parquet against the served base URL, then serve until Ctrl-C."""
    with server as base_url:
        write_url_parquet(rows, base_url, fs, parquet)
        print(f"url parquet: {parquet}\nbase url: {base_url}\nserving {len(rows)} rows; Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
