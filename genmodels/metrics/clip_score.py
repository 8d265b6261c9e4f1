"""CLIP score of image–text pairs (Hessel et al. 2021, "CLIPScore", §3, Eq. 1).

CLIP-S(c, v) = w · max(cos(c, v), 0) with w = 2.5 (the paper's rescaling). w = 100 gives the
"100 · cos clipped at 0" scale many text-to-image papers report; it is the same quantity.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_score(image_features: Tensor, text_features: Tensor, w: float = 2.5) -> Tensor:
    """Per-pair CLIP score (B,) of matched rows of image and text embeddings (B, D).

    Embeddings need not be normalised. Average with `.mean()`; per-pair values let callers
    accumulate across batches.
    """
    cos = F.cosine_similarity(image_features.to(torch.float64), text_features.to(torch.float64), dim=-1)
    return w * cos.clamp_min(0)


@torch.no_grad()
def clip_score_from_encoders(
    images: Tensor,
    tokens: Tensor,
    encode_image: Callable[[Tensor], Tensor],
    encode_text: Callable[[Tensor], Tensor],
    w: float = 2.5,
) -> Tensor:
    """Per-pair CLIP score computed with the given encoders.

    `images` and `tokens` are whatever the encoders take. With `genmodels.clip`:
    `clip_score_from_encoders(pixels, tokenizer(captions), partial(encode_image, model),
    partial(encode_text_pooled, model))`.
    """
    return clip_score(encode_image(images), encode_text(tokens), w)
