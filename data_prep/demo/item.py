"""The demo site's data model: one :class:`DemoItem` per file, plus the helpers every item
source shares (a seeded choice, image encoding)."""

from __future__ import annotations

import io
import json
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

    @property
    def labels(self) -> str | None:
        """The drawing's ground truth as JSON (None for photos and broken items): ``background``
        and ``objects``, largest first (the "main object" an oracle is graded on), each with
        ``shape``, ``colour``, ``size`` and centre ``x``, ``y`` / width, height and ``r`` / min side.
        It travels beside the caption to the shard for evaluation and never into training."""
        if not self.shapes or not self.width or not self.height:
            return None
        side = min(self.width, self.height)
        objects = [{"shape": s.kind, "colour": s.colour, "size": s.size, "x": round(s.cx / self.width, 4),
                    "y": round(s.cy / self.height, 4), "r": round(s.r / side, 4)}
                   for s in sorted(self.shapes, key=lambda s: -s.r)]
        return json.dumps({"background": self.background, "objects": objects}, sort_keys=True)



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
