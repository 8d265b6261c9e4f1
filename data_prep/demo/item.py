"""The demo site's data model: one :class:`DemoItem` per file, plus the helpers every item
source shares (a seeded choice, image encoding)."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

OK = "ok"  # the ``expected`` value of a good item


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



def pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 keeps small shapes' colours true under compression.
        img.save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
