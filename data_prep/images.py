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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white (as img2dataset does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: stretch to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Bytes to a fully decoded RGB image, or :class:`BadImage`.

    ``draft``: the smallest side the caller needs; lets the JPEG decoder skip work by decoding
    at 1/2, 1/4 or 1/8 scale (never below ``draft``), a large speed-up for big photos that are
    only needed as thumbnails.
    """
    img = open_image(data, max_pixels)
    try:
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        return to_rgb(img)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from e


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
