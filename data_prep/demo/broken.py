"""The failures a web crawl meets, one item each, so the pipeline's filtering is exercised too."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from data_prep.demo.item import DemoItem, encode
from data_prep.demo.shapes import OBJECT_COLOURS, shape_item

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


def broken_items(seed: int = 0) -> list[DemoItem]:
    """One item per reason in BROKEN_REASONS; `expected` holds the reason.

    Sample ids are ``broken-<reason>``. The three caption cases are valid images: they test
    caption filtering downstream, not downloading.
    """
    rng = np.random.default_rng([seed, 1_000_000])

    def good(reason: str) -> DemoItem:
        return shape_item(rng, f"broken-{reason}", 96, 96)

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
        DemoItem("broken-too_small.png", encode(tiny, "png"), "a tiny red square", 8, 8, expected="too_small")
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
