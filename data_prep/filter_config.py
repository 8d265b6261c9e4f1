"""Settings of the filter stage and the names its rows use (reasons, LAION's score columns).

Split from :mod:`data_prep.filter` (which re-exports all of it) to keep each file one topic.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep import images
from data_prep.partitions import TarPassConfig
from pipeline.config import path_field

REASONS = ("decode_error", "too_large", "too_small", "bad_aspect", "blank", "clip_sim", "aesthetic", "pwatermark",
           "punsafe", "caption_empty", "caption_short", "caption_long", "caption_language", "dup_exact", "dup_near")
IMAGE_ERRORS = ("decode_error", "too_large")  # set in ``image_error``; no other image check runs then
# Each score's LAION column (canonical names written by the urls stage).
LAION = {"clip_sim": "laion_similarity", "aesthetic": "laion_aesthetic", "pwatermark": "laion_pwatermark",
         "punsafe": "laion_punsafe"}


@dataclass(frozen=True)
class FilterConfig(TarPassConfig):
    """Settings of the filter stage (``stages.filter``). Defaults are LAION-5B's paper values.

    clip_model / clip_pretrained: open_clip model name and pretrained tag (or checkpoint path);
        ``tiny-clip`` with no tag is the random offline model. LAION's 0.28 threshold is for
        ViT-B/32; other models need their own threshold.
    aesthetic_head / watermark_head / nsfw_head: weight files of heads on the CLIP image
        embedding (see :class:`data_prep.models.EmbeddingHead`); empty → that score is not
        computed (null column, listed under ``skipped`` in the counts) and its threshold unused.
    min_clip_sim: reject below this image-caption cosine similarity (LAION: 0.28, OpenAI
        ViT-B/32). Applies to whichever source a row's score has: LAION's ``laion_similarity``
        where present, else ``clip_model``'s.
    min_aesthetic: reject below this aesthetic score (LAION-Aesthetics: 5.0; LAION's
        ``AESTHETIC_SCORE`` where present, else the aesthetic head).
    max_pwatermark / max_punsafe: reject above these probabilities (LAION: 0.5 / 0.99... for
        "unsafe" LAION tagged rather than removed; 0.99 keeps all but the surest).
    min_side: reject (``too_small``) when the shorter side of the stored image or of the
        original is smaller (pixels; paper runs 512). The stored image is what the shard stage
        crops from: a 4000x50 banner stored at 256x3 fails on its stored side.
    max_aspect_ratio: reject (``bad_aspect``) when long/short side of the original or of the
        stored image is above this (0: off). 3.0 is DataComp's basic filter on LAION-style
        CommonPool metadata (Gadre et al., 2023: shorter side >= 200 px, aspect <= 3); training
        crops a centred square, which keeps a third of a 3:1 image and less beyond.
    max_uniform_fraction: reject (``blank``) stored images of which at least this share of
        pixels is one colour (:func:`data_prep.images.uniform_fraction`; 0: off). Catches blank
        placeholders and 16-bit sources that a resizer saturated to white; 0.995 still keeps a
        small shape on a plain background (the demo's sparsest scenes measure up to 0.991).
    use_laion_scores: apply the similarity/aesthetic/watermark/unsafe thresholds to the input's
        ``laion_*`` values where present (see the module notes), the model's elsewhere.
    min_caption_words / max_caption_chars: caption length bounds after cleanup
        (0 words is always rejected as ``caption_empty``).
    min_latin_fraction: reject captions with a smaller share of Latin-script letters (0: off).
    dedup_exact: reject later copies of byte-identical downloads (sha256).
    near_dup_threshold: reject a row whose embedding has cosine ≥ this with an earlier kept
        candidate in its cluster (0: off). Earlier = smaller (shard, key).
    dedup_cluster_size: target rows per k-means cluster (k = ceil(rows / this)).
    dedup_sample: rows used to fit the k-means centroids.
    batch_size: rows per CLIP forward pass; actors: CLIP actor pool size.
    gpus_per_actor: GPUs per CLIP actor (fractional ok); GPU actors request 0 CPUs.
    cpus_per_actor: CPUs per CLIP actor when on CPU (fractional so that a 2-CPU node still has
        slots for the read and preprocessing tasks; see environment.md).
    cpus_per_task: CPUs per preprocessing task (GPU actors only; CPU actors preprocess themselves).
    max_image_pixels: decompression-bomb guard for decoding.
    """

    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    aesthetic_head: str = path_field("")
    watermark_head: str = path_field("")
    nsfw_head: str = path_field("")
    min_clip_sim: float = 0.28
    min_aesthetic: float = 5.0
    max_pwatermark: float = 0.5
    max_punsafe: float = 0.99
    min_side: int = 512
    max_aspect_ratio: float = 3.0
    max_uniform_fraction: float = 0.995
    use_laion_scores: bool = True
    min_caption_words: int = 1
    max_caption_chars: int = 1000
    min_latin_fraction: float = 0.5
    dedup_exact: bool = True
    near_dup_threshold: float = 0.96
    dedup_cluster_size: int = 10_000
    dedup_sample: int = 100_000
    batch_size: int = 64
    cpus_per_task: float = 1.0
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        for name in ("batch_size", "actors", "dedup_cluster_size", "dedup_sample", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold: must be in [0, 1] (0: off), got {self.near_dup_threshold}")
        if not 0.0 <= self.max_uniform_fraction <= 1.0:
            raise ValueError(f"max_uniform_fraction: must be in [0, 1] (0: off), got {self.max_uniform_fraction}")
        if self.max_aspect_ratio and self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio: must be >= 1 (long/short side; 0: off), got {self.max_aspect_ratio}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task: must be > 0, got {self.cpus_per_task}")
        self.validate_pool()

    def heads(self) -> dict[str, str | None]:
        return {"aesthetic": self.aesthetic_head or None, "pwatermark": self.watermark_head or None,
                "punsafe": self.nsfw_head or None}
