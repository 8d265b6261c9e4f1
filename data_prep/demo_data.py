"""Offline demo dataset: a LAION-style URL parquet served from a loopback HTTP server.

A real run starts from LAION parquet files (``url``, ``caption``) and downloads them with
img2dataset. The demo must run with no internet, so this module makes a small image "web
site" of its own and the URL parquet that points at it:

    items = list(generate(200, seed=0)) + broken_items()
    rows = write_site(fs, root, items)              # root/images/<sample_id>.<ext>
    with serve(fs, root) as base_url:               # http://127.0.0.1:<port>
        write_url_parquet(rows, base_url, fs, path) # url, caption, sample_id, expected, ...
        img2dataset.download(url_list=path, input_format="parquet", ...)

Images are coloured geometric shapes whose captions are written from the recorded drawing
spec (so a caption never mentions a colour that was not drawn), plus the real photographs that
ship inside scikit-image (and scikit-learn, when installed). ``broken_items`` adds the
failures a web crawl meets (404, corrupt and truncated files, tiny images, odd captions) so the
pipeline's filtering is exercised too. Everything is deterministic in ``seed``: same seed,
byte-identical files.

No Ray here: this is plain data generation plus a test server.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import io
import math
import mimetypes
import os
import posixpath
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------

OK = "ok"
# Reasons an item is broken; each is the `expected` value of its row in the URL parquet.
BROKEN_REASONS = (
    "http_404",  # listed in the parquet, never written: the server answers 404
    "corrupt_bytes",  # random bytes behind a .jpg name
    "truncated_jpeg",  # a valid JPEG cut short
    "empty_file",  # zero bytes
    "too_small",  # a valid 8x8 image, for a min-size filter to reject
    "empty_caption",  # a good image with caption ""
    "control_chars_caption",  # tabs, newlines, NUL, ANSI escapes, bidi marks, emoji
    "long_caption",  # a good image with a ~10,000-character caption
)


@dataclass(frozen=True)
class Shape:
    """One drawn object, in output-pixel coordinates.

    `r` is the radius of the circle the shape is inscribed in; `probe` is a pixel that the
    shape's colour is guaranteed to cover (the centre, or the middle of a ring's band).
    """

    kind: str
    colour: str
    size: str  # "small" | "medium" | "large"
    cx: float
    cy: float
    r: float
    probe: tuple[int, int]


@dataclass(frozen=True)
class DemoItem:
    """One file of the demo site. `name` is ``<sample_id>.<ext>``."""

    name: str
    data: bytes
    caption: str
    width: int | None
    height: int | None
    expected: str = OK
    shapes: tuple[Shape, ...] = ()
    background: str = ""  # e.g. "light green", "light blue to white"; "" for photos

    @property
    def sample_id(self) -> str:
        return posixpath.splitext(self.name)[0]


# --------------------------------------------------------------------------------------
# Palettes and words
# --------------------------------------------------------------------------------------

OBJECT_COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (250, 215, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "purple": (125, 45, 170),
    "pink": (240, 110, 175),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
}
BACKGROUND_COLOURS = {
    "white": (255, 255, 255),
    "light gray": (215, 215, 215),
    "beige": (235, 222, 195),
    "light blue": (190, 215, 245),
    "light green": (200, 235, 195),
    "pale yellow": (250, 245, 190),
    "light pink": (250, 215, 225),
    "dark blue": (25, 35, 80),
    "dark gray": (60, 60, 60),
    "black": (10, 10, 10),
}
# Used for the grayscale-PNG item, whose caption must stay true after dropping colour.
ACHROMATIC = ("black", "white", "gray")
ACHROMATIC_BACKGROUNDS = ("white", "light gray", "dark gray", "black")

SHAPES = ("circle", "square", "rectangle", "triangle", "star", "ring", "diamond", "hexagon", "cross")
SIZES = {"small": (0.09, 0.13), "medium": (0.15, 0.21), "large": (0.24, 0.32)}  # r / min(W, H)
NUMBERS = {1: "one", 2: "two", 3: "three"}
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between an object and its background
SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _position_words(cx: float, cy: float, w: int, h: int) -> str:
    col = ("left", "", "right")[min(int(3 * cx / w), 2)]
    row = ("top", "", "bottom")[min(int(3 * cy / h), 2)]
    if row and col:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


# --------------------------------------------------------------------------------------
# Shape images
# --------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, w: int, h: int, names: Sequence[str]) -> tuple[np.ndarray, str, str]:
    """Return (HxWx3 float array, caption phrase, colour words) for a random background."""
    base = _pick(rng, names)
    rgb = np.array(BACKGROUND_COLOURS[base], dtype=np.float32)
    style = _pick(rng, ("plain", "plain", "gradient", "speckled", "striped"))
    img = np.broadcast_to(rgb, (h, w, 3)).astype(np.float32)
    if style == "gradient":
        other = _pick(rng, [n for n in names if n != base])
        if rng.random() < 0.5:  # left to right
            t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        else:  # top to bottom
            t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        img = rgb * (1 - t) + np.array(BACKGROUND_COLOURS[other], dtype=np.float32) * t
        img = np.broadcast_to(img, (h, w, 3))
        phrase = _pick(rng, (f"a gradient background from {base} to {other}", f"a {base} to {other} gradient"))
        return img, phrase, f"{base} to {other}"
    if style == "speckled":
        img = img + rng.normal(0.0, 14.0, size=(h, w, 1)).astype(np.float32)
        phrase = _pick(rng, (f"a speckled {base} background", f"a noisy {base} background"))
    elif style == "striped":
        period = int(rng.integers(6, 16)) * SUPERSAMPLE
        yy, xx = np.mgrid[0:h, 0:w]
        coord = _pick(rng, (xx, yy, xx + yy))
        dark = 0.85 if rgb.mean() > 128 else 1.6
        stripe = ((coord // (period // 2)) % 2 == 1)[..., None]
        img = np.where(stripe, np.clip(rgb * dark, 0, 255), rgb)
        phrase = _pick(rng, (f"a striped {base} background", f"a faintly striped {base} background"))
    else:
        phrase = _pick(rng, (f"a {base} background", f"a plain {base} background"))
    return img, phrase, base


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Fill `kind` inscribed in the circle (cx, cy, r) on a mask (coordinates already scaled)."""

    def regular(n: int, radii: Sequence[float], a0: float) -> list[tuple[float, float]]:
        k = n * len(radii)
        return [
            (
                cx + radii[i % len(radii)] * math.cos(a0 + 2 * math.pi * i / k),
                cy + radii[i % len(radii)] * math.sin(a0 + 2 * math.pi * i / k),
            )
            for i in range(k)
        ]

    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        q = 0.55 * r
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif kind == "square":
        q = 0.7 * r
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=255)
    elif kind == "rectangle":
        a, b = (0.88 * r, 0.47 * r) if angle < math.pi else (0.47 * r, 0.88 * r)
        draw.rectangle((cx - a, cy - b, cx + a, cy + b), fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=255)
    elif kind == "triangle":
        draw.polygon(regular(3, (r,), angle), fill=255)
    elif kind == "hexagon":
        draw.polygon(regular(6, (r,), angle), fill=255)
    elif kind == "star":
        draw.polygon(regular(5, (r, 0.45 * r), angle), fill=255)
    elif kind == "cross":
        a, b = 0.9 * r, 0.3 * r
        draw.rectangle((cx - a, cy - b, cx + a, cy + b), fill=255)
        draw.rectangle((cx - b, cy - a, cx + b, cy + a), fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _place(rng: np.random.Generator, w: int, h: int, count: int) -> list[tuple[str, float, float, float]]:
    """Non-overlapping (size, cx, cy, r) placements; shrinks or drops objects that do not fit."""
    placed: list[tuple[str, float, float, float]] = []
    s = min(w, h)
    for _ in range(count):
        size = _pick(rng, tuple(SIZES))
        for attempt in range(60):
            if attempt == 30:
                size = "small"
            lo, hi = SIZES[size]
            r = max(5.0, s * rng.uniform(lo, hi))
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 3 for _, x, y, q in placed):
                placed.append((size, cx, cy, r))
                break
    return placed


def _shape_image(
    rng: np.random.Generator, w: int, h: int, grayscale: bool = False
) -> tuple[Image.Image, tuple[Shape, ...], str, str]:
    """Draw 1-3 shapes; return (RGB image, shapes, background words, background phrase)."""
    S = SUPERSAMPLE
    bg_names = ACHROMATIC_BACKGROUNDS if grayscale else tuple(BACKGROUND_COLOURS)
    bg, bg_phrase, bg_words = _background(rng, w * S, h * S, bg_names)
    bg_rgbs = [np.array(BACKGROUND_COLOURS[n], dtype=np.float32) for n in bg_words.split(" to ")]
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    palette = ACHROMATIC if grayscale else tuple(OBJECT_COLOURS)
    visible = [
        c
        for c in palette
        if min(np.linalg.norm(np.array(OBJECT_COLOURS[c]) - b) for b in bg_rgbs) > MIN_COLOUR_DISTANCE
    ]
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    placed = _place(rng, w, h, count)
    # Distinct colours while the palette allows: captions and pixel checks stay unambiguous.
    colours = [visible[k] for k in rng.permutation(len(visible))] * len(placed)
    shapes = []
    for (size, cx, cy, r), colour in zip(placed, colours):
        kind = _pick(rng, SHAPES)
        mask = Image.new("L", canvas.size, 0)
        _draw_shape(ImageDraw.Draw(mask), kind, cx * S, cy * S, r * S, float(rng.uniform(0, 2 * math.pi)))
        canvas.paste(OBJECT_COLOURS[colour], (0, 0), mask)
        px = cx + 0.775 * r if kind == "ring" else cx  # middle of the ring's band
        shapes.append(Shape(kind, colour, size, round(cx, 2), round(cy, 2), round(r, 2), (int(px), int(cy))))
    return canvas.reduce(S), tuple(shapes), bg_words, bg_phrase


def _shape_caption(rng: np.random.Generator, shapes: Sequence[Shape], bg_phrase: str, w: int, h: int) -> str:
    phrases = []
    for s in shapes:
        words = f"{s.size} {s.colour} {s.kind}" if rng.random() < 0.75 else f"{s.colour} {s.kind}"
        p = _with_article(words)
        if rng.random() < 0.3:
            p += " " + _position_words(s.cx, s.cy, w, h)
        phrases.append(p)
    objects = _join(phrases)
    templates = [
        "{o} on {b}",
        "{o} against {b}",
        "a picture of {o} on {b}",
        "an illustration of {o} on {b}",
        "a simple drawing of {o}, on {b}",
        "{b} with {o}",
    ]
    if len(shapes) > 1:
        templates.append("{n} shapes on {b}: {o}")
    return _pick(rng, templates).format(o=objects, b=bg_phrase, n=NUMBERS[len(shapes)])


def _random_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    w = int(rng.integers(min_size, max_size + 1))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = int(np.clip(round(w / aspect), min_size, max_size))
    return w, h


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 keeps small shapes' colours true under compression.
        img.save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Real photographs
# --------------------------------------------------------------------------------------

# One "<loader>  <caption>" line per caption, two per photo. Captions were written by looking
# at each image. The first three photos give one RGB JPEG, one grayscale PNG and one RGBA PNG
# even in a 20-item demo.
_PHOTO_CAPTIONS = """
skimage:astronaut  a portrait of a smiling astronaut in an orange spacesuit next to an american flag
skimage:astronaut  an astronaut in an orange flight suit holding a helmet, with a space shuttle model behind her
skimage:camera  a black and white photo of a man looking through a camera on a tripod
skimage:camera  a grayscale picture of a photographer with a tripod in a park
skimage:logo  the scikit-image logo, a green and orange circle with a snake
skimage:logo  a round green and orange logo with a stylized snake
skimage:coffee  a cup of espresso on a red saucer with a spoon, on a wooden table
skimage:coffee  a small coffee cup with crema on a dark red saucer
skimage:chelsea  a close-up of a tabby cat with green eyes
skimage:chelsea  a ginger tabby cat looking at the camera
skimage:rocket  a rocket on the launch pad at dusk between lightning towers
skimage:rocket  a white rocket standing on a launch pad under a deep blue evening sky
skimage:coins  rows of old coins on a dark background, black and white
skimage:coins  a grayscale photo of ancient coins laid out in a grid
skimage:colorwheel  a color wheel with a rainbow of hues on a black background
skimage:colorwheel  a circular color chart fading to white in the middle
skimage:retina  a photograph of the back of a human eye showing red blood vessels
skimage:retina  a retina image, orange and red with branching vessels
skimage:hubble_deep_field  a deep space image full of tiny colorful galaxies on a black sky
skimage:hubble_deep_field  many distant galaxies scattered across the dark night sky
skimage:immunohistochemistry  a microscope image of stained tissue in brown and blue
skimage:immunohistochemistry  brown stained cells under a microscope
skimage:moon  a gray close-up of the surface of the moon with small craters
skimage:moon  a grayscale image of lunar terrain
skimage:page  a scanned page of a book about image segmentation
skimage:page  a grayscale scan of printed text with a heading
skimage:text  handwritten math formulas on a sheet of paper, photographed at an angle
skimage:text  a photo of chalky handwritten equations
skimage:clock  a motion blurred photo of a round clock on a gray wall
skimage:clock  a blurry gray image of a clock
skimage:brick  a gray brick wall seen from above
skimage:brick  a texture of long gray bricks in a staggered pattern
skimage:grass  a close-up of grass and leaves in black and white
skimage:grass  a grayscale texture of a lawn
skimage:gravel  a close-up of small gray pebbles
skimage:gravel  a grayscale texture of gravel
skimage:horse  a black silhouette of a horse on a white background
skimage:horse  the outline of a standing horse in solid black
skimage:cell  a microscope image of a single round cell on a gray background
skimage:cell  a bright cell in a grainy gray microscope picture
sklearn:china.jpg  a chinese temple with a tiled roof among green trees
sklearn:china.jpg  a traditional pagoda-style building under a blue sky
sklearn:flower.jpg  a close-up of a pink flower with a yellow center
sklearn:flower.jpg  a pink dahlia-like flower in full bloom
"""


def _parse_captions(table: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for key, caption in (line.split("  ", 1) for line in table.strip().splitlines()):
        out[key] = (*out.get(key, ()), caption)
    return out


PHOTOS = _parse_captions(_PHOTO_CAPTIONS)  # loader -> captions, in the order above
GRAYSCALE_PNG_PHOTO = "skimage:camera"
RGBA_PNG_PHOTO = "skimage:logo"


@functools.cache
def _load_photo(key: str) -> np.ndarray | None:
    """Return the photo as a uint8 array, or None when its package is not installed."""
    source, name = key.split(":")
    if source == "skimage":
        import skimage.data

        arr = getattr(skimage.data, name)()
    else:
        try:
            from sklearn.datasets import load_sample_images
        except ImportError:
            return None
        found = load_sample_images()
        arr = found.images[[posixpath.basename(f) for f in found.filenames].index(name)]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def _available_photos() -> list[tuple[str, tuple[str, ...]]]:
    return [(k, caps) for k, caps in PHOTOS.items() if _load_photo(k) is not None]


def _photo_item(
    rng: np.random.Generator, key: str, captions: Sequence[str], sample_id: str, min_size: int, max_size: int
) -> DemoItem:
    arr = _load_photo(key)
    img = Image.fromarray(arr)
    if key == RGBA_PNG_PHOTO:
        img, fmt = img.convert("RGBA"), "png"
    elif key == GRAYSCALE_PNG_PHOTO:
        img, fmt = img.convert("L"), "png"
    else:
        img, fmt = img.convert("RGB"), "jpg"
    # Centre-crop aspect ratios that cannot fit the size range, then pick a scale inside it.
    w, h = img.size
    limit = max_size / min_size
    if w / h > limit:
        cw = int(h * limit)
        img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    elif h / w > limit:
        ch = int(w * limit)
        img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
    w, h = img.size
    lo, hi = max(min_size / w, min_size / h), min(max_size / w, max_size / h)
    scale = rng.uniform(lo, hi)
    size = (int(np.clip(round(w * scale), min_size, max_size)), int(np.clip(round(h * scale), min_size, max_size)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    return DemoItem(f"{sample_id}.{fmt}", _encode(img, fmt), _pick(rng, captions), size[0], size[1])


# --------------------------------------------------------------------------------------
# Public API: items
# --------------------------------------------------------------------------------------


def _shape_item(
    rng: np.random.Generator, sample_id: str, w: int, h: int, mode: str = "RGB", fmt: str = "jpg"
) -> DemoItem:
    img, shapes, bg_words, bg_phrase = _shape_image(rng, w, h, grayscale=mode == "L")
    caption = _shape_caption(rng, shapes, bg_phrase, w, h)
    img = img.convert(mode)
    return DemoItem(f"{sample_id}.{fmt}", _encode(img, fmt), caption, w, h, shapes=shapes, background=bg_words)


def generate(n: int, seed: int, min_size: int = 64, max_size: int = 256, photos: bool = True) -> Iterator[DemoItem]:
    """Yield `n` good items named ``demo-000000.<ext>`` ...; byte-identical for equal arguments.

    Each item draws from its own generator seeded with (seed, index). The bundled photographs
    (20, or 22 with scikit-learn) are spread evenly among the shapes, at most one item in five,
    each used once; none when `photos` is false.
    Formats: JPEG, with PNG for every tenth shape item, one RGBA PNG and one grayscale PNG
    (from the photos, or shape items 7 and 17 when there are no photos).
    """
    if not 32 <= min_size <= max_size:  # below 32 px a 3-shape scene no longer fits
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    catalog = _available_photos() if photos else []
    n_photos = min(len(catalog), n // 5)
    photo_at = {int((j + 0.5) * n / n_photos): j for j in range(n_photos)} if n_photos else {}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        sample_id = f"demo-{i:06d}"
        if i in photo_at:
            key, captions = catalog[photo_at[i]]
            yield _photo_item(rng, key, captions, sample_id, min_size, max_size)
            continue
        w, h = _random_size(rng, min_size, max_size)
        if not n_photos and i == 7:
            yield _shape_item(rng, sample_id, w, h, mode="RGBA", fmt="png")
        elif not n_photos and i == 17:
            yield _shape_item(rng, sample_id, w, h, mode="L", fmt="png")
        else:
            yield _shape_item(rng, sample_id, w, h, fmt="png" if i % 10 == 3 else "jpg")


def broken_items(seed: int = 0) -> list[DemoItem]:
    """One item per reason in BROKEN_REASONS; `expected` holds the reason.

    Sample ids are ``broken-<reason>``. The three caption cases are valid images: they test
    caption filtering downstream, not downloading.
    """
    rng = np.random.default_rng([seed, 1_000_000])

    def good(reason: str) -> DemoItem:
        return _shape_item(rng, f"broken-{reason}", 96, 96)

    def with_(item: DemoItem, reason: str, **changes) -> DemoItem:
        return dataclasses.replace(item, expected=reason, **changes)

    items = [with_(good("http_404"), "http_404")]
    corrupt = DemoItem("broken-corrupt_bytes.jpg", rng.bytes(4096), "a red circle", None, None)
    items.append(with_(corrupt, "corrupt_bytes"))
    full = good("truncated_jpeg")
    items.append(with_(full, "truncated_jpeg", data=full.data[: len(full.data) // 2]))
    items.append(
        DemoItem("broken-empty_file.jpg", b"", "a blue square on a white background", None, None, expected="empty_file")
    )
    tiny = Image.new("RGB", (8, 8), OBJECT_COLOURS["red"])
    items.append(
        DemoItem("broken-too_small.png", _encode(tiny, "png"), "a tiny red square", 8, 8, expected="too_small")
    )
    items.append(with_(good("empty_caption"), "empty_caption", caption=""))
    weird = good("control_chars_caption")
    items.append(
        with_(
            weird,
            "control_chars_caption",
            caption="\t" + weird.caption + "\n\r\x00\x07 \x1b[31mred\x1b[0m \u200b\u202eright-to-left\u202c"
            " caf\u0065\u0301 \U0001f7e5\n",
        )
    )
    long = good("long_caption")
    items.append(with_(long, "long_caption", caption=" ".join([long.caption] * (10_000 // len(long.caption) + 1))))
    assert tuple(i.expected for i in items) == BROKEN_REASONS
    return items


# --------------------------------------------------------------------------------------
# Public API: site, server, URL parquet
# --------------------------------------------------------------------------------------


def write_site(fs: pafs.FileSystem, root: str, items: Iterable[DemoItem]) -> list[dict]:
    """Write each item to ``root/images/<name>`` on `fs` (except http_404 ones); return rows.

    `root` is a path in `fs`'s own form: an absolute local path, or ``bucket/prefix`` for S3.
    Rows hold sample_id, path (relative to root), caption, expected, width, height.
    """
    root = root.rstrip("/")
    fs.create_dir(f"{root}/images", recursive=True)
    rows = []
    for item in items:
        path = f"images/{item.name}"
        if item.expected != "http_404":
            with fs.open_output_stream(f"{root}/{path}") as f:
                f.write(item.data)
        rows.append(
            {
                "sample_id": item.sample_id,
                "path": path,
                "caption": item.caption,
                "expected": item.expected,
                "width": item.width,
                "height": item.height,
            }
        )
    return rows


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files below `root` on a pyarrow filesystem; 404 for anything else."""

    fs: pafs.FileSystem
    root: str

    def _respond(self, with_body: bool) -> None:
        rel = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)).lstrip("/")
        path = f"{self.root}/{rel}"
        # Ask for the file type first: pyarrow reports a directory (or S3 prefix) opened for
        # reading as a bare OSError, which must be a 404 like a missing file.
        if rel in ("", ".") or rel.startswith("..") or self.fs.get_file_info(path).type != pafs.FileType.File:
            self.send_error(404)
            return
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.readall()
        except FileNotFoundError:  # deleted since get_file_info
            self.send_error(404)
            return
        except OSError as err:
            self.send_error(500, explain=str(err))
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(rel)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: img2dataset makes thousands of requests


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that time out and hang up
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(fs: pafs.FileSystem, root: str, port: int = 0) -> Iterator[str]:
    """Serve `root` on `fs` at ``http://127.0.0.1:<port>``; yield that base URL.

    ``port=0`` picks a free port; the pipeline passes a fixed one because the URLs written
    into a cached ``urls.parquet`` must stay valid on later runs.

    Files are read through `fs` on every request, so local and S3-backed roots behave the
    same. The server is shut down and its thread joined on exit.
    """
    handler = type("Handler", (_Handler,), {"fs": fs, "root": root.rstrip("/")})
    try:
        server = _QuietServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise OSError(f"demo site: cannot listen on 127.0.0.1:{port} ({e.strerror}); "
                      "pick another with urls.port=NNNN") from e
    thread = threading.Thread(target=server.serve_forever, name="demo-data-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


URL_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("url", "caption", "sample_id", "expected")]
    + [("width", pa.int32()), ("height", pa.int32())]
)


def write_url_parquet(rows: Iterable[dict], base_url: str, fs: pafs.FileSystem, path: str) -> pa.Table:
    """Write a LAION-style URL parquet (url, caption + metadata) sorted by sample_id; return it."""
    base = base_url.rstrip("/")
    records = [
        {"url": f"{base}/{urllib.parse.quote(r['path'])}", **{k: r[k] for k in URL_SCHEMA.names[1:]}}
        for r in sorted(rows, key=lambda r: r["sample_id"])
    ]
    table = pa.Table.from_pylist(records, schema=URL_SCHEMA)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return table


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (local path or s3://bucket/prefix)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--no-photos", action="store_true")
    parser.add_argument("--serve", action="store_true", help="serve the site until Ctrl-C")
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="base URL written into the parquet when not serving"
    )
    args = parser.parse_args(argv)

    out = args.out if "://" in args.out else os.path.abspath(args.out)
    fs, root = pafs.FileSystem.from_uri(out)
    items = list(generate(args.n, args.seed, args.min_size, args.max_size, photos=not args.no_photos))
    rows = write_site(fs, f"{root}/site", items + broken_items(args.seed))
    parquet = f"{root}/urls.parquet"
    if not args.serve:
        write_url_parquet(rows, args.base_url, fs, parquet)
        print(f"url parquet: {parquet}\nsite: {root}/site (serve it at {args.base_url})")
        return
    with serve(fs, f"{root}/site") as base_url:
        write_url_parquet(rows, base_url, fs, parquet)
        print(f"url parquet: {parquet}\nbase url: {base_url}\nserving {len(rows)} rows; Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
