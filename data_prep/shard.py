"""Stage ``shard``: training-ready shards, every kept image at every training resolution.

The kept rows are put in one global order (input shard id, then ``key``) and cut into final
shards of ``rows_per_shard`` rows: shard ``i`` holds global rows ``[i*R, (i+1)*R)``. That
assignment is computed on the driver from the filter's per-shard kept counts alone (one
integer per input shard), so it is the same on every rerun. Each final shard is built by one
Ray task: it reads the rows it needs
from the download tars, the filter rows and the recaption rows, centre-crops and resizes each
image to every resolution, and writes its files atomically under deterministic names. A
rerun builds only the final shards whose files are missing: exactly once by construction.

The train/held-out split is decided here, once, as the ``split`` column: a row is held out
when :func:`data_prep.splits.heldout_mask` puts its ``sample_id`` in the ``heldout_fraction``
(a salted hash of the id, so the split survives re-cutting the shards or growing the data).
Training stages read ``split == "train"`` rows and evaluation ``"heldout"`` ones; nobody
downstream re-derives it.

Output (``i`` = 5-digit final shard index)::

    wds/<i>.tar          WebDataset, one sample per image, ``__key__`` = key:
                           <key>.<r>.<ext>       the image at r x r, for each r in resolutions
                           <key>.txt             original caption (cleaned)
                           <key>.recaption.txt   LLaVA caption ("" when no recaption stage)
                           <key>.json            sample_id, key, source_shard, split, labels, every score
    parquet/<i>.parquet  same rows, one column per field:
                           sample_id, key, source_shard: string
                           split: string, "train" or "heldout"
                           caption, recaption: string
                           orig_width, orig_height: int32; aspect: float32
                           clip_sim, aesthetic, pwatermark, punsafe: float32 (null = not scored)
                           caption_words: int32; sha256: string
                           labels: string, the URL list's ``labels`` (JSON ground truth), null
                             when the URL list has no such column or the row no value
                           <ext>_<r>: binary, encoded image at r x r (e.g. jpg_64), per resolution

Counts: ``rows_in``, ``rows_out``, ``rows_train``, ``rows_heldout``, ``decode_errors``, ``shards``,
``shards_written``, ``shards_resumed``, ``resolutions``, ``rows_per_s``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep import download as download_mod
from data_prep import images, tars
from data_prep.partitions import LABELS, read_shard_rows, read_shards
from data_prep.progress import Phases, every
from data_prep.splits import heldout_mask
from pipeline.stage import in_tasks
from pipeline.store import Artifact

log = logging.getLogger("genmodels")

SCORES = ("clip_sim", "aesthetic", "pwatermark", "punsafe")
SPLIT_COLUMN = "split"
TRAIN = "train"
HELDOUT = "heldout"


@dataclass(frozen=True)
class ShardConfig:
    """Settings of the shard stage (``stages.shard``).

    resolutions: square sides written per image (centre crop + antialiased resize), e.g.
        ``[32, 64, 128]`` for the demo; the model stages read the ones they train at.
    rows_per_shard: rows per final shard (the last shard may be smaller).
    image_format / quality: encoding of the resized images (``jpg``/``png``/``webp``).
    formats: which outputs to write: ``webdataset`` tars and/or ``parquet`` files.
    heldout_fraction: share of sample ids marked ``split = heldout`` (never trained on; the
        evaluation's real images).
    cpus_per_task: CPUs per shard-building task.
    max_image_pixels: decompression-bomb guard.
    """

    resolutions: list[int] = field(default_factory=lambda: [64, 256])
    rows_per_shard: int = 1000
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 95
    formats: list[Literal["webdataset", "parquet"]] = field(default_factory=lambda: ["webdataset", "parquet"])
    heldout_fraction: float = 0.1
    cpus_per_task: float = 1.0
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"resolutions: need at least one side ≥ 8, got {self.resolutions}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"resolutions: duplicates in {self.resolutions}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard: must be ≥ 1, got {self.rows_per_shard}")
        if not self.formats:
            raise ValueError("formats: need webdataset and/or parquet")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality: must be in 1..100, got {self.quality}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task: must be > 0, got {self.cpus_per_task}")


def split_labels(sample_ids: list[str], fraction: float) -> list[str]:
    """``heldout`` or ``train`` per sample id: the one place the split is decided."""
    return [HELDOUT if h else TRAIN for h in heldout_mask(sample_ids, fraction)]


def plan(kept: dict[str, int], rows_per_shard: int) -> list[list[tuple[str, int, int]]]:
    """Final shards as lists of (input shard, first, stop) ranks into that shard's kept rows."""
    specs: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = rows_per_shard
    for shard in sorted(kept):
        pos, n = 0, kept[shard]
        while pos < n:
            take = min(room, n - pos)
            current.append((shard, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                specs.append(current)
                current, room = [], rows_per_shard
    if current:
        specs.append(current)
    return specs


def outputs(index: int, cfg: ShardConfig) -> list[str]:
    """File names of final shard ``index``, in write order (the last one marks it complete)."""
    names = {"webdataset": f"wds/{index:05d}.tar", "parquet": f"parquet/{index:05d}.parquet"}
    return [names[f] for f in ("webdataset", "parquet") if f in cfg.formats]


def schema(cfg: ShardConfig) -> pa.Schema:
    fields = [("sample_id", pa.string()), ("key", pa.string()), ("source_shard", pa.string()),
              (SPLIT_COLUMN, pa.string()), ("caption", pa.string()), ("recaption", pa.string()),
              ("orig_width", pa.int32()), ("orig_height", pa.int32()), ("aspect", pa.float32())]
    fields += [(s, pa.float32()) for s in SCORES]
    fields += [("caption_words", pa.int32()), ("sha256", pa.string()), (LABELS, pa.string())]
    fields += [(f"{cfg.image_format}_{r}", pa.binary()) for r in cfg.resolutions]
    return pa.schema(fields)


def kept_rows(filt: Artifact, shard: str, first: int, stop: int) -> pa.Table:
    """Kept filter rows ``[first, stop)`` of input shard ``shard``, in key order."""
    t = read_shard_rows(filt, "rows", shard)
    return t.filter(t.column("keep")).slice(first, stop - first)


def read_images(art: Artifact, tar: str, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of the wanted img2dataset keys from one download tar (streamed)."""
    found: dict[str, bytes] = {}
    with art.fs.open_input_stream(art.child(tar), buffer_size=tars.BUFFER) as f:
        for name, data in tars.members(f):
            key, _, ext = name.rpartition("/")[2].partition(".")
            if key in keys and ext in ("jpg", "jpeg", "png", "webp"):
                found[key] = data
    return found


def records(spec: list[tuple[str, int, int]], *, cfg: ShardConfig, download: Artifact, filt: Artifact,
            recaption: Artifact | None, tars: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """The rows of one final shard (images encoded at every resolution) and its decode errors."""
    ext = cfg.image_format
    rows: list[dict[str, Any]] = []
    errors = 0
    for shard, first, stop in spec:
        t = kept_rows(filt, shard, first, stop)
        recaps: dict[str, str] = {}
        if recaption is not None:
            r = read_shard_rows(recaption, "rows", shard, ["key", "recaption"])
            recaps = dict(zip(r.column("key").to_pylist(), r.column("recaption").to_pylist()))
        part = shard.split("_")[0]
        raw_keys = {k[len(part) + 1:]: k for k in t.column("key").to_pylist()}
        data = read_images(download, tars[shard], set(raw_keys))
        splits = split_labels(t.column("sample_id").to_pylist(), cfg.heldout_fraction)
        for row, split in zip(t.to_pylist(), splits):
            raw = row["key"][len(part) + 1:]
            try:
                img = images.decode_rgb(data.get(raw, b""), cfg.max_image_pixels, draft=max(cfg.resolutions))
            except images.BadImage:
                errors += 1
                continue
            w, h = row["orig_width"], row["orig_height"]
            rec = {"sample_id": row["sample_id"], "key": row["key"], "source_shard": shard, SPLIT_COLUMN: split,
                   "caption": row["caption"], "recaption": recaps.get(row["key"], ""),
                   "orig_width": w, "orig_height": h, "aspect": max(w, h) / max(min(w, h), 1),
                   **{s: row.get(s) for s in SCORES}, "caption_words": row["caption_words"], "sha256": row["sha256"],
                   LABELS: row.get(LABELS) if isinstance(row.get(LABELS), str) else None}
            for r in cfg.resolutions:
                rec[f"{ext}_{r}"] = images.encode(images.center_crop_resize(img, r), ext, cfg.quality)
            rows.append(rec)
    return rows, errors


def tar_bytes(rows: list[dict[str, Any]], cfg: ShardConfig) -> bytes:
    """One WebDataset tar of ``rows``: images per resolution, both captions, the rest as json
    (WebDataset's layout is only member names ``<key>.<ext>``, a sample's members adjacent;
    ``webdataset``'s own writer imports torch, 3 s in every build process)."""

    def files():
        for rec in rows:
            meta = {k: v for k, v in rec.items() if not isinstance(v, bytes) and k not in ("caption", "recaption")}
            members = {"txt": rec["caption"].encode(), "recaption.txt": rec["recaption"].encode(),
                       "json": json.dumps(meta).encode()}
            members.update({f"{r}.{cfg.image_format}": rec[f"{cfg.image_format}_{r}"] for r in cfg.resolutions})
            yield from ((f"{rec['key']}.{ext}", data) for ext, data in members.items())

    return tars.write(files())


def build(index: int, spec: list[tuple[str, int, int]], cfg: ShardConfig, download: Artifact, filt: Artifact,
          recaption: Artifact | None, tars: dict[str, str], out: Artifact) -> dict[str, int]:
    """Build final shard ``index`` from its ``spec``; returns its summary (rows, held out, errors, bytes)."""
    rows, errors = records(spec, cfg=cfg, download=download, filt=filt, recaption=recaption, tars=tars)
    nbytes = 0
    if "webdataset" in cfg.formats:  # written first: the parquet file marks the shard complete
        data = tar_bytes(rows, cfg)
        out.write_bytes(f"wds/{index:05d}.tar", data)
        nbytes += len(data)
    if "parquet" in cfg.formats:
        nbytes += out.write_parquet(f"parquet/{index:05d}.parquet", pa.Table.from_pylist(rows, schema=schema(cfg)))
    return {"index": index, "rows": len(rows), "heldout": sum(r[SPLIT_COLUMN] == HELDOUT for r in rows),
            "decode_errors": errors, "bytes": nbytes}


def finished_rows(out: Artifact, filt: Artifact, index: int, spec: list[tuple[str, int, int]],
                  cfg: ShardConfig) -> tuple[int, int]:
    """(rows, held-out rows) of a final shard an earlier run built: from its parquet file, or
    (webdataset only) from the kept ids its spec names."""
    if "parquet" in cfg.formats:
        with out.fs.open_input_file(out.child(f"parquet/{index:05d}.parquet")) as f:
            split = pq.read_table(f, columns=[SPLIT_COLUMN]).column(SPLIT_COLUMN)
        return len(split), pc.sum(pc.equal(split, HELDOUT)).as_py() or 0
    ids = [i for shard, a, b in spec for i in kept_rows(filt, shard, a, b).column("sample_id").to_pylist()]
    return len(ids), int(heldout_mask(ids, cfg.heldout_fraction).sum())


def run(inputs: dict[str, Artifact], cfg: ShardConfig, out: Artifact) -> dict[str, Any]:
    download, filt, recaption = inputs["download"], inputs["filter"], inputs.get("recaption")
    kept = {s: v["kept"] for s, v in read_shards(filt).items() if v["kept"]}
    tars = {r["shard"]: r["tar"] for r in download_mod.read_index(download)}
    specs = plan(kept, cfg.rows_per_shard)
    todo = [i for i in range(len(specs)) if not all(out.exists(n) for n in outputs(i, cfg))]
    rows_todo = sum(b - a for i in todo for _, a, b in specs[i])
    log.info("[shard] %d kept rows → %d shards of ≤%d rows at %s px; building %d", sum(kept.values()), len(specs),
             cfg.rows_per_shard, cfg.resolutions, len(todo))
    t0 = time.time()
    phases = Phases("shard")
    results: list[dict[str, Any]] = []
    if todo:
        # One Ray task per final shard, as many at once as the CPUs allow (a Ray Data map over the
        # list did the same, plus its executor's start: 5-7 s of a 20,000-row pass on 2 cores).
        calls = [(i, specs[i], cfg, download, filt, recaption, tars, out) for i in todo]
        with phases("build pass (decode, resize, encode, write)", rows=rows_todo):
            results = in_tasks(build, calls, num_cpus=cfg.cpus_per_task, progress=every("shard", "shards built"),
                               name="shard_build")
    wall = time.time() - t0
    # Every shard, including ones built by an earlier (interrupted) run.
    built = {int(r["index"]): (int(r["rows"]), int(r["heldout"])) for r in results}
    per_shard = [built[i] if i in built else finished_rows(out, filt, i, specs[i], cfg) for i in range(len(specs))]
    rows_out = sum(n for n, _ in per_shard)
    heldout = sum(h for _, h in per_shard)
    errors = sum(int(r["decode_errors"]) for r in results)
    counts = {"rows_in": sum(kept.values()), "rows_out": rows_out, "rows_train": rows_out - heldout,
              "rows_heldout": heldout, "decode_errors": errors, "shards": len(specs), "shards_written": len(todo),
              "shards_resumed": len(specs) - len(todo), "resolutions": list(cfg.resolutions),
              "rows_per_s": round(rows_todo / wall, 2) if rows_todo and wall > 0 else None,
              "phase_s": phases.seconds}
    log.info("[shard] summary: rows in %d, rows out %d (%d held out), decode errors %d, %d shards (%d resumed), "
             "%.1f rows/s", counts["rows_in"], rows_out, heldout, errors, len(specs), counts["shards_resumed"],
             counts["rows_per_s"] or 0.0)
    return counts


def read_parquet_shards(art: Artifact) -> pa.Table:
    """All final parquet shards of a shard artifact (for tests and small consumers)."""
    tables = [pq.read_table(art.child(n), filesystem=art.fs) for n in art.list(".parquet", subdir="parquet")]
    return pa.concat_tables(tables) if tables else pa.table({})
