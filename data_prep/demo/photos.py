"""The real photographs that ship inside scikit-image (and scikit-learn, when installed), each
with two captions written by looking at the image."""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_prep.demo.item import DemoItem, encode, pick

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
        import skimage.data  # lazy: importing scikit-image takes seconds; loaded once (cached)

        arr = getattr(skimage.data, name)()
    else:
        try:
            from sklearn.datasets import load_sample_images  # lazy and optional: scikit-learn may be absent
        except ImportError:
            return None
        found = load_sample_images()
        arr = found.images[[posixpath.basename(f) for f in found.filenames].index(name)]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def available_photos() -> list[tuple[str, tuple[str, ...]]]:
    return [(k, caps) for k, caps in PHOTOS.items() if _load_photo(k) is not None]


def photo_item(
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
    return DemoItem(f"{sample_id}.{fmt}", encode(img, fmt), pick(rng, captions), size[0], size[1])
