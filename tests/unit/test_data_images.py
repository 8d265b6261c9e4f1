"""Decode / resize / caption helpers on hostile input (no Ray, no network)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_prep import images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height (it would decode to gigapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_bad_bytes_raise_bad_image_with_reason():
    good = _jpeg(Image.new("RGB", (64, 48), (200, 10, 10)))
    for data in (b"", b"\x00" * 100, np.random.default_rng(0).bytes(4096), good[: len(good) // 2]):
        with pytest.raises(images.BadImage) as e:
            images.decode_rgb(data)
        assert e.value.reason == "decode_error"


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(images.BadImage) as e:
        images.decode_rgb(_bomb_png(100_000, 100_000))  # 10 GP: PIL's own hard limit trips too
    assert e.value.reason == "too_large"
    with pytest.raises(images.BadImage) as e:
        images.open_image(_bomb_png(20_000, 20_000), max_pixels=10_000_000)  # under PIL's limit, over ours
    assert e.value.reason == "too_large"
    small = _png(Image.new("RGB", (100, 100)))
    with pytest.raises(images.BadImage, match="too_large"):
        images.decode_rgb(small, max_pixels=5_000)
    assert images.decode_rgb(small, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(dtype))
        assert img.mode == mode
    else:
        img = Image.new("RGB", (20, 10), (30, 160, 90)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    out = images.decode_rgb(buf.getvalue())
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert images.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.info["transparency"] = 0
    assert images.decode_rgb(_png(pal)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_stretched_not_clipped():
    arr = np.linspace(0, 65535, 100, dtype=np.uint16).reshape(10, 10)
    out = np.asarray(images.to_rgb(Image.fromarray(arr)))
    assert out.min() == 0 and out.max() == 255


def test_center_crop_resize_and_draft():
    wide = Image.new("RGB", (400, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (150, 0, 250, 100))  # red centre square
    out = images.center_crop_resize(wide, 32)
    assert out.size == (32, 32)
    assert out.getpixel((16, 16))[0] > 200  # the centre survived the crop
    big = _jpeg(Image.new("RGB", (2000, 1000), (10, 200, 10)))
    img = images.decode_rgb(big, draft=128)
    assert min(img.size) >= 128 and img.size[0] < 2000  # decoded at reduced scale
    for fmt in ("jpg", "png", "webp"):
        assert Image.open(io.BytesIO(images.encode(out, fmt))).size == (32, 32)


def test_clean_caption_removes_control_and_format_characters():
    raw = "\t a red\x00 circle\n\r\x1b[31mbig\x1b[0m \u200b\u202eright\u202c cafe\u0301 \U0001F7E5\n"
    assert images.clean_caption(raw) == "a red circle big right café \U0001F7E5"
    assert images.clean_caption(None) == "" and images.clean_caption("   ") == ""
    assert images.latin_fraction("a photo of a cat") == 1.0
    assert images.latin_fraction("крупный план кошки") == 0.0
    assert images.latin_fraction("1234 !!") == 1.0
