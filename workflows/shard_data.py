"""The one reader of the shard contract, for both families, both samplers, ``evaluate`` and tests.

``data_prep/shard.py`` writes the contract and decides the split once: every parquet row has
``sample_id``, ``caption``, ``recaption``, a ``split`` column (``train`` / ``heldout``) and the
image at each training resolution R as ``{jpg|png|webp}_R`` (an encoded R×R centre crop). Here:

- which rows: ``split`` (training stages read ``train`` only; ``evaluate`` and SWD ``heldout``);
- which caption: ``caption_column`` with the fallback rule (an empty recaption -> the caption);
- which image: R exactly, else the smallest stored side above R (resized on decode);
- decoded images: float32 (N, 3, R, R) in [-1, 1], through the bomb-guarded ``decode_rgb``;
- previews: the first n rows, read with pyarrow in the driver (no Ray job);
- ground truth: the ``labels`` column (JSON written by the demo site, null for real data) parsed by
  :func:`scene_labels`, for evaluation only: no training stage reads it.

``row_id`` (int64 hash of ``sample_id``) is added to every row: the training loop's resume key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from data_prep.images import decode_rgb
from data_prep.shard import HELDOUT, SPLIT_COLUMN, TRAIN
from data_prep.splits import row_ids, subset_mask
from pipeline.store import Artifact

__all__ = ["TRAIN", "HELDOUT", "SPLIT_COLUMN", "columns", "image_columns", "image_column", "decode", "decode_u8",
           "captions", "select", "read", "materialized", "read_parquet", "read_table", "head", "split_ids"]

_IMAGE = re.compile(r"^(jpg|jpeg|png|webp)_(\d+)$")
SPLITS = (TRAIN, HELDOUT)
LABELS = "labels"  # data_prep.demo.item.DemoItem.labels: {"background", "objects": [largest first]}


def columns(art: Artifact, subdir: str = "") -> list[str]:
    """Column names of an artifact's parquet files (the first file's schema)."""
    files = art.list(".parquet", subdir=subdir)
    if not files:
        raise ValueError(f"{art.uri}: no parquet files (the shard stage's formats must include parquet)")
    with art.fs.open_input_file(art.child(files[0])) as f:
        return pq.read_schema(f).names


def image_columns(names: Iterable[str]) -> dict[int, str]:
    """{R: column} of the encoded images stored per resolution (``jpg_64``, ``webp_256``, ...)."""
    found = (_IMAGE.match(c) for c in names)
    return dict(sorted((int(m.group(2)), m.group(0)) for m in found if m))


def image_column(names: Iterable[str], resolution: int) -> str:
    """The image column at R, else the smallest stored side above R (resized on decode)."""
    cols = image_columns(names)
    above = [r for r in cols if r >= resolution]
    if not above:
        raise ValueError(f"shard has images at {sorted(cols)}, none at or above {resolution}: "
                         f"add {resolution} to the shard stage's resolutions")
    return cols[above[0]]


def decode(data: Iterable[Any], size: int) -> np.ndarray:
    """Encoded images -> float32 (N, 3, size, size) in [-1, 1].

    Shard images are square, so a centre crop to size is a plain resize; a non-square input
    (a foreign file) is cropped rather than stretched.
    """
    return decode_u8(data, size).astype(np.float32) / 127.5 - 1.0


def decode_u8(data: Iterable[Any], size: int) -> np.ndarray:
    """As ``decode``, but uint8 (N, 3, size, size) in [0, 255]: a quarter of the bytes to move between
    processes and to the GPU; ``x / 127.5 - 1`` in float32 gives exactly ``decode``'s values."""
    data = list(data)
    out = np.empty((len(data), 3, size, size), dtype=np.uint8)
    for i, b in enumerate(data):
        img = decode_rgb(bytes(b))
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


def captions(batch: dict[str, np.ndarray], caption_column: str = "caption") -> np.ndarray:
    """The caption each row trains on: ``caption_column``, or the original caption where it is empty
    (no recaption stage ran, or LLaVA returned nothing)."""
    base = batch["caption"]
    alt = batch.get(caption_column) if caption_column != "caption" else None
    chosen = base if alt is None else [a if a else c for a, c in zip(alt, base)]
    return np.array([str(c or "") for c in chosen], dtype=object)


def _check_split(names: Iterable[str], where: str) -> None:
    if SPLIT_COLUMN not in names:
        raise ValueError(f"{where}: no '{SPLIT_COLUMN}' column: the shard was written before the shard stage "
                         "owned the split; rerun it (--force shard)")


def select(batch: dict[str, np.ndarray], *, split: str = TRAIN, fraction: float = 1.0,
           caption_column: str | None = None, decode_to: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """Keep the rows of ``split`` (and a ``fraction`` of them, by id hash); add ``row_id``; with
    ``caption_column`` put the chosen caption in ``caption``; with ``decode_to=(column, R)`` replace
    that column by ``image`` decoded at R."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    _check_split(batch, "shard batch")
    keep = np.asarray(batch[SPLIT_COLUMN]) == split
    if fraction < 1.0:
        keep &= subset_mask(batch["sample_id"], fraction)
    out = {k: np.asarray(v)[keep] for k, v in batch.items() if k != SPLIT_COLUMN}
    if caption_column is not None:
        out["caption"] = captions(out, caption_column)
        out.pop("recaption", None)
    out["row_id"] = row_ids(out["sample_id"])
    if decode_to is not None:
        col, size = decode_to
        out["image"] = decode(out.pop(col), size)
    return out


def _wanted(names: list[str], extra: Iterable[str], caption_column: str | None) -> list[str]:
    cols = ["sample_id", SPLIT_COLUMN, *extra]
    if caption_column is not None:
        cols += ["caption"] + ([caption_column] if caption_column != "caption" and caption_column in names else [])
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"shard has no column {missing[0]!r} (columns: {', '.join(names)})")
    return list(dict.fromkeys(cols))


def read(shard: Artifact, *, split: str = TRAIN, carry: Iterable[str] = (), resolution: int | None = None,
         caption_column: str | None = None, fraction: float = 1.0, in_memory: bool = False,
         paths: list[str] | None = None):
    """Ray Dataset of the shard's rows in ``split``: ``sample_id``, ``row_id``, the ``carry`` columns
    as stored, ``caption`` (with ``caption_column``) and ``image`` decoded at ``resolution`` (if given).

    ``in_memory`` materializes the result in Ray's object store, so that small datasets (the
    demo, tests) are read and decoded once rather than once per epoch.
    """
    import ray.data

    names = columns(shard)
    _check_split(names, shard.uri)
    src = image_column(names, resolution) if resolution else None
    cols = _wanted(names, [*carry, *([src] if src else [])], caption_column)
    decode_to = (src, resolution) if src and src not in carry else None
    ds = ray.data.read_parquet(paths or shard.uri, filesystem=shard.fs, columns=cols, file_extensions=["parquet"])
    ds = ds.map_batches(select, batch_format="numpy", fn_kwargs={
        "split": split, "fraction": fraction, "caption_column": caption_column, "decode_to": decode_to})
    return materialized(ds) if in_memory else ds


def materialized(ds):
    """``ds`` computed once into Ray's object store, its blocks in a fixed order, so that a rerun
    of the stage trains on the same row order (exact resume across commands, not only within one)."""
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def read_parquet(art: Artifact, columns_: list[str], subdir: str = "", in_memory: bool = False):
    """A derived artifact's parquet rows (encoded latents, inversion pairs) as a Ray Dataset; those hold
    training rows only, already split by the stage that wrote them."""
    import ray.data

    if in_memory:  # small data: one driver-side read, then training iterates the object store
        # Sorted: an actor pool writes its rows in the order its actors finish, so the same config would
        # otherwise train on another row order in every run (Würstchen colour: 0.54, then 0.32 at seed 0).
        table = read_table(art, list(dict.fromkeys(["sample_id", *columns_])), subdir=subdir, split=None)
        return ray.data.from_arrow(table.sort_by("sample_id").select(columns_))
    return ray.data.read_parquet(art.child_uri(subdir) if subdir else art.uri, filesystem=art.fs, columns=columns_,
                                 file_extensions=["parquet"])


def read_table(art: Artifact, columns_: list[str], subdir: str = "", split: str | None = TRAIN) -> pa.Table:
    """Rows read with pyarrow in the driver (small data, evaluation): with ``split``, that split's
    rows only, plus ``row_id``."""
    import ray.data  # noqa: F401 - registers Ray's tensor extension type, which derived artifacts store

    cols = list(dict.fromkeys(["sample_id", SPLIT_COLUMN, *columns_])) if split else columns_
    files = art.list(".parquet", subdir=subdir)
    if not files:
        raise ValueError(f"{art.uri}: no parquet files")
    table = pa.concat_tables([pq.read_table(art.fs.open_input_file(art.child(n)), columns=cols) for n in files])
    if split is None:
        return table
    _check_split(table.column_names, art.uri)
    table = table.filter(pc.equal(table.column(SPLIT_COLUMN), split)).drop_columns([SPLIT_COLUMN])
    return table.append_column("row_id", pa.array(row_ids(table.column("sample_id").to_pylist())))


def head(art: Artifact, columns_: list[str], n: int, subdir: str = "", split: str | None = TRAIN,
         caption_column: str | None = None) -> dict[str, np.ndarray]:
    """The first ``n`` rows (of ``split``) as numpy: previews and prompts need no Ray job."""
    import ray.data  # noqa: F401 - registers Ray's tensor extension type, which derived artifacts store

    cols = list(columns_)
    if caption_column is not None:
        cols = [c for c in cols if c != "caption"] + ["caption"] + (
            [caption_column] if caption_column != "caption" else [])
    want = list(dict.fromkeys(["sample_id", SPLIT_COLUMN, *cols])) if split else cols
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    for name in art.list(".parquet", subdir=subdir):
        with art.fs.open_input_file(art.child(name)) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=max(n, 1), columns=want):
                rows = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in want}
                if split:
                    rows = select(rows, split=split, caption_column=caption_column)
                elif caption_column is not None:
                    rows["caption"] = captions(rows, caption_column)
                parts.append(rows)
                have += len(rows[cols[0]] if cols else rows["sample_id"])
                if have >= n:
                    break
        if have >= n:
            break
    if not have:
        raise ValueError(f"{art.uri}: no {split or ''} rows to read".replace("  ", " "))
    keys = [c for c in dict.fromkeys([*columns_, *(["caption"] if caption_column else [])])]
    if split:
        keys = list(dict.fromkeys(["sample_id", "row_id", *keys]))
    return {c: np.concatenate([p[c] for p in parts])[:n] for c in keys}


def split_ids(shard: Artifact) -> dict[str, set[str]]:
    """{split: sample ids} over the whole shard (tests and audits: nothing held out may be trained on)."""
    table = read_table(shard, ["sample_id", SPLIT_COLUMN], split=None)
    ids, splits = table.column("sample_id").to_pylist(), table.column(SPLIT_COLUMN).to_pylist()
    return {s: {i for i, t in zip(ids, splits) if t == s} for s in SPLITS}


def scene_labels(values: Iterable[Any]) -> list[dict[str, str] | None]:
    """Per row, the graded attributes of a ``labels`` value: ``colour`` and ``shape`` of the main
    (largest) object and ``background`` (a gradient's first colour); None where a row has no labels."""
    out: list[dict[str, str] | None] = []
    for v in values:
        if v is None or v == "":
            out.append(None)
            continue
        spec = json.loads(v)
        objects = spec.get("objects") or []
        if not objects:
            out.append(None)
            continue
        main = objects[0]
        out.append({"colour": main["colour"], "shape": main["shape"],
                    "background": str(spec.get("background", "")).split(" to ")[0]})
    return out


def labelled(art: Artifact, resolution: int, split: str, caption_column: str = "caption",
             limit: int | None = None) -> tuple[np.ndarray, list[dict[str, str]], list[str]]:
    """The rows of ``split`` that carry ground truth, in ``sample_id`` order (the first ``limit``):
    images decoded at ``resolution`` (N, 3, R, R) in [-1, 1], their graded attributes, their captions.
    Empty when the shard has no ``labels`` column (real data)."""
    if LABELS not in columns(art):
        return np.zeros((0, 3, resolution, resolution), np.float32), [], []
    return split_rows(art, resolution, split, caption_column, limit, labelled_only=True)


def split_rows(art: Artifact, resolution: int, split: str, caption_column: str = "caption",
               limit: int | None = None, labelled_only: bool = False
               ) -> tuple[np.ndarray, list[dict[str, str] | None], list[str]]:
    """The rows of ``split`` in ``sample_id`` order (the first ``limit``; with ``labelled_only``, of those
    with ground truth): images decoded at ``resolution`` in [-1, 1], their graded attributes
    (:func:`scene_labels`; None without), their captions (``caption_column`` with the fallback)."""
    names = columns(art)
    col = image_column(names, resolution)
    alt = [caption_column] if caption_column != "caption" else []
    has_labels = LABELS in names
    table = read_table(art, ["caption", *alt, *([LABELS] if has_labels else []), col], split=split)
    if labelled_only:
        table = table.filter(pc.invert(pc.is_null(table.column(LABELS))))
    table = table.sort_by("sample_id")
    if limit is not None:
        table = table.slice(0, limit)
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    labels = scene_labels(rows[LABELS]) if has_labels else [None] * table.num_rows
    keep = [i for i, lab in enumerate(labels) if lab is not None or not labelled_only]
    caps = captions(rows, caption_column)
    return (decode(rows[col][keep], resolution), [labels[i] for i in keep], [str(caps[i]) for i in keep])
