"""Image and caption helpers shared by the data-preparation stages (no Ray here).

Web images are hostile input: random bytes behind a ``.jpg`` name, truncated files, palette
and 16-bit modes, alpha channels, and decompression bombs (a few KB that decode to gigapixels).
Every helper either returns a clean RGB image or raises :class:`BadImage` whose ``reason`` is
one short word that the stages count (``decode_error``, ``too_large``).
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
import warnings

import numpy as np
from PIL import Image

# 89.5 MP, PIL's own default warning limit; stages pass their configured value.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) and check the pixel count before anything is decoded.

    PIL's ``MAX_IMAGE_PIXELS`` is process-global and only warns below 2x the limit; the explicit
    check here makes the guard per call and exact, and the warning is turned into an error so
    that no code path decodes a bomb.
    """
    if not data:
        raise BadImage("decode_error", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except Exception as e:
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from e
    if img.width * img.height > max_pixels:
        raise BadImage("too_large", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
    if img.width < 1 or img.height < 1:
        raise BadImage("decode_error", f"degenerate size {img.width}x{img.height}")
    return img


# Modes with more than 8 bits per sample. PIL's own ``convert("RGB")`` clips these to 255
# (a 16-bit mid-gray becomes white), so they are scaled here instead.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, keeping what the pixels mean.

    * 16-bit / 32-bit integer and float grayscale: scaled to 8 bits (:func:`_high_depth_to_rgb`),
      never clipped. 48/64-bit RGB(A) PNGs need nothing: PIL decodes them to 8-bit ``RGB``/``RGBA``
      (the high byte of each sample).
    * CMYK: PIL's conversion (``R = (255 - C)(255 - K) / 255``, what OpenCV's decoder gives
      too; embedded ICC profiles are not applied). Adobe's inverted CMYK JPEGs are undone by
      PIL's decoder (raw mode ``CMYK;I`` when the file has an Adobe marker).
    * Alpha (RGBA, LA, PA, premultiplied) and transparency keys (palette, L, RGB and 16-bit
      gray ``tRNS``): composited on white, as img2dataset does, instead of dropped to black.
    * Palette, 1-bit, L, YCbCr: PIL's lossless conversion.
    """
    if img.mode in HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits to RGB by its nominal range, not its min/max.

    ``I;16*`` spans 0..65535, so 8-bit = value / 257 (65535 → 255, 32768 → 128). ``I`` (32-bit)
    is how some decoders hold 16-bit data: /257 when any value exceeds 255, else taken as 8-bit.
    ``F``: [0, 1] floats ×255, [0, 255] as is, larger ranges as 16-bit. A stretch to the
    image's own min/max would turn a flat gray into black and change every photo's exposure.
    """
    arr = np.asarray(img, dtype=np.float64)
    hi = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16"):
        scale = 1 / 257
    elif img.mode == "I":
        scale = 1 / 257 if hi > 255 else 1.0
    else:
        scale = 255.0 if hi <= 1.0 else 1.0 if hi <= 255 else 1 / 257
    gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    key = img.info.get("transparency")
    if isinstance(key, int):  # a 16-bit gray PNG's tRNS: that one value is fully transparent
        rgb[arr == key] = 255
    return Image.fromarray(rgb, "RGB")


def bits_per_sample(img: Image.Image) -> int:
    """8, or 16/32 when the file stores wider samples (read from the header, nothing decoded).

    PIL reports 48/64-bit RGB(A) PNGs as ``RGB``/``RGBA``; only the tile's raw mode
    (``RGB;16B``) says that the file holds 16 bits per sample.
    """
    if img.mode in HIGH_DEPTH_MODES:
        return 16 if img.mode.startswith("I;16") else 32
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        if isinstance(rawmode, str) and ";16" in rawmode:
            return 16
    return 8


def load_rgb(img: Image.Image, draft: int | None = None) -> Image.Image:
    """Decode an image opened by :func:`open_image` to RGB, or :class:`BadImage`.

    ``draft``: the smallest side the caller needs; lets the JPEG decoder skip work by decoding
    at 1/2, 1/4 or 1/8 scale (never below ``draft``), a large speed-up for big photos that are
    only needed as thumbnails.
    """
    try:
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        return to_rgb(img)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from e


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Bytes to a fully decoded RGB image, or :class:`BadImage` (see :func:`load_rgb`)."""
    return load_rgb(open_image(data, max_pixels), draft)


def eight_bit_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
    """The image re-encoded as an 8-bit RGB PNG when its file has wider samples, else ``None``.

    For a decoder that mishandles 16-bit input, such as img2dataset's resizer (OpenCV reads
    16-bit PNGs as uint16 and its JPEG/WebP encoders saturate every value above 255 to white).
    Ordinary 8-bit files cost one header parse and return ``None``; so do undecodable ones (the
    caller's own decoder reports them).
    """
    try:
        img = open_image(data, max_pixels)
        if bits_per_sample(img) == 8:
            return None
        return encode(load_rgb(img), "png")
    except BadImage:
        return None


def uniform_fraction(img: Image.Image, side: int = 64, tolerance: int = 6) -> float:
    """Share of pixels that are one colour (±``tolerance`` levels per channel), on a
    ``side``×``side`` box-filtered thumbnail: 1.0 for a blank image.

    The dominant colour is the fullest 8-level bin; its members' median is the centre.
    """
    a = np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.int16).reshape(-1, 3)
    q = a >> 3
    bins = (q[:, 0].astype(np.int64) << 10) | (q[:, 1] << 5) | q[:, 2]
    centre = np.median(a[bins == np.bincount(bins).argmax()], axis=0)
    return float((np.abs(a - centre).max(axis=1) <= tolerance).mean())


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Square ``size``x``size``: scale the short side to ``size``, crop the centre (antialiased).

    PIL's ``resize(box=...)`` crops and resamples in one step; ``reducing_gap`` first shrinks
    big images by an integer factor (fast, still antialiased) before the bicubic pass.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                      reducing_gap=None if side <= 2 * size else 3.0)


def encode(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpg, png, webp)")
    return buf.getvalue()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_caption(text: str | None) -> str:
    """Printable, NFC-normalised, single-spaced text: drops control/format characters
    (NUL, ANSI escapes, zero-width and bidi marks) that break tokenizers and tar headers."""
    if not text:
        return ""
    text = _ANSI.sub("", str(text))
    text = unicodedata.normalize("NFC", text)
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r":
            kept.append(" ")
        elif cat[0] == "C":  # Cc control, Cf format (bidi, zero width), Co, Cs, Cn
            continue
        else:
            kept.append(ch)
    return _WS.sub(" ", "".join(kept)).strip()


def latin_fraction(text: str) -> float:
    """Fraction of letters that are Latin script (a cheap language proxy; 1.0 for no letters).

    LAION-2B-en was selected with a language detector; this heuristic only separates Latin-script
    captions from others. Swap in a detector (e.g. fastText lid.176) where that matters.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    latin = sum(1 for c in letters if c.isascii() or "LATIN" in unicodedata.name(c, ""))
    return latin / len(letters)
