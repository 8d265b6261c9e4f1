"""The demo site's good items: shape scenes with the bundled photographs spread among them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_prep.demo.item import DemoItem
from data_prep.demo.photos import available_photos, photo_item
from data_prep.demo.shapes import random_size, shape_item


def generate(n: int, seed: int, min_size: int = 64, max_size: int = 256, photos: bool = True,
             scene: str = "mixed") -> Iterator[DemoItem]:
    """Yield `n` good items named ``demo-000000.<ext>`` ...; byte-identical for equal arguments.

    Each item draws from its own generator seeded with (seed, index). The bundled photographs
    (20, or 22 with scikit-learn) are spread evenly among the shapes, at most one item in five,
    each used once; none when `photos` is false. `scene`: the shape scenes' kind (shapes.SCENES).
    Formats: JPEG, with PNG for every tenth shape item, one RGBA PNG and one grayscale PNG
    (from the photos, or shape items 7 and 17 when there are no photos).
    """
    if not 32 <= min_size <= max_size:  # below 32 px a 3-shape scene no longer fits
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    catalog = available_photos() if photos else []
    n_photos = min(len(catalog), n // 5)
    photo_at = {int((j + 0.5) * n / n_photos): j for j in range(n_photos)} if n_photos else {}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        sample_id = f"demo-{i:06d}"
        if i in photo_at:
            key, captions = catalog[photo_at[i]]
            yield photo_item(rng, key, captions, sample_id, min_size, max_size)
            continue
        w, h = random_size(rng, min_size, max_size)
        if not n_photos and i == 7:
            yield shape_item(rng, sample_id, w, h, mode="RGBA", fmt="png", scene=scene)
        elif not n_photos and i == 17:
            yield shape_item(rng, sample_id, w, h, mode="L", fmt="png", scene=scene)
        else:
            yield shape_item(rng, sample_id, w, h, fmt="png" if i % 10 == 3 else "jpg", scene=scene)
