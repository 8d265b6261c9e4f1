"""Tests for the offline demo dataset: generation, the loopback site, the URL parquet, and a
real img2dataset download against it."""

import glob
import io
import os
import re
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import demo as dd
from data_prep.demo import cli, shapes

LOCAL = pafs.LocalFileSystem()


def _decode(item: dd.DemoItem) -> Image.Image:
    img = Image.open(io.BytesIO(item.data))
    img.load()
    return img


def _get(url: str, method: str = "GET"):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


@pytest.fixture(scope="module")
def items() -> list[dd.DemoItem]:
    return list(dd.generate(60, seed=3))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A local site of 20 good + all broken items: (root, items, rows)."""
    root = str(tmp_path_factory.mktemp("demo") / "site")
    site_items = list(dd.generate(20, seed=0)) + dd.broken_items()
    return root, site_items, dd.write_site(LOCAL, root, site_items)


# ---------------------------------------------------------------- generation


def test_generate_is_deterministic():
    a, b = list(dd.generate(30, seed=7)), list(dd.generate(30, seed=7))
    assert a == b  # every field, image bytes included
    other = list(dd.generate(30, seed=8))
    assert sum(x.data != y.data for x, y in zip(a, other)) >= 25
    assert dd.broken_items(1) == dd.broken_items(1)


def test_counts_names_formats_and_sizes(items):
    assert [i.name.rsplit(".", 1)[0] for i in items] == [f"demo-{k:06d}" for k in range(60)]
    photos = [i for i in items if not i.shapes]
    assert len(photos) == 60 // 5
    modes = set()
    for item in items:
        img = _decode(item)
        assert img.size == (item.width, item.height)
        assert 64 <= item.width <= 256 and 64 <= item.height <= 256
        assert img.format == {"jpg": "JPEG", "png": "PNG"}[item.name.rsplit(".", 1)[1]]
        modes.add((img.format, img.mode))
        assert item.caption.strip() and item.expected == "ok"
    assert {("PNG", "RGBA"), ("PNG", "L"), ("PNG", "RGB"), ("JPEG", "RGB")} <= modes
    assert sum(i.name.endswith(".jpg") for i in items) >= 0.7 * len(items)
    assert len({(i.width, i.height) for i in items}) > 30  # varied sizes and aspect ratios


def test_custom_size_range_applies_to_shapes_and_photos():
    got = list(dd.generate(25, seed=1, min_size=32, max_size=40))
    assert sum(not i.shapes for i in got) == 5
    for item in got:
        assert 32 <= item.width <= 40 and 32 <= item.height <= 40
        assert _decode(item).size == (item.width, item.height)


def test_without_photos_still_has_rgba_and_grayscale_png():
    got = list(dd.generate(20, seed=0, photos=False))
    assert all(i.shapes for i in got)
    assert (_decode(got[7]).mode, _decode(got[17]).mode) == ("RGBA", "L")
    assert {s.colour for s in got[17].shapes} <= set(shapes.ACHROMATIC)


def _check_caption_and_pixels(item: dd.DemoItem) -> None:
    caption = item.caption
    assert 1 <= len(item.shapes) <= 3
    # Every object appears as "<colour> <shape>", and no other object colour is named once
    # the background's colour names (e.g. "light green") are taken out.
    rest = caption
    for bg in sorted(item.background.split(" to "), key=len, reverse=True):
        assert bg in caption
        rest = rest.replace(bg, " ")
    named = {c for c in shapes.OBJECT_COLOURS if re.search(rf"\b{c}\b", rest)}
    assert named == {s.colour for s in item.shapes}, caption
    rgb = np.asarray(_decode(item).convert("RGB"), dtype=np.float32)
    for s in item.shapes:
        assert f"{s.colour} {s.kind}" in caption
        assert s.size in shapes.SIZES and s.r >= 5
        assert s.r <= s.cx <= item.width - s.r and s.r <= s.cy <= item.height - s.r
        x, y = s.probe
        dist = {c: np.linalg.norm(rgb[y, x] - v) for c, v in shapes.OBJECT_COLOURS.items()}
        assert min(dist, key=dist.get) == s.colour and dist[s.colour] < 40, (item.name, s, rgb[y, x])


def test_captions_match_drawn_shapes_and_pixels(items):
    shape_items = [i for i in items if i.shapes] + list(dd.generate(20, seed=5, photos=False))
    assert len(shape_items) >= 60
    for item in shape_items:
        _check_caption_and_pixels(item)
    templates = {re.sub(r"\b(a|an)\b.*", "", i.caption)[:12] for i in shape_items}
    assert len({i.caption for i in shape_items}) == len(shape_items) and len(templates) >= 3


def test_broken_items():
    broken = {i.expected: i for i in dd.broken_items()}
    assert tuple(broken) == dd.BROKEN_REASONS
    assert all(i.sample_id == f"broken-{r}" for r, i in broken.items())
    for reason in ("corrupt_bytes", "truncated_jpeg", "empty_file"):
        with pytest.raises(OSError):
            _decode(broken[reason])
    assert broken["empty_file"].data == b""
    assert broken["truncated_jpeg"].data[:2] == b"\xff\xd8"
    assert _decode(broken["too_small"]).size == (8, 8)
    for reason in ("http_404", "empty_caption", "control_chars_caption", "long_caption"):
        assert _decode(broken[reason]).size == (96, 96)
    assert broken["empty_caption"].caption == ""
    assert {"\x00", "\n", "\t", "\x1b", "\u202e"} <= set(broken["control_chars_caption"].caption)
    assert len(broken["long_caption"].caption) >= 10_000


# ---------------------------------------------------------------- site and server


def test_write_site_and_serve(site):
    root, site_items, rows = site
    assert [r["sample_id"] for r in rows] == [i.sample_id for i in site_items]
    assert not os.path.exists(f"{root}/images/broken-http_404.jpg")
    with dd.serve(LOCAL, root) as base_url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        for item, row in zip(site_items, rows):
            if item.expected == "http_404":
                continue
            status, ctype, body = _get(f"{base_url}/{row['path']}")
            assert status == 200 and body == item.data
            assert ctype == ("image/png" if item.name.endswith(".png") else "image/jpeg")
        assert _get(f"{base_url}/{rows[0]['path']}", method="HEAD")[2] == b""
        for missing in (
            "images/broken-http_404.jpg",
            "images/nope.jpg",
            "images",
            "",
            "../site/images/x.jpg",
            "%2e%2e/%2e%2e/etc/passwd",
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(f"{base_url}/{missing}")
            assert err.value.code == 404
    with pytest.raises(urllib.error.URLError) as err:
        _get(f"{base_url}/{rows[0]['path']}")
    assert isinstance(err.value.reason, ConnectionRefusedError)
    assert not any(t.name == "demo-data-server" for t in threading.enumerate())


def test_serve_from_s3(moto_s3):
    s3 = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=moto_s3.removeprefix("http://"),
        scheme="http",
        allow_bucket_creation=True,
    )
    s3.create_dir("demo")
    site_items = list(dd.generate(5, seed=2)) + dd.broken_items()[:2]
    rows = dd.write_site(s3, "demo/site", site_items)
    with dd.serve(s3, "demo/site") as base_url:
        assert _get(f"{base_url}/{rows[0]['path']}")[2] == site_items[0].data
        assert _get(f"{base_url}/{rows[-1]['path']}")[2] == site_items[-1].data
        for missing in (rows[-2]["path"], "images", "nope/x.jpg"):  # rows[-2] is http_404
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(f"{base_url}/{missing}")
            assert err.value.code == 404
        table = dd.write_url_parquet(rows, base_url, s3, "demo/urls.parquet")
    assert pq.read_table("demo/urls.parquet", filesystem=s3).equals(table)


def test_url_parquet(site, tmp_path):
    _, site_items, rows = site
    path = str(tmp_path / "urls" / "urls.parquet")
    table = dd.write_url_parquet(list(reversed(rows)), "http://127.0.0.1:9/", LOCAL, path)
    assert table.schema == dd.URL_SCHEMA
    assert table.num_rows == 20 + len(dd.BROKEN_REASONS)
    read = pq.read_table(path)
    assert read.equals(table)
    ids = read["sample_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    by_id = {i.sample_id: i for i in site_items}
    for rec in read.to_pylist():
        item = by_id[rec["sample_id"]]
        assert rec["url"] == f"http://127.0.0.1:9/images/{item.name}"
        assert (rec["caption"], rec["expected"], rec["width"], rec["height"]) == (
            item.caption,
            item.expected,
            item.width,
            item.height,
        )
    first = Path(path).read_bytes()
    dd.write_url_parquet(rows, "http://127.0.0.1:9", LOCAL, path)
    assert Path(path).read_bytes() == first


def test_main_writes_site_and_parquet(tmp_path):
    cli.main(["--out", str(tmp_path), "--n", "6", "--base-url", "http://127.0.0.1:8000"])
    table = pq.read_table(str(tmp_path / "urls.parquet"))
    assert table.num_rows == 6 + len(dd.BROKEN_REASONS)
    assert len(os.listdir(tmp_path / "site" / "images")) == 6 + len(dd.BROKEN_REASONS) - 1  # no 404 file


# ---------------------------------------------------------------- img2dataset


def test_img2dataset_downloads_site(site, tmp_path):
    import img2dataset

    root, site_items, rows = site
    out = str(tmp_path / "shards")
    with dd.serve(LOCAL, root) as base_url:
        dd.write_url_parquet(rows, base_url, LOCAL, str(tmp_path / "urls.parquet"))
        img2dataset.download(
            url_list=str(tmp_path / "urls.parquet"),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["sample_id", "expected"],
            output_format="webdataset",
            output_folder=out,
            processes_count=1,
            thread_count=4,
            image_size=64,
            min_image_size=16,
            timeout=5,
            retries=0,
            enable_wandb=False,
        )
    result = pq.read_table(glob.glob(f"{out}/*.parquet")).to_pylist()
    assert len(result) == len(site_items)
    got = {r["sample_id"]: r for r in result}
    failed = {
        "http_404": ("failed_to_download", "HTTP Error 404: Not Found"),
        "corrupt_bytes": ("failed_to_resize", "Image decoding error"),
        "truncated_jpeg": ("failed_to_resize", "Image decoding error"),
        "empty_file": ("failed_to_resize", "buf.empty()"),  # OpenCV's imdecode assertion
        "too_small": ("failed_to_resize", "image too small"),
    }
    for item in site_items:
        r = got[item.sample_id]
        assert r["expected"] == item.expected
        if item.expected in failed:
            status, message = failed[item.expected]
            assert r["status"] == status and message in r["error_message"], r
        else:
            assert r["status"] == "success" and r["error_message"] is None, r
            assert (r["original_width"], r["original_height"]) == (item.width, item.height)
            assert r["caption"] == item.caption
    # The webdataset shards hold every success, captions byte-exact (control characters too).
    captions = {}
    for tar_path in glob.glob(f"{out}/*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    captions[member.name[:-4]] = tar.extractfile(member).read().decode()
    successes = [r for r in result if r["status"] == "success"]
    assert len(captions) == len(successes) == 20 + 3
    for r in successes:
        assert captions[r["key"]] == r["caption"]
