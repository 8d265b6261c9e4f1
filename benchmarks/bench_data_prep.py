"""Throughput of download → filter → shard on Ray vs a plain single-process loop, per CPU core.

    python benchmarks/bench_data_prep.py [--n 200] [--resolutions 32 64 128]

Both sides do the same work on the same demo site served on 127.0.0.1: fetch every URL,
decode (bomb-guarded), drop failures and images below 16 px, score with the tiny random CLIP,
clean captions and drop empty ones, drop exact duplicates, centre-crop + resize to every resolution, encode JPEG,
write Parquet. The Ray side is the real stages (img2dataset, Ray Data actor pools, per-shard
writes, crash-safe bookkeeping); the loop is the shortest correct script (urllib + PIL +
open_clip, batched CLIP like the actor). rows/s/core divides by the cores each side can use
(the Ray side: the machine's cores; the loop: 1). Prints a table and appends one JSON line to
benchmarks/results.jsonl (via benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First: sets the offline test environment (HF_HUB_OFFLINE, Ray auth mode) before any library reads it.
from tests.conftest import ray_head  # noqa: E402

MIN_SIDE = 16


def ray_pipeline(store, urls, resolutions: list[int]) -> dict:
    # Project and library imports live in the functions, after tests.conftest set the environment.
    from data_prep import download, shard
    from data_prep import filter as filt
    from pipeline.config import build

    stages = {}
    dl = store.artifact("download", "bench")
    cfg = build(download.DownloadConfig, {"rows_per_partition": 100, "rows_per_shard": 50, "image_size": 256,
                                          "min_image_size": MIN_SIDE, "threads": 16, "cpus_per_task": 0.5,
                                          "allow_networks": ["127.0.0.1/32"]}, "download")  # the loopback site
    t = time.time()
    counts = download.run({"urls": urls}, cfg, dl)
    stages["download"] = (time.time() - t, counts["rows_in"], counts["rows_out"])
    fo = store.artifact("filter", "bench")
    cfg = build(filt.FilterConfig, {"clip_model": "tiny-clip", "clip_pretrained": None, "min_clip_sim": -1.0,
                                    "min_side": MIN_SIDE, "near_dup_threshold": 0.0, "batch_size": 32,
                                    "min_latin_fraction": 0.0, "max_caption_chars": 100_000,
                                    "min_caption_words": 0}, "filter")
    t = time.time()
    counts = filt.run({"download": dl}, cfg, fo)
    stages["filter"] = (time.time() - t, counts["rows_in"], counts["rows_out"])
    so = store.artifact("shard", "bench")
    cfg = build(shard.ShardConfig, {"resolutions": resolutions, "rows_per_shard": 100}, "shard")
    t = time.time()
    counts = shard.run({"download": dl, "filter": fo}, cfg, so)
    stages["shard"] = (time.time() - t, counts["rows_in"], counts["rows_out"])
    return stages


def plain_loop(url_parquet: str, out_dir: str, resolutions: list[int]) -> tuple[float, int, int]:
    """The same work, one process, no Ray: what one would write without the pipeline."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from data_prep import images
    from data_prep.models import clip_transform
    from genmodels.clip import build_clip, encode_image, encode_text_pooled

    t0 = time.time()
    model, _, tokenizer = build_clip("tiny-clip")
    transform = clip_transform("tiny-clip", None)
    table = pq.read_table(url_parquet)
    rows, seen = [], set()
    for url, caption, sid in zip(*(table.column(c).to_pylist() for c in ("url", "caption", "sample_id"))):
        try:
            data = urllib.request.urlopen(url, timeout=5).read()
            img = images.decode_rgb(data)
        except (OSError, images.BadImage):
            continue
        if min(img.size) < MIN_SIDE:
            continue
        if max(img.size) > 256:  # the download stage's keep_ratio_largest at 256
            img.thumbnail((256, 256), Image.Resampling.LANCZOS)
        h = images.content_hash(data)
        caption = images.clean_caption(caption)
        if h in seen or not caption:
            continue
        seen.add(h)
        rows.append({"sample_id": sid, "caption": caption, "img": img})
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        with torch.no_grad():
            x = encode_image(model, torch.stack([transform(r["img"]) for r in chunk]))
            y = encode_text_pooled(model, tokenizer([r["caption"] for r in chunk]))
        for r, s in zip(chunk, (x * y).sum(-1).tolist()):
            r["clip_sim"] = s
    out = []
    for r in rows:
        rec = {"sample_id": r["sample_id"], "caption": r["caption"], "clip_sim": np.float32(r["clip_sim"])}
        for res in resolutions:
            rec[f"jpg_{res}"] = images.encode(images.center_crop_resize(r["img"], res), "jpg", 95)
        out.append(rec)
    pq.write_table(pa.Table.from_pylist(out), os.path.join(out_dir, "plain.parquet"))
    return time.time() - t0, table.num_rows, len(out)


def run_size(n: int, tmp: str, resolutions: list[int]) -> dict:
    import pyarrow.fs as pafs

    from data_prep import demo
    from pipeline.store import Store

    fs = pafs.LocalFileSystem()
    store = Store(os.path.join(tmp, f"store-{n}"))
    urls = store.artifact("urls", "bench")
    items = list(demo.generate(n, seed=0)) + demo.broken_items()
    rows = demo.write_site(fs, urls.child("site"), items)
    with demo.serve(fs, urls.child("site")) as base:
        demo.write_url_parquet(rows, base, fs, urls.child("urls.parquet"))
        plain = plain_loop(urls.child("urls.parquet"), tmp, resolutions)
        t = time.time()
        stages = ray_pipeline(store, urls, resolutions)
        ray_s = time.time() - t
    return {"n_rows": len(items), "plain": plain, "ray_s": ray_s, "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[200, 800],
                   help="generated demo images per run (+8 broken rows); two sizes also give the marginal rate")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--ray-cpus", type=int, default=4, help="Ray's logical CPUs (oversubscribed on small machines)")
    args = p.parse_args()
    import ray

    cores = os.cpu_count() or 1
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp, ray_head(num_cpus=args.ray_cpus) as head:
        ray.init(address=head["address"], log_to_driver=False)
        try:
            for n in sorted(args.n):
                runs.append(run_size(n, tmp, args.resolutions))
        finally:
            ray.shutdown()
    print(f"\n{'rows':>6}  {'side':<16}{'rows out':>9}{'wall s':>9}{'cores':>7}{'rows/s/core':>13}")
    results = []
    for r in runs:
        n = r["n_rows"]
        plain_s, _, plain_out = r["plain"]
        for name, (s, i, o) in r["stages"].items():
            print(f"{n:>6}  {'ray: ' + name:<16}{o:>9}{s:>9.1f}{cores:>7}{i / s / cores:>13.2f}")
        ray_rate, plain_rate = n / r["ray_s"] / cores, n / plain_s
        print(f"{n:>6}  {'ray: total':<16}{r['stages']['shard'][2]:>9}{r['ray_s']:>9.1f}{cores:>7}{ray_rate:>13.2f}")
        print(f"{n:>6}  {'plain loop':<16}{plain_out:>9}{plain_s:>9.1f}{1:>7}{plain_rate:>13.2f}")
        print(f"{n:>6}  ratio ray/plain per core: {ray_rate / plain_rate:.4f}")
        results.append({"n_rows": n, "ray": {"wall_s": round(r["ray_s"], 2), "rows_out": r["stages"]["shard"][2],
                                             "rows_per_s_per_core": round(ray_rate, 3),
                                             "stages": {k: {"wall_s": round(s, 2), "rows_in": i, "rows_out": o}
                                                        for k, (s, i, o) in r["stages"].items()}},
                        "plain": {"wall_s": round(plain_s, 2), "rows_out": plain_out,
                                  "rows_per_s_per_core": round(plain_rate, 3)},
                        "ratio_per_core": round(ray_rate / plain_rate, 4)})
    marginal = None
    if len(runs) > 1:  # fixed costs (process spawns, actor start, model load) cancel in the difference
        a, b = runs[0], runs[-1]
        dn = b["n_rows"] - a["n_rows"]
        ray_m = dn / max(b["ray_s"] - a["ray_s"], 1e-9) / cores
        plain_m = dn / max(b["plain"][0] - a["plain"][0], 1e-9)
        marginal = {"ray_rows_per_s_per_core": round(ray_m, 3), "plain_rows_per_s_per_core": round(plain_m, 3),
                    "ratio_per_core": round(ray_m / plain_m, 4)}
        print(f"marginal ({a['n_rows']}→{b['n_rows']} rows): ray {ray_m:.2f}, plain {plain_m:.2f} rows/s/core, "
              f"ratio {ray_m / plain_m:.4f}")
    from benchmarks.results import record

    record("data_prep", {"resolutions": args.resolutions, "cores": cores, "ray_cpus": args.ray_cpus, "runs": results,
                         "marginal": marginal, "machine": platform.platform()})


if __name__ == "__main__":
    main()
