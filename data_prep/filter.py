"""Stage ``filter``: score every downloaded image with CLIP and friends, dedup, decide.

Two passes over the ``download`` artifact's tars:

1. **score** (Ray Data, streaming): ``read_webdataset`` → :func:`prepare` (bomb-guarded
   decode, stored and original size, blank check, LAION's scores from the json, caption
   cleanup and heuristics, open_clip preprocessing) →
   :class:`~data_prep.models.ClipScorer` (actor pool: CLIP image/text embeddings, similarity,
   aesthetic / watermark / NSFW heads) → ``scores/shard=<id>/*.parquet``. With GPU actors
   :func:`prepare` runs in CPU tasks that feed them; on CPU the actors run it themselves
   (:class:`PreparingScorer`), in plain Ray tasks unless ``task_rows`` is 0
   (:func:`data_prep.partitions.task_pass`: the same scorer, one file per shard).
2. **decide**: SemDeDup-style near-duplicate removal (:mod:`data_prep.dedup`; Abbas et al.,
   2023, §3: k-means on the CLIP image embeddings, then pairwise cosine inside each cluster;
   exact duplicates by content hash ride along since identical images share a cluster) via
   Ray Data ``groupby(cluster).map_groups``, plus every threshold → ``rows/shard=<id>/*.parquet``.
   With one cluster (at most ``dedup_cluster_size`` rows) there is nothing to shuffle: the
   rows are decided in one call on the driver (:func:`decide_one_cluster`).

Output schema of ``rows/`` (one row per downloaded image, kept or not; ``shard`` from the
hive directory): ``key`` (stage-wide sample key ``<partition>_<img2dataset key>``), ``sample_id``,
``caption`` (cleaned), ``labels`` (the URL list's ``labels`` string, null when absent),
``width``/``height`` (the stored image, from its header),
``orig_width``/``orig_height`` (the source, from img2dataset; the stored size otherwise),
``uniform_fraction`` (:func:`data_prep.images.uniform_fraction` of the stored image; null when
the blank check is off),
``sha256``, ``image_error``, ``caption_words``, ``caption_chars``, ``caption_latin``,
``clip_sim``, ``aesthetic``, ``pwatermark``, ``punsafe`` (the scores the decision used: LAION's
where the input row carried one, else the model's; null when neither exists),
``laion_scores`` (which of those four came from LAION, comma-separated), the LAION inputs
``laion_similarity``, ``laion_aesthetic``, ``laion_pwatermark``, ``laion_punsafe`` (null when
absent), ``cluster``, ``dup_of`` (key of the earlier duplicate or ""), ``reject``
(comma-separated reasons, "" when kept), ``keep``. ``scores/`` keeps the model's own scores.
``shards.parquet`` holds ``shard, rows, kept`` per input shard.

LAION's scores: the urls stage carries LAION's per-row ``similarity``, ``AESTHETIC_SCORE``,
``pwatermark`` and ``punsafe`` as ``laion_*`` columns, which reach this stage through each
sample's json. Where a row has one (and ``use_laion_scores``), its threshold is applied to
LAION's value instead of the model's; rows without it fall back to the model. LAION's
similarity is OpenAI ViT-B/32's, so ``min_clip_sim`` then compares two different models'
cosines unless ``clip_model`` is ViT-B-32 with ``openai`` weights (the stage warns when a run
mixes the two sources with another model).

Exactly once (:mod:`data_prep.partitions`): outputs are partitioned by input shard; a shard
counts as done only when its files hold exactly as many rows as its input (parquet footers).
A rerun deletes incomplete shard directories (a crash mid-write leaves those) and processes
only the missing shards, so no row is lost or written twice.

Counts: ``rows_in``, ``rows_out``, ``rejected``, ``rejected_by_reason`` (a row counts once per
reason it fails), ``skipped`` (heads not configured), ``scores_from_laion`` and
``scores_computed`` (per score, the decoded rows whose threshold used LAION's value or the
model's), ``shards``, ``shards_resumed``, ``rows_per_s``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from data_prep import dedup, images
from data_prep.filter_config import IMAGE_ERRORS, LAION, REASONS, FilterConfig
from data_prep.partitions import (
    SHARDS,
    in_tasks_label,
    pending_shards,
    read_by_shard,
    read_shard_rows,
    read_tars,
    sample_columns,
    tally_files,
    tar_shards,
    task_pass,
    write_by_shard,
    write_shard_file,
    write_shards,
)
from data_prep.progress import Phases
from pipeline.stage import actor_resources
from pipeline.store import Artifact

log = logging.getLogger("genmodels")

__all__ = ["IMAGE_ERRORS", "LAION", "REASONS", "FilterConfig", "decide", "prepare", "run", "summarize"]

# ---------------------------------------------------------------------------------------------
# Pass 1: score
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _transform(model: str, pretrained: str | None):
    from data_prep.models import clip_transform  # lazy: open_clip and torch, only in the prep workers

    return clip_transform(model, pretrained)


def laion_score(value: Any) -> float:
    """A ``laion_*`` value from a sample's json as a float; NaN when absent or not a number."""
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def prepare(batch: dict[str, Any], *, model: str, pretrained: str | None, path_to_shard: dict[str, str],
            max_pixels: int, uniform_check: bool = True) -> dict[str, Any]:
    """Raw webdataset rows → metadata columns + CLIP-ready ``pixels`` (float16); never raises
    on a bad image or caption (the row is kept and flagged in ``image_error``).

    ``width``/``height`` are the stored image's, read from its header (the file is the truth;
    the json's copy is not needed); ``orig_width``/``orig_height`` are img2dataset's source size
    when the json has it. ``laion_*`` columns are NaN where absent (nulls in ``rows/``).
    """
    import torch  # lazy: only the prep workers need torch

    torch.set_num_threads(1)
    cols = sample_columns(batch, path_to_shard)
    transform = _transform(model, pretrained)
    size = transform.transforms[0].size if hasattr(transform.transforms[0], "size") else None
    draft = size if isinstance(size, int) else None
    pixels, errors, sw, sh, ow, oh, uniform, sha = [], [], [], [], [], [], [], []
    blank = None
    for data, meta in zip(cols["data"], cols["meta"]):
        sha.append(meta.get("sha256") or images.content_hash(data))
        w, h = int(meta.get("width") or 0), int(meta.get("height") or 0)
        w0, h0 = meta.get("original_width"), meta.get("original_height")
        u = np.nan
        try:
            opened = images.open_image(data, max_pixels)
            w, h = opened.size
            w0, h0 = (w0, h0) if (w0 and h0) else (w, h)  # not an img2dataset tar: the file is the original
            img = images.load_rgb(opened, draft=draft)
            u = images.uniform_fraction(img) if uniform_check else np.nan  # ms per row: only when used
            x = transform(img).numpy().astype(np.float16)
            blank = np.zeros_like(x) if blank is None else blank
            errors.append("")
        except images.BadImage as e:
            x = None
            errors.append(e.reason)
        pixels.append(x)
        sw.append(w)
        sh.append(h)
        ow.append(int(w0 or 0))
        oh.append(int(h0 or 0))
        uniform.append(u)
    if blank is None:  # every image in the batch was bad: shape from a dummy image
        blank = np.zeros_like(transform(Image.new("RGB", (8, 8))).numpy(), dtype=np.float16)
    caps = cols["caption"]
    return {
        "shard": np.array(cols["shard"], dtype=object), "key": np.array(cols["key"], dtype=object),
        "sample_id": np.array(cols["sample_id"], dtype=object), "caption": np.array(caps, dtype=object),
        "labels": np.array(cols["labels"], dtype=object),
        "width": np.array(sw, dtype=np.int32), "height": np.array(sh, dtype=np.int32),
        "orig_width": np.array(ow, dtype=np.int32), "orig_height": np.array(oh, dtype=np.int32),
        "uniform_fraction": np.array(uniform, dtype=np.float32),
        "sha256": np.array(sha, dtype=object), "image_error": np.array(errors, dtype=object),
        "caption_words": np.array([len(c.split()) for c in caps], dtype=np.int32),
        "caption_chars": np.array([len(c) for c in caps], dtype=np.int32),
        "caption_latin": np.array([images.latin_fraction(c) for c in caps], dtype=np.float32),
        **{col: np.array([laion_score(m.get(col)) for m in cols["meta"]], dtype=np.float32) for col in LAION.values()},
        "pixels": np.stack([blank if x is None else x for x in pixels]) if pixels else blank[None][:0],
    }


class PreparingScorer:
    """CPU actors: :func:`prepare` and :class:`~data_prep.models.ClipScorer` in one process.

    On a CPU node a separate preprocessing task only adds cost: its float pixels cross the
    object store, and its worker processes import torch and open_clip a second time (seconds
    each; the whole stage's fixed cost at demo scale). GPU actors keep the split, so the GPU
    is fed by CPU tasks instead of waiting on decodes."""

    def __init__(self, *, model: str, pretrained: str | None, heads: dict[str, str | None],
                 path_to_shard: dict[str, str], max_pixels: int, uniform_check: bool = True):
        from data_prep.models import ClipScorer  # lazy: open_clip and torch, only in the actors

        self.scorer = ClipScorer(model, pretrained, heads)
        self.prepare = functools.partial(prepare, model=model, pretrained=pretrained, path_to_shard=path_to_shard,
                                         max_pixels=max_pixels, uniform_check=uniform_check)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return self.scorer(self.prepare(batch))


def score(download: Artifact, rows: dict[str, int], path_to_shard: dict[str, str], cfg: FilterConfig,
          out: Artifact, tasks: int) -> None:
    """The score pass over the shards of ``rows`` (shard → rows): in ``tasks`` Ray tasks, or the
    Ray Data pipeline above when 0."""
    model = {"model": cfg.clip_model, "pretrained": cfg.clip_pretrained}
    raw = {"path_to_shard": path_to_shard, "max_pixels": cfg.max_image_pixels,
           "uniform_check": cfg.max_uniform_fraction > 0}
    if tasks:  # before the imports below: the driver needs neither Ray Data nor the models here
        make = functools.partial(PreparingScorer, **model, **raw, heads=cfg.heads())
        task_pass(make, download, rows, path_to_shard, out, "scores", cfg.batch_size, cfg.cpus_per_actor, tasks,
                  "filter")
        return

    import ray  # lazy: Ray is only needed inside a running stage

    from data_prep.models import ClipScorer  # lazy: open_clip and torch, only in the actors

    ds = read_tars(download, list(rows), path_to_shard)
    if cfg.gpus_per_actor > 0:
        ds = ds.map_batches(prepare, batch_size=cfg.batch_size, num_cpus=cfg.cpus_per_task, batch_format="numpy",
                            fn_kwargs=model | raw)
        fn, kwargs = ClipScorer, model | {"heads": cfg.heads()}
    else:
        fn, kwargs = PreparingScorer, model | raw | {"heads": cfg.heads()}
    ds = ds.map_batches(fn, batch_size=cfg.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors), fn_constructor_kwargs=kwargs,
                        **actor_resources(cfg))
    write_by_shard(ds, out, "scores")


# ---------------------------------------------------------------------------------------------
# Pass 2: dedup and decide
# ---------------------------------------------------------------------------------------------


def floats(t: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as float64 with NaN for nulls (all NaN when the column is absent)."""
    if name not in t.column_names:
        return np.full(t.num_rows, np.nan)
    return pc.fill_null(t.column(name).cast(pa.float64()), np.nan).to_numpy()


def decision_scores(t: pa.Table, cfg: FilterConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per score in :data:`LAION`, the values its threshold is applied to (NaN: none), and per
    score and row whether that value is LAION's (bool array, scores x rows).

    LAION's value wins where present (and ``use_laion_scores``); the model's fills the rest.
    Rows with an image error use neither (no image check runs on them).
    """
    decoded = np.array([not e for e in t.column("image_error").to_pylist()], dtype=bool)
    values, from_laion = {}, []
    for name, laion_col in LAION.items():
        laion, model = floats(t, laion_col), floats(t, name)
        use = decoded & ~np.isnan(laion) & cfg.use_laion_scores
        values[name] = np.where(use, laion, model)
        from_laion.append(use)
    return values, np.array(from_laion, dtype=bool).reshape(len(LAION), t.num_rows)


def reasons_for(t: pa.Table, cfg: FilterConfig, scores: dict[str, np.ndarray] | None = None) -> list[list[str]]:
    """Threshold reasons per row (dedup reasons are added by :func:`decide`).

    Size and aspect look at both the stored image (``width``/``height``) and the original
    (``orig_*``): a source resized on download keeps its aspect but can end up far smaller.
    """
    def col(name):
        return t.column(name).to_numpy(zero_copy_only=False)

    err = t.column("image_error").to_pylist()
    sizes = [(col("width"), col("height")), (col("orig_width"), col("orig_height"))]
    short = np.minimum.reduce([np.minimum(w, h) for w, h in sizes])
    aspect = np.maximum.reduce([np.maximum(w, h) / np.maximum(np.minimum(w, h), 1) for w, h in sizes])
    uniform = floats(t, "uniform_fraction")
    words, chars, latin = col("caption_words"), col("caption_chars"), col("caption_latin")
    scores = decision_scores(t, cfg)[0] if scores is None else scores
    limits = {"clip_sim": ("<", cfg.min_clip_sim), "aesthetic": ("<", cfg.min_aesthetic),
              "pwatermark": (">", cfg.max_pwatermark), "punsafe": (">", cfg.max_punsafe)}
    fails = {name: (scores[name] < thr) if op == "<" else (scores[name] > thr) for name, (op, thr) in limits.items()}
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
            if cfg.max_uniform_fraction and uniform[i] >= cfg.max_uniform_fraction:
                r.append("blank")
            r += [name for name, f in fails.items() if f[i]]  # NaN (not scored) never fails
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


def with_decision_scores(t: pa.Table, scores: dict[str, np.ndarray], from_laion: np.ndarray) -> pa.Table:
    """Score columns replaced by the values the decision used, ``laion_*`` inputs with nulls
    for absent values, and ``laion_scores`` naming the scores that came from LAION."""
    def nullable(x):
        return pa.array(x.astype(np.float32), mask=np.isnan(x))

    for name, x in scores.items():
        t = t.set_column(t.column_names.index(name), name, nullable(x)) if name in t.column_names else \
            t.append_column(name, nullable(x))
    for col in LAION.values():
        x = floats(t, col)
        t = t.set_column(t.column_names.index(col), col, nullable(x)) if col in t.column_names else \
            t.append_column(col, nullable(x))
    names = list(LAION)
    used = [",".join(n for n, u in zip(names, row) if u) for row in from_laion.T]
    return t.append_column("laion_scores", pa.array(used, pa.string()))


def decide(group: pa.Table, *, cfg: FilterConfig) -> pa.Table:
    """One cluster: thresholds, then exact and near duplicates among the rows that pass them.

    Candidates are visited in (shard, key) order; a row is an exact duplicate when an earlier
    candidate has its sha256, a near duplicate when an earlier kept candidate has cosine ≥
    ``near_dup_threshold`` (SemDeDup, Abbas et al. 2023, §3). The first of a group is kept.
    """
    group = group.sort_by([("shard", "ascending"), ("key", "ascending")])
    scores, from_laion = decision_scores(group, cfg)
    reasons = reasons_for(group, cfg, scores)
    keys, sha = group.column("key").to_pylist(), group.column("sha256").to_pylist()
    dup_of = [""] * group.num_rows
    cand = [i for i, r in enumerate(reasons) if not r]
    if cand and cfg.dedup_exact:
        for i, j in dedup.exact_duplicates([sha[i] for i in cand]).items():
            reasons[cand[i]].append("dup_exact")
            dup_of[cand[i]] = keys[cand[j]]
    if cand and cfg.near_dup_threshold > 0:
        rest = [i for i in cand if not reasons[i]]
        for i, j in dedup.near_duplicates(dedup.embeddings(group.take(rest)), cfg.near_dup_threshold).items():
            reasons[rest[i]].append("dup_near")
            dup_of[rest[i]] = keys[rest[j]]
    group = with_decision_scores(group.drop_columns(["embedding"]), scores, from_laion)
    group = group.append_column("dup_of", pa.array(dup_of, pa.string()))
    group = group.append_column("reject", pa.array([",".join(r) for r in reasons], pa.string()))
    return group.append_column("keep", pa.array([not r for r in reasons], pa.bool_()))


def keep_shards(batch: pa.Table, *, shards: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("shard"), value_set=pa.array(shards, pa.string())))


def decide_one_cluster(out: Artifact, expected: dict[str, int], pending: list[str], cfg: FilterConfig) -> None:
    """k = 1: every row is in the one cluster, so :func:`decide` sees them all at once anyway;
    read the scores (at most ``dedup_cluster_size`` rows) here and write each pending shard's
    rows as one file, without the shuffle (its operators and tasks cost seconds to start)."""
    parts = []
    for shard in sorted(s for s, n in expected.items() if n):
        t = read_shard_rows(out, "scores", shard)
        parts.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.string())))
    rows = decide(pa.concat_tables(parts, promote_options="default"), cfg=cfg)
    for shard in pending:
        write_shard_file(out, "rows", shard, rows.filter(pc.equal(rows.column("shard"), shard)))


def decide_all(out: Artifact, expected: dict[str, int], pending: list[str], cfg: FilterConfig) -> None:
    n_rows = sum(expected.values())
    k = max(1, -(-n_rows // cfg.dedup_cluster_size))
    if k == 1:
        decide_one_cluster(out, expected, pending, cfg)
        return
    centroids = (dedup.fit_centroids(out, [s for s, n in expected.items() if n], k, cfg.dedup_sample) if k > 1
                 else np.zeros((1, 1)))
    ds = read_by_shard(out, "scores")
    ds = ds.map_batches(dedup.assign_cluster, batch_format="pyarrow", fn_kwargs={"centroids": centroids})
    ds = ds.groupby("cluster", num_partitions=min(k, 64)).map_groups(decide, batch_format="pyarrow",
                                                                      fn_kwargs={"cfg": cfg})
    ds = ds.map_batches(keep_shards, batch_format="pyarrow", fn_kwargs={"shards": pending})
    write_by_shard(ds, out, "rows")


# ---------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------


TALLY_KEYS = ["shard", "reject", "laion_scores"]


def summarize(tallies: list[dict[str, Any]], expected: dict[str, int],
              cfg: FilterConfig) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """(shard → (rows, kept), counts) from row counts per distinct :data:`TALLY_KEYS`."""
    by_reason: Counter = Counter()
    from_laion: Counter = Counter()
    per_shard: dict[str, list[int]] = {s: [0, 0] for s in expected}
    for row in tallies:
        n = row["count_all"]
        per_shard[row["shard"]][0] += n
        if row["reject"]:
            by_reason.update({r: n for r in row["reject"].split(",")})
        else:
            per_shard[row["shard"]][1] += n
        if row["laion_scores"]:
            from_laion.update({name: n for name in row["laion_scores"].split(",")})
    rows_in = sum(expected.values())
    kept = sum(v[1] for v in per_shard.values())
    decoded = rows_in - sum(by_reason[r] for r in IMAGE_ERRORS)  # an undecodable row has exactly one of these
    modelled = ["clip_sim"] + [k for k, v in cfg.heads().items() if v]
    counts = {"rows_in": rows_in, "rows_out": kept, "rejected": rows_in - kept,
              "rejected_by_reason": {r: by_reason[r] for r in REASONS if by_reason.get(r)} |
                                    {r: n for r, n in by_reason.items() if r not in REASONS},
              "skipped": [k for k, v in cfg.heads().items() if not v],
              "scores_from_laion": {k: from_laion[k] for k in LAION},
              "scores_computed": {k: decoded - from_laion[k] if k in modelled else 0 for k in LAION}}
    return {s: (v[0], v[1]) for s, v in per_shard.items()}, counts


def run(inputs: dict[str, Artifact], cfg: FilterConfig, out: Artifact) -> dict[str, Any]:
    download = inputs["download"]
    expected, path_to_shard = tar_shards(download)
    t0 = time.time()
    phases = Phases("filter")
    todo_scores = pending_shards(out, "scores", expected)
    todo_rows = pending_shards(out, "rows", expected)
    rows_todo = sum(expected[s] for s in todo_rows)
    log.info("[filter] %d shards, %d rows; scoring %d shards, deciding %d", len(expected), sum(expected.values()),
             len(todo_scores), len(todo_rows))
    if todo_scores:
        rows = {s: expected[s] for s in todo_scores}
        tasks = cfg.tasks_for(sum(rows.values()))
        with phases("score pass (decode, CLIP)" + in_tasks_label(tasks), rows=sum(rows.values())):
            score(download, rows, path_to_shard, cfg, out, tasks)
        still = pending_shards(out, "scores", expected)
        if still:
            raise RuntimeError(f"filter: scores incomplete after the pass for shards {still[:5]}")
    if todo_rows:
        if out.exists(SHARDS):
            out.fs.delete_file(out.child(SHARDS))
        with phases("decide pass (dedup, thresholds)", rows=sum(expected.values())):
            decide_all(out, expected, todo_rows, cfg)
        still = pending_shards(out, "rows", expected)
        if still:
            raise RuntimeError(f"filter: rows incomplete after the pass for shards {still[:5]}")
    wall = time.time() - t0

    with phases("tally"):
        tallies = tally_files(out, "rows", TALLY_KEYS)
    per_shard, counts = summarize(tallies, expected, cfg)
    write_shards(out, per_shard)
    counts |= {"shards": len(expected), "shards_resumed": len(expected) - len(todo_rows),
               "rows_per_s": round(rows_todo / wall, 2) if rows_todo and wall > 0 else None,
               "phase_s": phases.seconds}
    used = {k: n for k, n in counts["scores_from_laion"].items() if n}
    mixed = used.get("clip_sim") and counts["scores_computed"]["clip_sim"]
    if mixed and (cfg.clip_model, cfg.clip_pretrained) != ("ViT-B-32", "openai"):
        log.warning("[filter] min_clip_sim %.3f applies to LAION's (OpenAI ViT-B/32) similarity on %d rows and "
                    "to %s's on %d rows: two models' scales", cfg.min_clip_sim, used["clip_sim"], cfg.clip_model,
                    counts["scores_computed"]["clip_sim"])
    log.info("[filter] summary: rows in %d, rows out %d, rejected %s, skipped %s, LAION scores used %s, %.1f rows/s",
             counts["rows_in"], counts["rows_out"], json.dumps(counts["rejected_by_reason"]),
             counts["skipped"] or "nothing", json.dumps(used) if used else "nowhere", counts["rows_per_s"] or 0.0)
    return counts
