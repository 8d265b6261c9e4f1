"""One fake shard for the tests that need training data without running the data stages.

It is written on the shard stage's own schema (``data_prep.shard.schema``) and split rule, from
the demo's generated images, so a reader that works on it works on a real shard.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
from PIL import Image, ImageOps

from data_prep import demo
from data_prep.images import decode_rgb, encode
from data_prep.shard import ShardConfig, schema, split_labels
from pipeline.store import Artifact


def write_fake_shard(art: Artifact, n: int, resolutions=(16, 32, 64), seed: int = 0, files: int = 2,
                     heldout_fraction: float = 0.1, photos: bool = False, recaption: str = "some",
                     scene: str = "mixed") -> pa.Table:
    """Write ``parquet/NNNNN.parquet`` files as the shard stage lays them out; return the table.

    ``recaption``: ``"some"`` leaves every third recaption empty (the caption fallback is then
    exercised) and prefixes the others; ``"copy"`` repeats the caption. ``photos`` mixes in the
    demo's real photographs beside its drawn shapes; ``scene``: the shapes' kind (demo.SCENES).
    ``labels`` carries each drawing's ground truth, as the demo's URL list does.
    """
    cfg = ShardConfig(resolutions=list(resolutions), heldout_fraction=heldout_fraction)
    items = list(demo.generate(n, seed, min_size=64, max_size=128, photos=photos, scene=scene))
    splits = split_labels([it.sample_id for it in items], heldout_fraction)
    rows = []
    for i, item in enumerate(items):
        img = decode_rgb(item.data)
        row = {"sample_id": item.sample_id, "key": f"{i:09d}", "source_shard": "00000",
               "split": splits[i], "caption": item.caption,
               "recaption": item.caption if recaption == "copy" else "" if i % 3 == 0 else f"an image: {item.caption}",
               "orig_width": img.width, "orig_height": img.height, "aspect": img.width / img.height,
               "clip_sim": 0.3, "aesthetic": 5.5, "pwatermark": None, "punsafe": None,
               "caption_words": len(item.caption.split()), "sha256": hashlib.sha256(item.data).hexdigest(),
               "labels": item.labels}
        for r in resolutions:
            row[f"jpg_{r}"] = encode(ImageOps.fit(img, (r, r), Image.Resampling.BICUBIC), "jpg", quality=95)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema(cfg))
    step = -(-n // files)
    for f in range(files):
        art.write_parquet(f"parquet/{f:05d}.parquet", table.slice(f * step, step))
    return table
