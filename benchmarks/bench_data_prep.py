"""Data preparation per CPU core: the Ray stages vs img2dataset alone vs a plain loop.

    python benchmarks/bench_data_prep.py [--n 20000] [--latency-ms 0] [--failures] [--threads 32]

One URL list from the demo site's scale mode (:mod:`data_prep.demo.scale`: ``n`` distinct
images on 127.0.0.1, optional per-response latency and a LAION-like failure mix), three ways:

(a) **Ray**: the real stages download → filter → recaption (tiny LLaVA) → shard, one Ray head
    with ``--ray-cpus`` logical CPUs; ``cores`` partitions / actors, so every core has work.
(b) **img2dataset alone** on the same URL list with the same processes (``cores``) and threads:
    download's upper bound (it has no policy guard, no partition commits).
(c) **plain loop**: one process doing the same work with no framework: load the models, fetch
    (a thread pool, as anyone fetching URLs would), bomb-guarded decode, resize to 256 like img2dataset, drop
    failures and images under 16 px, clean captions and drop empty ones, drop exact
    duplicates, tiny CLIP score (batched), tiny LLaVA recaption (batched, same prompt and
    length), centre-crop + resize + JPEG at every resolution, one Parquet file.

rows/s/core divides input rows by wall seconds and by the cores a side used (Ray and
img2dataset: ``cores``; the loop: 1). Memory: the peak of the summed PSS of the Ray node's
process tree (GCS, raylet, dashboard, workers) plus this driver, sampled every 1 s, and the
loop process's own peak RSS. Prints a table and appends one JSON line to
benchmarks/results.jsonl. On a shared machine the ratios inside one run are what to compare.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First: sets the offline test environment (HF_HUB_OFFLINE, Ray auth mode) before any library reads it.
from pipeline.stage import LOG_FORMAT  # noqa: E402
from tests.conftest import ray_head  # noqa: E402

MIN_SIDE = 16
STORE_SIDE = 256  # img2dataset keep_ratio_largest, resize_only_if_bigger
RECAP = {"model": "tiny", "max_new_tokens": 8, "batch_size": 16}
TIMEOUT_S = 2  # a slow host (3 s) times out, as a dead LAION host would


class MemorySampler:
    """Peak summed PSS (MB; RSS where the OS has no PSS) of the process trees under ``pids``,
    sampled in a thread."""

    # 1 s, not finer: one sweep reads smaps of ~30 processes (0.1-0.2 s of CPU on a loaded 2-core
    # machine), and at 0.2 s the sampler took a tenth or more of the cores it was measuring.
    def __init__(self, pids: list[int], period_s: float = 1.0):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.period, self.peak, self._stop = period_s, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in self.procs:
                for q in [p, *p.children(recursive=True)]:
                    try:  # PSS: a page shared by n processes counts 1/n in each (torch's libraries)
                        total += getattr(q.memory_full_info(), "pss", 0) or q.memory_info().rss
                    except psutil.Error:
                        pass
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def ray_stages(store, urls, args, cores: int) -> dict:
    # Project imports live in the functions, after tests.conftest set the environment.
    from data_prep import download, recaption, shard
    from data_prep import filter as filt
    from pipeline.config import build

    per_part = math.ceil(args.n / cores / args.rows_per_shard) * args.rows_per_shard
    cfgs = {
        "download": build(download.DownloadConfig, {
            "rows_per_partition": per_part, "rows_per_shard": args.rows_per_shard, "image_size": STORE_SIDE,
            "min_image_size": MIN_SIDE, "threads": args.threads, "cpus_per_task": args.ray_cpus / cores,
            "timeout_s": TIMEOUT_S, "allow_networks": ["127.0.0.1/32"]}, "download"),
        "filter": build(filt.FilterConfig, {
            "clip_model": "tiny-clip", "clip_pretrained": None, "min_clip_sim": -1.0, "min_aesthetic": 0.0,
            "min_side": MIN_SIDE, "max_aspect_ratio": 0.0, "max_uniform_fraction": 0.0, "near_dup_threshold": 0.0,
            "dedup_cluster_size": max(args.n, 1), "batch_size": 64, "min_latin_fraction": 0.0,
            "max_caption_chars": 100_000, "min_caption_words": 1, "actors": cores, "cpus_per_actor": 1.0}, "filter"),
        "recaption": build(recaption.RecaptionConfig, RECAP | {"actors": cores, "cpus_per_actor": 1.0}, "recaption"),
        "shard": build(shard.ShardConfig, {"resolutions": args.resolutions, "rows_per_shard": args.rows_per_shard,
                                           "heldout_fraction": 0.0}, "shard"),
    }
    arts = {name: store.artifact(name, "bench") for name in cfgs}
    inputs = {"download": {"urls": urls}, "filter": {"download": arts["download"]},
              "recaption": {"download": arts["download"], "filter": arts["filter"]},
              "shard": {"download": arts["download"], "filter": arts["filter"], "recaption": arts["recaption"]}}
    mods = {"download": download, "filter": filt, "recaption": recaption, "shard": shard}
    stages = {}
    for name, cfg in cfgs.items():
        t = time.time()
        counts = mods[name].run(inputs[name], cfg, arts[name])
        stages[name] = {"wall_s": round(time.time() - t, 2), "rows_in": counts["rows_in"],
                        "rows_out": counts["rows_out"], "phase_s": counts.get("phase_s"),
                        "peak_rss_mb": counts.get("peak_rss_mb")}
    return stages


def img2dataset_alone(url_parquet: str, out: str, args, cores: int) -> dict:
    """img2dataset's own download of the same list: its processes, its urllib fetch."""
    import img2dataset
    import pyarrow.parquet as pq

    t = time.time()
    img2dataset.download(
        url_list=url_parquet, input_format="parquet", url_col="url", caption_col="caption", output_folder=out,
        output_format="webdataset", processes_count=cores, thread_count=args.threads,
        number_sample_per_shard=args.rows_per_shard, resize_mode="keep_ratio_largest", image_size=STORE_SIDE,
        resize_only_if_bigger=True, min_image_size=MIN_SIDE, encode_quality=95, timeout=TIMEOUT_S,
        enable_wandb=False, extract_exif=False, compute_hash="sha256", incremental_mode="incremental")
    wall = time.time() - t
    ok = sum(pq.read_table(os.path.join(out, f), columns=["status"]).column("status").to_pylist().count("success")
             for f in os.listdir(out) if f.endswith(".parquet"))
    return {"wall_s": round(wall, 2), "rows_out": ok}


def plain_loop(url_parquet: str, out_dir: str, args) -> dict:
    """The same work, one process, no Ray: what one would write without the pipeline."""
    import concurrent.futures
    import urllib.request

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from data_prep import images
    from data_prep.fetch import peak_rss_mb, reset_peak_rss
    from data_prep.models import LlavaCaptioner, clip_transform
    from data_prep.recaption import LLAVA_15_PROMPT, processor_size
    from genmodels.clip import build_clip, encode_image, encode_text_pooled

    reset_peak_rss()
    t0 = time.time()
    model, _, tokenizer = build_clip("tiny-clip")
    transform = clip_transform("tiny-clip", None)
    captioner = LlavaCaptioner("tiny", LLAVA_15_PROMPT, RECAP["max_new_tokens"])
    side = processor_size("tiny")
    table = pq.read_table(url_parquet)

    def get(url: str) -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
                return r.read()
        except Exception:  # noqa: BLE001 - any failure drops the row, as in the pipeline
            return None

    loaded = time.time() - t0
    rows, seen = [], set()
    urls = table.column("url").to_pylist()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        for data, caption, sid in zip(pool.map(get, urls), table.column("caption").to_pylist(),
                                      table.column("sample_id").to_pylist()):
            if data is None:
                continue
            try:
                img = images.decode_rgb(data)
            except images.BadImage:
                continue
            if min(img.size) < MIN_SIDE:
                continue
            if max(img.size) > STORE_SIDE:
                img.thumbnail((STORE_SIDE, STORE_SIDE), Image.Resampling.LANCZOS)
            h = images.content_hash(data)
            caption = images.clean_caption(caption)
            if h in seen or not caption:
                continue
            seen.add(h)
            rows.append({"sample_id": sid, "caption": caption, "img": img})
    fetched = time.time() - t0 - loaded
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        with torch.no_grad():
            x = encode_image(model, torch.stack([transform(r["img"]) for r in chunk]))
            y = encode_text_pooled(model, tokenizer([r["caption"] for r in chunk]))
        for r, s in zip(chunk, (x * y).sum(-1).tolist()):
            r["clip_sim"] = s
    for i in range(0, len(rows), RECAP["batch_size"]):
        chunk = rows[i:i + RECAP["batch_size"]]
        batch = {"image": np.stack([np.asarray(images.center_crop_resize(r["img"], side)) for r in chunk])}
        for r, text in zip(chunk, captioner(batch)["recaption"]):
            r["recaption"] = text
    out = []
    for r in rows:
        rec = {"sample_id": r["sample_id"], "caption": r["caption"], "recaption": r["recaption"],
               "clip_sim": np.float32(r["clip_sim"])}
        for res in args.resolutions:
            rec[f"jpg_{res}"] = images.encode(images.center_crop_resize(r["img"], res), "jpg", 95)
        out.append(rec)
    pq.write_table(pa.Table.from_pylist(out), os.path.join(out_dir, "plain.parquet"))
    wall = time.time() - t0
    return {"wall_s": round(wall, 2), "load_s": round(loaded, 2), "fetch_s": round(fetched, 2), "rows_out": len(out),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="URL rows (scale-mode demo site)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added to every response")
    p.add_argument("--failures", action="store_true", help="LAION-like failure mix (see data_prep/demo/scale.py)")
    p.add_argument("--threads", type=int, default=32, help="download threads per process (all three sides)")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the Ray and img2dataset sides use")
    p.add_argument("--ray-cpus", type=int, default=4, help="Ray's logical CPUs (oversubscribed on small machines)")
    p.add_argument("--skip", nargs="*", default=[], choices=["ray", "img2dataset", "plain"])
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    args = p.parse_args()
    # the stages' progress lines (partition commits, phases with rows/s, summaries)
    logging.basicConfig(level=logging.INFO, **LOG_FORMAT)
    logging.getLogger("genmodels").setLevel(logging.INFO)

    import pyarrow.fs as pafs
    import ray

    from data_prep.demo.scale import ScaleSite, build, serve_scale
    from data_prep.demo.url_list import write_url_parquet
    from pipeline.store import Store

    cores = args.cores
    site = ScaleSite(n=args.n, latency_ms=args.latency_ms, failures=args.failures)
    t = time.time()
    files, behaviour, rows = build(site)
    print(f"scale site: {args.n} rows, {len(files)} files, built in {time.time() - t:.1f}s", flush=True)
    result: dict = {"n_rows": args.n, "cores": cores, "ray_cpus": args.ray_cpus, "threads": args.threads,
                    "latency_ms": args.latency_ms, "failures": args.failures, "resolutions": args.resolutions}
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp, serve_scale(site, files, behaviour) as base:
        fs = pafs.LocalFileSystem()
        store = Store(os.path.join(tmp, "store"))
        urls = store.artifact("urls", "bench")
        write_url_parquet(rows, base, fs, urls.child("urls.parquet"))
        if "plain" not in args.skip:
            result["plain"] = plain_loop(urls.child("urls.parquet"), tmp, args)
            print(f"plain loop: {result['plain']}", flush=True)
        if "img2dataset" not in args.skip:
            with MemorySampler([os.getpid()]) as mem:
                result["img2dataset"] = img2dataset_alone(urls.child("urls.parquet"), os.path.join(tmp, "i2d"), args,
                                                          cores)
            result["img2dataset"]["peak_rss_mb"] = round(mem.peak, 1)
            print(f"img2dataset alone: {result['img2dataset']}", flush=True)
        if "ray" not in args.skip:
            with ray_head(num_cpus=args.ray_cpus) as head:
                ray.init(address=head["address"], log_to_driver=False)
                try:
                    with MemorySampler([head["pid"], os.getpid()]) as mem:
                        t = time.time()
                        stages = ray_stages(store, urls, args, cores)
                        wall = time.time() - t
                finally:
                    ray.shutdown()
            result["ray"] = {"wall_s": round(wall, 2), "stages": stages, "peak_tree_rss_mb": round(mem.peak, 1)}
    report(result)
    if not args.no_record:
        from benchmarks.results import record

        record("data_prep", result | {"machine": platform.platform()})


def report(r: dict) -> None:
    n, cores = r["n_rows"], r["cores"]

    def rate(rows: int, wall: float, c: int) -> float:
        return rows / wall / c if wall > 0 else float("nan")

    lines = [f"\n{'side':<28}{'rows in':>9}{'rows out':>10}{'wall s':>9}{'cores':>7}{'rows/s/core':>13}"]
    ray_r, plain, i2d = r.get("ray"), r.get("plain"), r.get("img2dataset")
    if ray_r:
        for name, s in ray_r["stages"].items():
            lines.append(f"{'ray: ' + name:<28}{s['rows_in']:>9}{s['rows_out']:>10}{s['wall_s']:>9.1f}{cores:>7}"
                         f"{rate(s['rows_in'], s['wall_s'], cores):>13.1f}")
        post = sum(s["wall_s"] for k, s in ray_r["stages"].items() if k != "download")
        lines.append(f"{'ray: filter→shard':<28}{ray_r['stages']['filter']['rows_in']:>9}"
                     f"{ray_r['stages']['shard']['rows_out']:>10}{post:>9.1f}{cores:>7}"
                     f"{rate(ray_r['stages']['filter']['rows_in'], post, cores):>13.1f}")
        lines.append(f"{'ray: end to end':<28}{n:>9}{ray_r['stages']['shard']['rows_out']:>10}{ray_r['wall_s']:>9.1f}"
                     f"{cores:>7}{rate(n, ray_r['wall_s'], cores):>13.1f}")
    if i2d:
        lines.append(f"{'img2dataset alone':<28}{n:>9}{i2d['rows_out']:>10}{i2d['wall_s']:>9.1f}{cores:>7}"
                     f"{rate(n, i2d['wall_s'], cores):>13.1f}")
    if plain:
        rest = plain["wall_s"] - plain["fetch_s"]
        lines.append(f"{'plain: fetch+decode':<28}{n:>9}{'':>10}{plain['fetch_s']:>9.1f}{1:>7}"
                     f"{rate(n, plain['fetch_s'], 1):>13.1f}")
        lines.append(f"{'plain: CLIP→recaption→shard':<28}{plain['rows_out']:>9}{plain['rows_out']:>10}{rest:>9.1f}"
                     f"{1:>7}{rate(plain['rows_out'], rest, 1):>13.1f}")
        lines.append(f"{'plain: end to end':<28}{n:>9}{plain['rows_out']:>10}{plain['wall_s']:>9.1f}{1:>7}"
                     f"{rate(n, plain['wall_s'], 1):>13.1f}")
    ratios = {}
    if ray_r and i2d:
        ratios["download / img2dataset alone"] = i2d["wall_s"] / ray_r["stages"]["download"]["wall_s"]
    if ray_r and plain:
        post = sum(s["wall_s"] for k, s in ray_r["stages"].items() if k != "download")
        ray_post = rate(ray_r["stages"]["filter"]["rows_in"], post, cores)
        ratios["filter→shard / plain"] = ray_post / rate(plain["rows_out"], plain["wall_s"] - plain["fetch_s"], 1)
        ratios["end to end / plain"] = rate(n, ray_r["wall_s"], cores) / rate(n, plain["wall_s"], 1)
    for k, v in ratios.items():
        lines.append(f"ratio per core, {k}: {v:.3f}")
    mem = []
    if ray_r:
        mem.append(f"Ray node + driver tree {ray_r['peak_tree_rss_mb']:.0f} MB")
    if i2d:
        mem.append(f"img2dataset tree {i2d['peak_rss_mb']:.0f} MB")
    if plain:
        mem.append(f"plain loop {plain['peak_rss_mb']:.0f} MB")
    lines.append("peak memory (summed PSS): " + ", ".join(mem))
    print("\n".join(lines))
    r["ratios"] = {k: round(v, 4) for k, v in ratios.items()}


if __name__ == "__main__":
    main()
