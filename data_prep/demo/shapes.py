"""Shape scenes: 1-3 coloured geometric shapes on a background, and a caption written from the
recorded drawing spec, so a caption never names a colour or a shape that was not drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_prep.demo.item import DemoItem, Shape, encode, pick

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
# "mixed": 1-3 shapes of any size on any background (what the data stages are tested on);
# "simple": one medium or large shape, whole after a centre crop, on a plain background: what a
# tiny model learns on 2 cores in minutes (the demo's training data, issue 11).
SCENES = ("mixed", "simple")
SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing


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


def _background(rng: np.random.Generator, w: int, h: int, names: Sequence[str],
                plain: bool = False) -> tuple[np.ndarray, str, str]:
    """Return (HxWx3 float array, caption phrase, colour words) for a random background."""
    base = pick(rng, names)
    rgb = np.array(BACKGROUND_COLOURS[base], dtype=np.float32)
    style = "plain" if plain else pick(rng, ("plain", "plain", "gradient", "speckled", "striped"))
    img = np.broadcast_to(rgb, (h, w, 3)).astype(np.float32)
    if style == "gradient":
        other = pick(rng, [n for n in names if n != base])
        if rng.random() < 0.5:  # left to right
            t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        else:  # top to bottom
            t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        img = rgb * (1 - t) + np.array(BACKGROUND_COLOURS[other], dtype=np.float32) * t
        img = np.broadcast_to(img, (h, w, 3))
        phrase = pick(rng, (f"a gradient background from {base} to {other}", f"a {base} to {other} gradient"))
        return img, phrase, f"{base} to {other}"
    if style == "speckled":
        img = img + rng.normal(0.0, 14.0, size=(h, w, 1)).astype(np.float32)
        phrase = pick(rng, (f"a speckled {base} background", f"a noisy {base} background"))
    elif style == "striped":
        period = int(rng.integers(6, 16)) * SUPERSAMPLE
        yy, xx = np.mgrid[0:h, 0:w]
        coord = pick(rng, (xx, yy, xx + yy))
        dark = 0.85 if rgb.mean() > 128 else 1.6
        stripe = ((coord // (period // 2)) % 2 == 1)[..., None]
        img = np.where(stripe, np.clip(rgb * dark, 0, 255), rgb)
        phrase = pick(rng, (f"a striped {base} background", f"a faintly striped {base} background"))
    else:
        phrase = pick(rng, (f"a {base} background", f"a plain {base} background"))
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


def _place(rng: np.random.Generator, w: int, h: int, count: int,
           sizes: Sequence[str] = tuple(SIZES), central: bool = False) -> list[tuple[str, float, float, float]]:
    """Non-overlapping (size, cx, cy, r) placements; shrinks or drops objects that do not fit.
    `central`: inside the centred min(w, h) square, so a centre crop keeps the whole object."""
    placed: list[tuple[str, float, float, float]] = []
    s = min(w, h)
    x0, y0, x1, y1 = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2) if central else (0, 0, w, h)
    for _ in range(count):
        size = pick(rng, tuple(sizes))
        for attempt in range(60):
            if attempt == 30:
                size = "small"
            lo, hi = SIZES[size]
            r = max(5.0, s * rng.uniform(lo, hi))
            cx, cy = rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 3 for _, x, y, q in placed):
                placed.append((size, cx, cy, r))
                break
    return placed


def _shape_image(
    rng: np.random.Generator, w: int, h: int, grayscale: bool = False, scene: str = "mixed"
) -> tuple[Image.Image, tuple[Shape, ...], str, str]:
    """Draw 1-3 shapes ("mixed"), or one medium or large shape inside the centre square on a plain
    background ("simple"); return (RGB image, shapes, background words, background phrase)."""
    if scene not in SCENES:
        raise ValueError(f"scene: one of {SCENES}, got {scene!r}")
    simple = scene == "simple"
    S = SUPERSAMPLE
    bg_names = ACHROMATIC_BACKGROUNDS if grayscale else tuple(BACKGROUND_COLOURS)
    bg, bg_phrase, bg_words = _background(rng, w * S, h * S, bg_names, plain=simple)
    bg_rgbs = [np.array(BACKGROUND_COLOURS[n], dtype=np.float32) for n in bg_words.split(" to ")]
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    palette = ACHROMATIC if grayscale else tuple(OBJECT_COLOURS)
    visible = [
        c
        for c in palette
        if min(np.linalg.norm(np.array(OBJECT_COLOURS[c]) - b) for b in bg_rgbs) > MIN_COLOUR_DISTANCE
    ]
    if simple:
        placed = _place(rng, w, h, 1, sizes=("medium", "large"), central=True)
    else:
        placed = _place(rng, w, h, int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])))
    # Distinct colours while the palette allows: captions and pixel checks stay unambiguous.
    colours = [visible[k] for k in rng.permutation(len(visible))] * len(placed)
    shapes = []
    for (size, cx, cy, r), colour in zip(placed, colours):
        kind = pick(rng, SHAPES)
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
    return pick(rng, templates).format(o=objects, b=bg_phrase, n=NUMBERS[len(shapes)])


def random_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    w = int(rng.integers(min_size, max_size + 1))
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = int(np.clip(round(w / aspect), min_size, max_size))
    return w, h



def shape_item(
    rng: np.random.Generator, sample_id: str, w: int, h: int, mode: str = "RGB", fmt: str = "jpg",
    scene: str = "mixed",
) -> DemoItem:
    img, shapes, bg_words, bg_phrase = _shape_image(rng, w, h, grayscale=mode == "L", scene=scene)
    caption = _shape_caption(rng, shapes, bg_phrase, w, h)
    img = img.convert(mode)
    return DemoItem(f"{sample_id}.{fmt}", encode(img, fmt), caption, w, h, shapes=shapes, background=bg_words)
