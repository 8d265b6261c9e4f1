"""The filter's image checks (stored size, aspect, blank) and LAION's own scores, without Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_prep import filter as filt
from data_prep.partitions import tally
from pipeline.config import ConfigError, build

NAN = float("nan")


def _rows(stored, orig, **cols) -> pa.Table:
    """Scored rows as the decide pass reads them: good captions, passing model scores."""
    n = len(stored)
    base = {
        "shard": ["00000_00000"] * n, "key": [f"00000_{i:06d}" for i in range(n)], "image_error": [""] * n,
        "width": [w for w, _ in stored], "height": [h for _, h in stored],
        "orig_width": [w for w, _ in orig], "orig_height": [h for _, h in orig],
        "uniform_fraction": pa.array([0.5] * n, pa.float32()), "sha256": [f"h{i}" for i in range(n)],
        "caption_words": [4] * n, "caption_chars": [20] * n, "caption_latin": [1.0] * n,
        "clip_sim": pa.array([0.3] * n, pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.eye(n, 8, dtype=np.float16).reshape(-1)), 8),
        **{h: pa.nulls(n, pa.float32()) for h in ("aesthetic", "pwatermark", "punsafe")},
    }
    return pa.table(base | cols)


def _reasons(t: pa.Table, **cfg) -> list[str]:
    out = filt.decide(t, cfg=build(filt.FilterConfig, cfg, "f"))
    return out.column("reject").to_pylist()


def test_stored_size_and_aspect_reject_a_banner_kept_before():
    # The reported case: a 4000x50 original stored as 256x3, kept because only the original's
    # shorter side was checked (50 >= min_side) and the aspect check was off.
    stored = [(256, 3), (256, 128), (300, 100), (310, 100), (96, 32), (512, 512)]
    orig = [(4000, 50), (2000, 1000), (300, 100), (310, 100), (3000, 1000), (512, 512)]
    got = _reasons(_rows(stored, orig), min_side=32, near_dup_threshold=0)
    assert got == ["too_small,bad_aspect", "", "", "bad_aspect", "", ""]
    # The stored side decides even when the original is large: 3000x1000 stored 96x32.
    assert _reasons(_rows(stored, orig), min_side=64, near_dup_threshold=0)[4] == "too_small"
    # An upscaled store (resize_only_if_bigger off) is caught on the original's side.
    assert _reasons(_rows([(512, 512)], [(40, 40)]), min_side=64) == ["too_small"]
    assert _reasons(_rows(stored, orig), min_side=0, max_aspect_ratio=0, near_dup_threshold=0) == [""] * 6


def test_near_constant_stored_images_are_blank():
    t = _rows([(256, 256)] * 3, [(256, 256)] * 3, uniform_fraction=pa.array([1.0, 0.995, 0.99], pa.float32()))
    assert _reasons(t, min_side=32, near_dup_threshold=0) == ["blank", "blank", ""]
    assert _reasons(t, min_side=32, near_dup_threshold=0, max_uniform_fraction=0) == ["", "", ""]


def test_laion_scores_replace_the_model_scores_where_present():
    n = 5
    t = _rows([(512, 512)] * n, [(512, 512)] * n,
              clip_sim=pa.array([0.3, 0.3, 0.1, 0.3, 0.1], pa.float32()),  # the model's (tiny CLIP, say)
              laion_similarity=pa.array([0.2, None, 0.35, NAN, None], pa.float32()),
              laion_punsafe=pa.array([None, 0.999, None, None, 0.1], pa.float32()),
              laion_aesthetic=pa.array([6.0, 6.0, 4.0, None, None], pa.float32()),
              image_error=["", "", "", "", "decode_error"])
    out = filt.decide(t, cfg=build(filt.FilterConfig, {"near_dup_threshold": 0}, "f"))
    assert out.column("reject").to_pylist() == ["clip_sim", "punsafe", "aesthetic", "", "decode_error"]
    # The score columns hold what the decision used; laion_scores says which came from LAION.
    np.testing.assert_allclose(out.column("clip_sim").to_pylist(), [0.2, 0.3, 0.35, 0.3, 0.1], rtol=1e-6)
    assert out.column("punsafe").to_pylist()[:3] == [None, pytest.approx(0.999), None]
    assert out.column("laion_scores").to_pylist() == ["clip_sim,aesthetic", "aesthetic,punsafe", "clip_sim,aesthetic",
                                                      "", ""]  # NaN counts as absent; image errors use neither
    assert out.column("laion_similarity").null_count == 3
    # Off: the model's scores decide (aesthetic and punsafe have no head here, so they never fail).
    off = filt.decide(t, cfg=build(filt.FilterConfig, {"near_dup_threshold": 0, "use_laion_scores": False}, "f"))
    assert off.column("reject").to_pylist() == ["", "", "clip_sim", "", "decode_error"]
    assert off.column("laion_scores").to_pylist() == [""] * n

    cfg = build(filt.FilterConfig, {"near_dup_threshold": 0, "aesthetic_head": ""}, "f")
    per_shard, counts = filt.summarize(tally(out, keys=filt.TALLY_KEYS).to_pylist(), {"00000_00000": n}, cfg)
    assert per_shard == {"00000_00000": (n, 1)}
    assert counts["scores_from_laion"] == {"clip_sim": 2, "aesthetic": 3, "pwatermark": 0, "punsafe": 1}
    assert counts["scores_computed"] == {"clip_sim": 2, "aesthetic": 0, "pwatermark": 0, "punsafe": 0}
    assert counts["rejected_by_reason"] == {"decode_error": 1, "clip_sim": 1, "aesthetic": 1, "punsafe": 1}


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_prepare_reads_the_stored_size_from_the_file_and_laion_scores_from_the_json():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    metas = [
        # img2dataset's json: stored size (wrong on purpose here: the file wins) and original size.
        {"caption": "a noisy photo", "width": 999, "height": 999, "original_width": 4000, "original_height": 50,
         "laion_similarity": 0.31, "laion_punsafe": None, "laion_aesthetic": "n/a"},
        {"caption": "a blank page"},  # not an img2dataset tar: the file is the original
        {"caption": "broken"},
    ]
    tar = "/d/parts/00000/00000.tar"
    batch = {"__key__": np.array(["000000000", "000000001", "000000002"], dtype=object),
             "path": np.array([tar] * 3, dtype=object),
             "json": np.array([json.dumps(m).encode() for m in metas], dtype=object),
             "jpg": np.array([_jpeg(photo), _jpeg(Image.new("RGB", (30, 20), "white")), b"junk"], dtype=object)}
    out = filt.prepare(batch, model="tiny-clip", pretrained=None, path_to_shard={tar: "00000_00000"}, max_pixels=10_000)
    assert out["width"].tolist() == [60, 30, 0] and out["height"].tolist() == [40, 20, 0]
    assert out["orig_width"].tolist() == [4000, 30, 0] and out["orig_height"].tolist() == [50, 20, 0]
    assert out["image_error"].tolist() == ["", "", "decode_error"]
    u = out["uniform_fraction"]
    assert u[0] < 0.1 and u[1] == 1.0 and np.isnan(u[2])
    assert out["laion_similarity"][0] == pytest.approx(0.31) and np.isnan(out["laion_similarity"][1:]).all()
    assert np.isnan(out["laion_punsafe"]).all() and np.isnan(out["laion_aesthetic"]).all()
    assert out["pixels"].shape[0] == 3
    # The blank check off (max_uniform_fraction 0): its per-row measurement is skipped, null downstream.
    off = filt.prepare(batch, model="tiny-clip", pretrained=None, path_to_shard={tar: "00000_00000"},
                       max_pixels=10_000, uniform_check=False)
    assert np.isnan(off["uniform_fraction"]).all() and off["width"].tolist() == [60, 30, 0]


@pytest.mark.parametrize("data,message", [
    ({"max_uniform_fraction": 1.5}, "stages.filter.max_uniform_fraction: must be in [0, 1] (0: off), got 1.5"),
    ({"max_aspect_ratio": 0.5}, "stages.filter.max_aspect_ratio: must be >= 1"),
])
def test_bad_check_settings_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        build(filt.FilterConfig, data, "stages.filter")
    assert str(e.value).startswith(message), str(e.value)
