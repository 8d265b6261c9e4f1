"""The URL list's ``labels`` column reaches every final shard row unchanged (null when absent),
through the same functions the stages run (filter prepare → CLIP scorer → decide → shard
records), without Ray."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_prep import filter as filt
from data_prep import shard
from data_prep.models import ClipScorer
from data_prep.partitions import labels_text, shard_dir
from pipeline.config import build
from pipeline.store import Store

LABELS = [json.dumps({"shape": "circle", "colour": [255, 0, 0], "count": 2}), None, "[]"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _download(tmp_path, shard_id: str, metas: list[dict]):
    """A download artifact with one img2dataset-style tar; returns (artifact, tar rel path, raw batch)."""
    art = Store(str(tmp_path)).artifact("download", shard_id)
    part, s = shard_id.split("_")
    rel = f"parts/{part}/{s}.tar"
    art.fs.create_dir(art.child(f"parts/{part}"), recursive=True)
    keys = [f"{i:09d}" for i in range(len(metas))]
    jpgs = [_jpeg(i + 7 * int(part)) for i in range(len(metas))]
    with tarfile.open(art.child(rel), "w") as t:
        for k, m, data in zip(keys, metas, jpgs):
            for ext, blob in (("jpg", data), ("json", json.dumps(m).encode())):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(blob)
                t.addfile(info, io.BytesIO(blob))
    path = art.child(rel)
    batch = {"__key__": np.array(keys, dtype=object), "path": np.array([path] * len(keys), dtype=object),
             "json": np.array([json.dumps(m).encode() for m in metas], dtype=object),
             "jpg": np.array(jpgs, dtype=object)}
    return art, rel, batch, {path: shard_id}


def _final_rows(tmp_path, shard_id: str, metas: list[dict]) -> tuple[list[dict], pa.Table, list[dict]]:
    """Final shard rows, their parquet table and the WebDataset jsons, for one input shard."""
    dl, rel, batch, path_to_shard = _download(tmp_path, shard_id, metas)
    fcfg = build(filt.FilterConfig, {"clip_model": "tiny-clip", "clip_pretrained": None, "min_clip_sim": -1.0,
                                     "min_aesthetic": 0.0, "min_side": 8, "near_dup_threshold": 0.0,
                                     "min_latin_fraction": 0.0}, "filter")
    prepared = filt.prepare(batch, model="tiny-clip", pretrained=None, path_to_shard=path_to_shard,
                            max_pixels=10_000_000)
    scored = ClipScorer("tiny-clip", None, fcfg.heads())(prepared)
    rows = filt.decide(scored, cfg=fcfg)
    assert rows.column("keep").to_pylist() == [True] * len(metas)
    fo = Store(str(tmp_path)).artifact("filter", shard_id)
    fo.fs.create_dir(fo.child(shard_dir("rows", shard_id)), recursive=True)
    # as Ray's partitioned write leaves it: the shard id lives in the directory name only
    pq.write_table(rows.drop_columns(["shard"]), fo.child(f"{shard_dir('rows', shard_id)}/part-0.parquet"))
    scfg = build(shard.ShardConfig, {"resolutions": [16], "heldout_fraction": 0.0}, "shard")
    recs, errors = shard.records([(shard_id, 0, len(metas))], cfg=scfg, download=dl, filt=fo, recaption=None,
                                 tars={shard_id: rel})
    assert errors == 0
    table = pa.Table.from_pylist(recs, schema=shard.schema(scfg))
    with tarfile.open(fileobj=io.BytesIO(shard.tar_bytes(recs, scfg))) as t:
        jsons = [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return recs, table, jsons


def test_labels_reach_the_shard_row_unchanged(tmp_path):
    metas = [{"caption": f"a photo number {i}", "sample_id": f"s{i}", "labels": lab} for i, lab in enumerate(LABELS)]
    recs, table, jsons = _final_rows(tmp_path, "00000_00000", metas)
    assert table.schema.field("labels").type == pa.string()
    assert [r["sample_id"] for r in recs] == ["s0", "s1", "s2"]
    assert table.column("labels").to_pylist() == LABELS  # byte for byte, the null row null
    assert [j["labels"] for j in jsons] == LABELS


def test_no_labels_column_gives_null(tmp_path):
    metas = [{"caption": f"a photo number {i}", "sample_id": f"s{i}"} for i in range(3)]
    _, table, jsons = _final_rows(tmp_path, "00001_00000", metas)
    assert table.schema.field("labels").type == pa.string()
    assert table.column("labels").null_count == 3
    assert [j["labels"] for j in jsons] == [None] * 3


def test_labels_text_keeps_strings_and_serialises_parsed_values():
    assert labels_text('{"b": 1, "a": 2}') == '{"b": 1, "a": 2}'
    assert labels_text(None) is None
    assert json.loads(labels_text({"b": 1, "a": [2]})) == {"b": 1, "a": [2]}
