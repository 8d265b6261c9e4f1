"""Decode / resize / caption helpers on hostile input (no Ray, no network)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_prep import images


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
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


def _png16(arr: np.ndarray, trns: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 48/64-bit RGB(A) or 32-bit LA).

    ``arr``: uint16 (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA; ``trns``:
    a gray value made transparent (tRNS chunk).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)
    extra = chunk(b"tRNS", struct.pack(">H", trns)) if trns is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(images.decode_rgb(data)).astype(int)


def test_sixteen_bit_pngs_keep_their_values():
    """16-bit samples scale by 1/257 (65535 -> 255, 32768 -> 128): a mid-gray stays mid-gray
    instead of saturating to white, and nothing is stretched to the image's own range."""
    mid = np.full((4, 6), 32768, np.uint16)
    assert Image.open(io.BytesIO(_png16(mid))).mode == "I;16"
    assert (_rgb(_png16(mid)) == 128).all()  # was 255 through PIL's convert("RGB")
    ramp = np.array([[0, 257 * 64, 257 * 200, 65535]], np.uint16)
    np.testing.assert_array_equal(_rgb(_png16(ramp))[0, :, 0], [0, 64, 200, 255])
    rgb = np.stack([mid, mid // 2, mid // 4], -1)
    np.testing.assert_array_equal(_rgb(_png16(rgb))[0, 0], [128, 64, 32])  # 48-bit RGB
    rgba = np.concatenate([rgb, np.full((4, 6, 1), 65535, np.uint16)], -1)
    rgba[0, 0, 3] = 0
    out = _rgb(_png16(rgba))  # 64-bit RGBA: opaque pixels as they are, transparent ones white
    np.testing.assert_array_equal(out[1, 1], [128, 64, 32])
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    la = np.stack([mid, np.full_like(mid, 32768)], -1)  # 16-bit gray at half alpha over white
    assert abs(_rgb(_png16(la))[0, 0, 0] - 191) <= 1
    keyed = mid.copy()
    keyed[0, 0] = 1000
    out = _rgb(_png16(keyed, trns=1000))  # tRNS on 16-bit gray: that value is transparent
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (128, 128, 128)
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([32768, 65535], ">u2").tobytes())
    assert [p[0] for p in np.asarray(images.to_rgb(big_endian))[0]] == [128, 255]
    assert [images.to_rgb(Image.fromarray(np.array([[v]], np.float32))).getpixel((0, 0))[0]
            for v in (0.5, 128.0)] == [128, 128]  # float: [0, 1] or [0, 255]


def test_palette_cmyk_alpha_gray_and_one_bit_convert_to_the_right_colours():
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = _rgb(_png(pal))
    assert tuple(out[0, 0]) == (10, 200, 10) and tuple(out[1, 1]) == (200, 10, 10)
    out = _rgb(_png(pal, transparency=0))
    assert tuple(out[0, 0]) == (10, 200, 10) and tuple(out[1, 1]) == (255, 255, 255)  # index 0 transparent
    # CMYK JPEG as Photoshop writes it: Adobe marker, inverted samples; PIL undoes the inversion.
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    data = _jpeg(cmyk, quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None
    assert np.abs(_rgb(data)[8, 8] - [255, 0, 0]).max() <= 3
    half = _jpeg(Image.new("CMYK", (16, 16), (128, 0, 0, 128)), quality=95)  # R = (255-C)(255-K)/255
    assert np.abs(_rgb(half)[8, 8] - [63, 127, 127]).max() <= 3
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # half-transparent black over white
    assert np.abs(_rgb(_png(rgba))[0, 0] - 127).max() <= 1
    la = Image.new("LA", (4, 4), (0, 0))
    assert tuple(_rgb(_png(la))[0, 0]) == (255, 255, 255)  # fully transparent: white, not black
    assert tuple(images.to_rgb(Image.new("RGBA", (8, 8), (255, 0, 0, 0))).getpixel((0, 0))) == (255, 255, 255)
    keyed = Image.new("RGB", (4, 4), (1, 2, 3))
    assert tuple(_rgb(_png(keyed, transparency=(1, 2, 3)))[0, 0]) == (255, 255, 255)
    assert tuple(_rgb(_png(Image.new("L", (4, 4), 77)))[0, 0]) == (77, 77, 77)
    one = Image.new("1", (4, 4), 0)
    one.putpixel((0, 0), 1)
    out = _rgb(_png(one))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (0, 0, 0)


def test_eight_bit_png_rewrites_only_wide_samples():
    """What img2dataset's resizer needs: it decodes with OpenCV's IMREAD_UNCHANGED (uint16 for a
    16-bit PNG) and its JPEG encoder saturates every value above 255, so a 16-bit image is
    stored white. Fed :func:`images.eight_bit_png`'s output, the same OpenCV path keeps it."""
    cv2 = pytest.importorskip("cv2")
    assert images.eight_bit_png(_png(Image.new("RGB", (8, 8)))) is None
    assert images.eight_bit_png(_jpeg(Image.new("RGB", (8, 8)))) is None
    assert images.eight_bit_png(b"not an image") is None
    mid = np.full((8, 8, 3), 32768, np.uint16)
    mid[..., 2] = 16384
    for data in (_png16(mid), _png16(mid[..., 0])):
        def stored(b: bytes) -> np.ndarray:  # img2dataset's resizer, minus the resize
            img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
            return cv2.imdecode(cv2.imencode(".jpg", img)[1], cv2.IMREAD_COLOR)
        assert stored(data).min() == 255  # the bug: saturated to white
        fixed = images.eight_bit_png(data)
        assert Image.open(io.BytesIO(fixed)).mode == "RGB"
        assert abs(int(stored(fixed)[4, 4, 1]) - 128) <= 2  # BGR: green is mid-gray


def test_uniform_fraction_flags_blank_images_only():
    assert images.uniform_fraction(Image.new("RGB", (300, 200), (250, 250, 250))) == 1.0
    rng = np.random.default_rng(0)
    noisy = np.clip(255 - np.abs(rng.normal(0, 2, (200, 300, 3))), 0, 255).astype(np.uint8)  # JPEG-ish white
    assert images.uniform_fraction(Image.fromarray(noisy)) == 1.0
    scene = Image.new("RGB", (300, 200), (255, 255, 255))
    scene.paste((200, 20, 20), (140, 90, 160, 110))  # a small square: 0.7% of the image
    assert 0.98 < images.uniform_fraction(scene) < 0.995
    photo = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert images.uniform_fraction(Image.fromarray(photo)) < 0.1


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
