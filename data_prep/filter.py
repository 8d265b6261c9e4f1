"""Stage ``filter``: score every downloaded image with CLIP and friends, dedup, decide.

Two Ray Data passes over the ``download`` artifact's tars:

1. **score** (streaming): ``read_webdataset`` → :func:`prepare` (CPU tasks: bomb-guarded
   decode, original size, caption cleanup and heuristics, open_clip preprocessing) →
   :class:`~data_prep.models.ClipScorer` (actor pool: CLIP image/text embeddings, similarity,
   aesthetic / watermark / NSFW heads) → ``scores/shard=<id>/*.parquet``.
2. **decide**: SemDeDup-style near-duplicate removal (Abbas et al., 2023, §3: k-means on the
   CLIP image embeddings, then pairwise cosine inside each cluster; exact duplicates by
   content hash ride along since identical images share a cluster) via
   ``groupby(cluster).map_groups``, plus every threshold → ``rows/shard=<id>/*.parquet``.

Output schema of ``rows/`` (one row per downloaded image, kept or not; ``shard`` from the
hive directory): ``key`` (stage-wide sample key ``<partition>_<img2dataset key>``), ``sample_id``,
``caption`` (cleaned), ``width``/``height`` (stored), ``orig_width``/``orig_height``,
``aspect``, ``sha256``, ``image_error``, ``caption_words``, ``caption_chars``,
``caption_latin``, ``clip_sim``, ``aesthetic``, ``pwatermark``, ``punsafe`` (null when that
head is not configured), ``cluster``, ``dup_of`` (key of the earlier duplicate or ""),
``reject`` (comma-separated reasons, "" when kept), ``keep``. ``shards.parquet`` holds
``shard, rows, kept`` per input shard.

Exactly once: outputs are partitioned by input shard; a shard counts as done only when its
files hold exactly as many rows as its input (row counts from parquet footers). A rerun
deletes incomplete shard directories (a crash mid-write leaves those) and processes only the
missing shards, so no row is lost or written twice.

Counts: ``rows_in``, ``rows_out``, ``rejected``, ``rejected_by_reason`` (a row counts once per
reason it fails), ``skipped`` (heads not configured), ``shards``, ``shards_resumed``, ``rows_per_s``.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import download as download_mod
from data_prep import images
from workflows.config import path_field
from workflows.store import Artifact

log = logging.getLogger("genmodels")

SHARDS = "shards.parquet"
REASONS = ("decode_error", "too_large", "too_small", "bad_aspect", "clip_sim", "aesthetic", "pwatermark", "punsafe",
           "caption_empty", "caption_short", "caption_long", "caption_language", "dup_exact", "dup_near")


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the filter stage (``stages.filter``). Defaults are LAION-5B's paper values.

    clip_model / clip_pretrained: open_clip model name and pretrained tag (or checkpoint path);
        ``tiny-clip`` with no tag is the random offline model. LAION's 0.28 threshold is for
        ViT-B/32; other models need their own threshold.
    aesthetic_head / watermark_head / nsfw_head: weight files of heads on the CLIP image
        embedding (see :class:`data_prep.models.EmbeddingHead`); empty → that score is not
        computed (null column, listed under ``skipped`` in the counts) and its threshold unused.
    min_clip_sim: reject below this image-caption cosine similarity (LAION: 0.28).
    min_aesthetic: reject below this aesthetic score (LAION-Aesthetics: 5.0).
    max_pwatermark / max_punsafe: reject above these probabilities (LAION: 0.5 / 0.99... for
        "unsafe" LAION tagged rather than removed; 0.99 keeps all but the surest).
    min_side: reject images whose original shorter side is smaller (pixels; paper runs 512).
    max_aspect_ratio: reject long/short side above this (0: off).
    min_caption_words / max_caption_chars: caption length bounds after cleanup
        (0 words is always rejected as ``caption_empty``).
    min_latin_fraction: reject captions with a smaller share of Latin-script letters (0: off).
    dedup_exact: reject later copies of byte-identical downloads (sha256).
    near_dup_threshold: reject a row whose embedding has cosine ≥ this with an earlier kept
        candidate in its cluster (0: off). Earlier = smaller (shard, key).
    dedup_cluster_size: target rows per k-means cluster (k = ceil(rows / this)).
    dedup_sample: rows used to fit the k-means centroids.
    batch_size: rows per CLIP forward pass; actors: CLIP actor pool size.
    num_gpus: GPUs per CLIP actor (fractional ok); GPU actors request 0 CPUs.
    actor_num_cpus: CPUs per CLIP actor when on CPU (fractional so that a 2-CPU node still has
        slots for the read and preprocessing tasks; see environment.md).
    prep_num_cpus: CPUs per preprocessing task.
    max_image_pixels: decompression-bomb guard for decoding.
    """

    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    aesthetic_head: str = path_field("")
    watermark_head: str = path_field("")
    nsfw_head: str = path_field("")
    min_clip_sim: float = 0.28
    min_aesthetic: float = 5.0
    max_pwatermark: float = 0.5
    max_punsafe: float = 0.99
    min_side: int = 512
    max_aspect_ratio: float = 0.0
    min_caption_words: int = 1
    max_caption_chars: int = 1000
    min_latin_fraction: float = 0.5
    dedup_exact: bool = True
    near_dup_threshold: float = 0.96
    dedup_cluster_size: int = 10_000
    dedup_sample: int = 100_000
    batch_size: int = 64
    actors: int = 1
    num_gpus: float = 0.0
    actor_num_cpus: float = 0.5
    prep_num_cpus: float = 1.0
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        for name in ("batch_size", "actors", "dedup_cluster_size", "dedup_sample", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold: must be in [0, 1] (0: off), got {self.near_dup_threshold}")
        if self.num_gpus < 0 or self.actor_num_cpus < 0 or self.prep_num_cpus <= 0:
            raise ValueError("num_gpus: GPU/CPU requests must be positive")

    def heads(self) -> dict[str, str | None]:
        return {"aesthetic": self.aesthetic_head or None, "pwatermark": self.watermark_head or None,
                "punsafe": self.nsfw_head or None}


# ---------------------------------------------------------------------------------------------
# Per-shard bookkeeping shared by the filter and recaption stages
# ---------------------------------------------------------------------------------------------


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
    interrupted write (or of an older run), which is why it is safe to delete.
    """
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


def tar_shards(download: Artifact) -> tuple[dict[str, int], dict[str, str]]:
    """(samples per shard, tar path in the download fs → shard) from the download index."""
    index = download_mod.read_index(download)
    return {r["shard"]: int(r["ok"]) for r in index}, {download.child(r["tar"]): r["shard"] for r in index}


def read_tars(download: Artifact, shards: list[str], path_to_shard: dict[str, str]):
    import ray

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
            "caption": [images.clean_caption(m.get("caption")) for m in metas], "meta": metas, "data": data}


# ---------------------------------------------------------------------------------------------
# Pass 1: score
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _transform(model: str, pretrained: str | None):
    from data_prep.models import clip_transform

    return clip_transform(model, pretrained)


def prepare(batch: dict[str, Any], *, model: str, pretrained: str | None, path_to_shard: dict[str, str],
            max_pixels: int) -> dict[str, Any]:
    """Raw webdataset rows → metadata columns + CLIP-ready ``pixels`` (float16); never raises
    on a bad image or caption (the row is kept and flagged in ``image_error``)."""
    import torch

    torch.set_num_threads(1)
    cols = sample_columns(batch, path_to_shard)
    transform = _transform(model, pretrained)
    size = transform.transforms[0].size if hasattr(transform.transforms[0], "size") else None
    draft = size if isinstance(size, int) else None
    pixels, errors, ow, oh, sha = [], [], [], [], []
    blank = None
    for data, meta in zip(cols["data"], cols["meta"]):
        sha.append(meta.get("sha256") or images.content_hash(data))
        w0, h0 = meta.get("original_width"), meta.get("original_height")
        try:
            if not (w0 and h0):  # not an img2dataset tar: the header has the original size
                w0, h0 = images.open_image(data, max_pixels).size
            img = images.decode_rgb(data, max_pixels, draft=draft)
            x = transform(img).numpy().astype(np.float16)
            blank = np.zeros_like(x) if blank is None else blank
            errors.append("")
        except images.BadImage as e:
            x, w0, h0 = None, w0 or 0, h0 or 0
            errors.append(e.reason)
        pixels.append(x)
        ow.append(int(w0 or 0))
        oh.append(int(h0 or 0))
    if blank is None:  # every image in the batch was bad: shape from a dummy image
        from PIL import Image

        blank = np.zeros_like(transform(Image.new("RGB", (8, 8))).numpy(), dtype=np.float16)
    caps = cols["caption"]
    return {
        "shard": np.array(cols["shard"], dtype=object), "key": np.array(cols["key"], dtype=object),
        "sample_id": np.array(cols["sample_id"], dtype=object), "caption": np.array(caps, dtype=object),
        "width": np.array([int(m.get("width") or 0) for m in cols["meta"]], dtype=np.int32),
        "height": np.array([int(m.get("height") or 0) for m in cols["meta"]], dtype=np.int32),
        "orig_width": np.array(ow, dtype=np.int32), "orig_height": np.array(oh, dtype=np.int32),
        "sha256": np.array(sha, dtype=object), "image_error": np.array(errors, dtype=object),
        "caption_words": np.array([len(c.split()) for c in caps], dtype=np.int32),
        "caption_chars": np.array([len(c) for c in caps], dtype=np.int32),
        "caption_latin": np.array([images.latin_fraction(c) for c in caps], dtype=np.float32),
        "pixels": np.stack([blank if x is None else x for x in pixels]) if pixels else blank[None][:0],
    }


def actor_resources(num_gpus: float, num_cpus: float) -> dict[str, float]:
    """GPU actors ask for no CPU so that CPU slots on GPU nodes stay free for the transforms."""
    return {"num_gpus": num_gpus, "num_cpus": 0} if num_gpus > 0 else {"num_cpus": num_cpus}


def score(download: Artifact, shards: list[str], path_to_shard: dict[str, str], cfg: FilterConfig, out: Artifact) -> None:
    import ray

    from data_prep.models import ClipScorer

    ds = read_tars(download, shards, path_to_shard)
    ds = ds.map_batches(prepare, batch_size=cfg.batch_size, num_cpus=cfg.prep_num_cpus, batch_format="numpy",
                        fn_kwargs={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained,
                                   "path_to_shard": path_to_shard, "max_pixels": cfg.max_image_pixels})
    ds = ds.map_batches(ClipScorer, batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                        fn_constructor_kwargs={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained,
                                               "heads": cfg.heads()},
                        **actor_resources(cfg.num_gpus, cfg.actor_num_cpus))
    write_by_shard(ds, out, "scores")


# ---------------------------------------------------------------------------------------------
# Pass 2: dedup and decide
# ---------------------------------------------------------------------------------------------


def _embeddings(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def fit_centroids(out: Artifact, shards: list[str], k: int, sample: int, iters: int = 10) -> np.ndarray:
    """Spherical k-means on the first ``sample`` rows in (shard, key) order: deterministic, so a
    rerun after a crash assigns the same clusters and makes the same dedup decisions."""
    parts, n = [], 0
    for shard in sorted(shards):
        t = read_shard_rows(out, "scores", shard, ["key", "embedding"])
        parts.append(_embeddings(t))
        n += t.num_rows
        if n >= sample:
            break
    x = np.concatenate(parts)[:sample]
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    k = min(k, len(x))
    c = x[np.linspace(0, len(x) - 1, k).astype(int)].copy()
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                m = members.mean(0)
                c[j] = m / (np.linalg.norm(m) + 1e-8)
    return c


def assign_cluster(batch: pa.Table, *, centroids: np.ndarray) -> pa.Table:
    x = _embeddings(batch)
    cluster = (x @ centroids.T).argmax(1).astype(np.int32) if len(centroids) > 1 else np.zeros(len(x), np.int32)
    return batch.append_column("cluster", pa.array(cluster))


def reasons_for(t: pa.Table, cfg: FilterConfig) -> list[list[str]]:
    """Threshold reasons per row (dedup reasons are added by :func:`decide`)."""
    def col(name):
        return t.column(name).to_numpy(zero_copy_only=False)

    err = t.column("image_error").to_pylist()
    w, h = col("orig_width"), col("orig_height")
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    aspect = long_ / np.maximum(short, 1)
    words, chars, latin, sim = col("caption_words"), col("caption_chars"), col("caption_latin"), col("clip_sim")
    heads = {"aesthetic": ("<", cfg.min_aesthetic), "pwatermark": (">", cfg.max_pwatermark),
             "punsafe": (">", cfg.max_punsafe)}
    head_vals = {k: t.column(k).to_pylist() for k in heads}
    out = []
    for i in range(t.num_rows):
        r = []
        if err[i]:
            r.append(err[i])
        else:
            if short[i] < cfg.min_side:
                r.append("too_small")
            if cfg.max_aspect_ratio and aspect[i] > cfg.max_aspect_ratio:
                r.append("bad_aspect")
            if sim[i] < cfg.min_clip_sim:
                r.append("clip_sim")
            for name, (op, thr) in heads.items():
                v = head_vals[name][i]
                if v is not None and (v < thr if op == "<" else v > thr):
                    r.append(name)
        if words[i] == 0:
            r.append("caption_empty")
        elif words[i] < cfg.min_caption_words:
            r.append("caption_short")
        if chars[i] > cfg.max_caption_chars:
            r.append("caption_long")
        if cfg.min_latin_fraction and words[i] and latin[i] < cfg.min_latin_fraction:
            r.append("caption_language")
        out.append(r)
    return out


def decide(group: pa.Table, *, cfg: FilterConfig) -> pa.Table:
    """One cluster: thresholds, then exact and near duplicates among the rows that pass them.

    Candidates are visited in (shard, key) order; a row is an exact duplicate when an earlier
    candidate has its sha256, a near duplicate when an earlier kept candidate has cosine ≥
    ``near_dup_threshold`` (SemDeDup, Abbas et al. 2023, §3). The first of a group is kept.
    """
    group = group.sort_by([("shard", "ascending"), ("key", "ascending")])
    reasons = reasons_for(group, cfg)
    keys, sha = group.column("key").to_pylist(), group.column("sha256").to_pylist()
    dup_of = [""] * group.num_rows
    cand = [i for i, r in enumerate(reasons) if not r]
    if cand:
        first_by_hash: dict[str, int] = {}
        if cfg.dedup_exact:
            for i in cand:
                j = first_by_hash.setdefault(sha[i], i)
                if j != i:
                    reasons[i].append("dup_exact")
                    dup_of[i] = keys[j]
        if cfg.near_dup_threshold > 0:
            rest = [i for i in cand if not reasons[i]]
            for i, j in near_duplicates(_embeddings(group.take(rest)), cfg.near_dup_threshold).items():
                reasons[rest[i]].append("dup_near")
                dup_of[rest[i]] = keys[rest[j]]
    group = group.drop_columns(["embedding"])
    group = group.append_column("dup_of", pa.array(dup_of, pa.string()))
    group = group.append_column("reject", pa.array([",".join(r) for r in reasons], pa.string()))
    return group.append_column("keep", pa.array([not r for r in reasons], pa.bool_()))


def near_duplicates(x: np.ndarray, threshold: float, chunk: int = 1024) -> dict[int, int]:
    """Greedy in row order: row i is a duplicate of the most similar earlier *kept* row when
    their cosine is ≥ ``threshold``; returns {duplicate: kept}. Memory O(chunk * kept)."""
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    kept: list[int] = []
    dups: dict[int, int] = {}
    for a in range(0, len(x), chunk):
        block = x[a:a + chunk]
        prev = block @ x[kept].T if kept else np.zeros((len(block), 0), np.float32)
        intra = block @ block.T
        local: list[int] = []
        for r in range(len(block)):
            best, val = -1, -np.inf
            if prev.shape[1]:
                j = int(prev[r].argmax())
                best, val = kept[j], prev[r, j]
            if local:
                q = int(np.argmax(intra[r, local]))
                if intra[r, local[q]] > val:
                    best, val = a + local[q], intra[r, local[q]]
            if val >= threshold:
                dups[a + r] = best
            else:
                local.append(r)
        kept += [a + q for q in local]
    return dups


def keep_shards(batch: pa.Table, *, shards: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("shard"), value_set=pa.array(shards, pa.string())))


def decide_all(out: Artifact, expected: dict[str, int], pending: list[str], cfg: FilterConfig) -> None:
    import ray

    n_rows = sum(expected.values())
    k = max(1, -(-n_rows // cfg.dedup_cluster_size))
    centroids = fit_centroids(out, [s for s, n in expected.items() if n], k, cfg.dedup_sample) if k > 1 else np.zeros((1, 1))
    ds = ray.data.read_parquet(out.child("scores"), filesystem=out.fs, partitioning=_hive())
    ds = ds.map_batches(assign_cluster, batch_format="pyarrow", fn_kwargs={"centroids": centroids})
    ds = ds.groupby("cluster", num_partitions=min(k, 64)).map_groups(decide, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    ds = ds.map_batches(keep_shards, batch_format="pyarrow", fn_kwargs={"shards": pending})
    write_by_shard(ds, out, "rows")


def tally(batch: pa.Table, *, keys: list[str]) -> pa.Table:
    """Row counts per distinct ``keys`` within one batch; summed on the driver (tiny), which
    avoids a shuffle for what is only a count."""
    return batch.group_by(keys).aggregate([([], "count_all")])


def _hive():
    from ray.data.datasource import Partitioning

    return Partitioning("hive", field_types={"shard": str})


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------


def run(inputs: dict[str, Artifact], cfg: FilterConfig, out: Artifact) -> dict[str, Any]:
    import ray

    download = inputs["download"]
    expected, path_to_shard = tar_shards(download)
    t0 = time.time()
    todo_scores = pending_shards(out, "scores", expected)
    todo_rows = pending_shards(out, "rows", expected)
    rows_todo = sum(expected[s] for s in todo_rows)
    log.info("[filter] %d shards, %d rows; scoring %d shards, deciding %d", len(expected), sum(expected.values()),
             len(todo_scores), len(todo_rows))
    if todo_scores:
        score(download, todo_scores, path_to_shard, cfg, out)
        still = pending_shards(out, "scores", expected)
        if still:
            raise RuntimeError(f"filter: scores incomplete after the pass for shards {still[:5]}")
    if todo_rows:
        if out.exists(SHARDS):
            out.fs.delete_file(out.child(SHARDS))
        decide_all(out, expected, todo_rows, cfg)
        still = pending_shards(out, "rows", expected)
        if still:
            raise RuntimeError(f"filter: rows incomplete after the pass for shards {still[:5]}")
    wall = time.time() - t0

    by_reason: Counter = Counter()
    per_shard: dict[str, list[int]] = {s: [0, 0] for s in expected}
    if any(expected.values()):
        tallies = (ray.data.read_parquet(out.child("rows"), filesystem=out.fs, columns=["shard", "reject"],
                                         partitioning=_hive())
                   .map_batches(tally, batch_format="pyarrow", fn_kwargs={"keys": ["shard", "reject"]}).take_all())
        for row in tallies:
            n = row["count_all"]
            per_shard[row["shard"]][0] += n
            if row["reject"]:
                by_reason.update({r: n for r in row["reject"].split(",")})
            else:
                per_shard[row["shard"]][1] += n
    table = pa.table({"shard": list(per_shard), "rows": [v[0] for v in per_shard.values()],
                      "kept": [v[1] for v in per_shard.values()]})
    out.write_parquet(SHARDS, table)

    rows_in = sum(expected.values())
    kept = sum(v[1] for v in per_shard.values())
    skipped = [k for k, v in cfg.heads().items() if not v]
    counts = {"rows_in": rows_in, "rows_out": kept, "rejected": rows_in - kept,
              "rejected_by_reason": {r: by_reason[r] for r in REASONS if by_reason.get(r)} |
                                    {r: n for r, n in by_reason.items() if r not in REASONS},
              "skipped": skipped, "shards": len(expected), "shards_resumed": len(expected) - len(todo_rows),
              "rows_per_s": round(rows_todo / wall, 2) if rows_todo and wall > 0 else None}
    log.info("[filter] summary: rows in %d, rows out %d, rejected %s, skipped %s, %.1f rows/s", rows_in, kept,
             json.dumps(counts["rejected_by_reason"]), skipped or "nothing", counts["rows_per_s"] or 0.0)
    return counts


def read_shards(art: Artifact) -> dict[str, dict[str, int]]:
    """``shards.parquet`` of a filter artifact: shard → {rows, kept}."""
    t = pq.read_table(art.child(SHARDS), filesystem=art.fs)
    return {r["shard"]: {"rows": r["rows"], "kept": r["kept"]} for r in t.to_pylist()}
