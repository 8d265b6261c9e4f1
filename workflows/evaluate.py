"""Stage ``evaluate``: every trained model against held-out real images, one metrics table.

For each model (Würstchen; PaGoDA at each resolution) it generates ``n_samples`` images from
held-out captions with fixed seeds and compares them with the held-out real images at the
model's resolution (data_prep.splits decides held-out by sample id, so training never saw
them). Metrics: SWD on patches always (needs no weights); Fréchet distance and k-NN
precision/recall on a pluggable feature network (``features``: ``tiny`` random convs
offline, ``inception`` for FID, ``dinov2`` for FD-DINOv2 where weights exist); CLIP score
with the configured open_clip model. Writes ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pyarrow.dataset as pads
import torch

from data_prep.splits import heldout_mask
from genmodels import clip as clip_mod
from genmodels.metrics import (
    clip_score,
    dinov2_features,
    frechet_distance_from_features,
    inception_features,
    prdc,
    swd,
    tiny_features,
)
from workflows import report
from workflows.store import Artifact

log = logging.getLogger("genmodels")


@dataclass(frozen=True)
class EvaluateConfig:
    """n_samples: images generated per model (and at most that many held-out reals).
    heldout_fraction: must match the training stages' (default 0.1).
    metrics: any of swd, fd, prdc, clip_score. features: network for fd/prdc.
    clip_model / clip_pretrained: the CLIP score's model (open_clip name and tag)."""

    n_samples: int = 64
    seed: int = 1234
    heldout_fraction: float = 0.1
    caption_column: str = "caption"
    metrics: list[Literal["swd", "fd", "prdc", "clip_score"]] = field(
        default_factory=lambda: ["swd", "fd", "prdc", "clip_score"])
    features: Literal["tiny", "inception", "dinov2"] = "tiny"
    clip_model: str = "tiny-clip"
    clip_pretrained: str | None = None
    swd_patches_per_image: int = 128

    def validate(self) -> None:
        if self.n_samples < 2:
            raise ValueError(f"n_samples: need at least 2, got {self.n_samples}")


def heldout_reals(shard: Artifact, resolution: int, cfg: EvaluateConfig) -> tuple[torch.Tensor, list[str]]:
    """Held-out images at ``resolution`` in [-1, 1] and their captions (deterministic order)."""
    from workflows.pagoda_invert import decode_images, image_column, shard_columns

    col = image_column(shard_columns(shard, "parquet"), resolution)
    table = pads.dataset(shard.child("parquet"), filesystem=shard.fs, format="parquet").to_table(
        columns=["sample_id", "caption", "recaption", col])
    ids = np.array(table.column("sample_id").to_pylist())
    keep = np.flatnonzero(heldout_mask(ids, cfg.heldout_fraction))
    keep = keep[np.argsort(ids[keep])][: cfg.n_samples]
    if len(keep) < 2:
        raise ValueError(f"evaluate: only {len(keep)} held-out rows in {shard.uri}; raise heldout_fraction")
    caps = table.column(cfg.caption_column).to_pylist()
    images = decode_images(np.array(table.column(col).to_pylist(), dtype=object)[keep], resolution)
    return torch.from_numpy(images), [str(caps[i] or "") for i in keep]


def score(fake: torch.Tensor, real: torch.Tensor, captions: list[str], cfg: EvaluateConfig,
          feats: Callable | None, clip: tuple | None) -> dict[str, float]:
    out: dict[str, float] = {"n_fake": float(len(fake)), "n_real": float(len(real))}
    if "swd" in cfg.metrics:
        out["swd"] = float(swd(fake, real, patches_per_image=cfg.swd_patches_per_image,
                               generator=torch.Generator().manual_seed(cfg.seed))[1])
    if feats is not None:
        with torch.no_grad():
            ff, fr = feats(fake), feats(real)
        ff, fr = (ff[0], fr[0]) if isinstance(ff, tuple) else (ff, fr)
        if "fd" in cfg.metrics:
            out[f"fd_{cfg.features}"] = float(frechet_distance_from_features(ff.double(), fr.double()))
        if "prdc" in cfg.metrics:
            k = max(1, min(3, len(fr) - 1))
            pr = prdc(fr, ff, k=k)
            out["precision"], out["recall"] = float(pr["precision"]), float(pr["recall"])
    if clip is not None:
        model, tokenizer = clip
        with torch.no_grad():
            img = clip_mod.encode_image(model, clip_mod.preprocess_tensor(model, fake))
            txt = clip_mod.encode_text_pooled(model, tokenizer(captions[: len(fake)]))
        out["clip_score"] = float(clip_score(img, txt).mean())
    return out


def pagoda_generate(gen, meta: dict[str, Any], captions: list[str], seed: int) -> torch.Tensor:
    """One forward pass per held-out caption from z ~ N(0, σ_max² I) at the base resolution (PaGoDA §3.2)."""
    from genmodels.pagoda import sample_latents
    from workflows.pagoda_control import decode
    from workflows.pagoda_invert import TextEncoder

    cond = TextEncoder(**meta["text"])(captions) if meta.get("text") else {}
    base = int(meta["base_resolution"])
    z = sample_latents((len(captions), 3, base, base), generator=torch.Generator().manual_seed(seed))
    return decode(gen, z, cond)


def build_features(cfg: EvaluateConfig) -> Callable | None:
    if not {"fd", "prdc"} & set(cfg.metrics):
        return None
    if cfg.features == "inception":
        return inception_features(pretrained=True)
    if cfg.features == "dinov2":
        return dinov2_features(pretrained=True)
    return tiny_features(seed=cfg.seed)


def run(inputs: dict[str, Artifact], cfg: EvaluateConfig, out: Artifact) -> dict[str, Any]:
    from workflows import pagoda_stages, sample_wuerstchen

    t0 = time.time()
    shard = inputs["shard"]
    feats = build_features(cfg)
    clip = None
    if "clip_score" in cfg.metrics:
        model, _, tokenizer = clip_mod.build_clip(cfg.clip_model, cfg.clip_pretrained)
        clip = (model, tokenizer)
    table: dict[str, dict[str, float]] = {}

    # Würstchen: prompts are the held-out captions, one image each, seeds fixed per prompt.
    if "wuerstchen_stage_c" in inputs:
        ms = sample_wuerstchen.load_trained_set(inputs["wuerstchen_stage_a"], inputs["wuerstchen_stage_b"],
                                                inputs["wuerstchen_stage_c"])
        real, caps = heldout_reals(shard, ms.image_size, cfg)
        scfg = sample_wuerstchen.SampleConfig(prompts=caps, n_per_prompt=1, seed=cfg.seed, device="cpu")
        fake, _ = sample_wuerstchen.generate(ms, scfg, caps)
        table["wuerstchen"] = score(fake, real, caps, cfg, feats, clip)

    # PaGoDA: the one-step generator at every resolution it was trained at.
    for name in sorted(n for n in inputs if n.startswith("pagoda_") and n != "pagoda_sample"):  # the generators
        gen, meta = pagoda_stages.load_generator(inputs[name])
        res = int(meta["resolution"])
        real, caps = heldout_reals(shard, res, cfg)
        table[f"pagoda_{res}"] = score(pagoda_generate(gen, meta, caps, cfg.seed), real, caps, cfg, feats, clip)

    out.write_json("metrics.json", table)
    out.write_bytes("metrics.md", ("\n".join(report.metrics_markdown(table)) + "\n").encode())
    for m, v in table.items():
        log.info("[evaluate] %s: %s", m, ", ".join(f"{k}={x:.4g}" for k, x in v.items()))
    return {"models": len(table), "n_samples": cfg.n_samples, "wall_s": round(time.time() - t0, 2),
            **{f"swd_{m}": round(v["swd"], 4) for m, v in table.items() if "swd" in v}}
