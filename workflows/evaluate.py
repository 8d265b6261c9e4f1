"""Stage ``evaluate``: every trained model against held-out real images, one metrics table.

One loop over the generators among the stage's inputs (``"<model>.<role>"``, as the stage table
built them), each loaded by its family (``workflows.family``: ``GENERATORS`` and ``load_generator``);
every generator samples one image per held-out caption with a fixed
seed; the result is compared with the held-out real images at the generator's resolution (the
shard stage decided the split, so no training stage saw them). Metrics: SWD on patches always
(needs no weights); Fréchet distance and k-NN precision/recall on a pluggable feature network
(``features``: ``tiny`` random convs offline, ``inception`` for FID, ``dinov2`` for FD-DINOv2
where weights exist); CLIP score with the configured open_clip model. Writes ``metrics.json``
and ``metrics.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

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
from pipeline.stage import Stage
from pipeline.store import Artifact
from workflows import pagoda, report, shard_data, wuerstchen

FAMILIES = (wuerstchen, pagoda)
log = logging.getLogger("genmodels")


@dataclass(frozen=True)
class EvaluateConfig:
    """n_samples: images generated per model (and at most that many held-out reals).
    metrics: any of swd, fd, prdc, clip_score. features: network for fd/prdc.
    clip_model / clip_pretrained: the CLIP score's model (open_clip name and tag)."""

    n_samples: int = 64
    seed: int = 1234
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
    """Held-out images at ``resolution`` in [-1, 1] and their captions (deterministic order: by id)."""
    col = shard_data.image_column(shard_data.columns(shard), resolution)
    table = shard_data.read_table(shard, ["caption", *_alt(cfg), col], split=shard_data.HELDOUT)
    table = table.sort_by("sample_id").slice(0, cfg.n_samples)
    if table.num_rows < 2:
        raise ValueError(f"evaluate: only {table.num_rows} held-out rows in {shard.uri}; "
                         "raise stages.shard.heldout_fraction")
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    caps = shard_data.captions(rows, cfg.caption_column)
    return torch.from_numpy(shard_data.decode(rows[col], resolution)), [str(c) for c in caps]


def _alt(cfg: EvaluateConfig) -> list[str]:
    return [cfg.caption_column] if cfg.caption_column != "caption" else []


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


def build_features(cfg: EvaluateConfig) -> Callable | None:
    if not {"fd", "prdc"} & set(cfg.metrics):
        return None
    if cfg.features == "inception":
        return inception_features(pretrained=True)
    if cfg.features == "dinov2":
        return dinov2_features(pretrained=True)
    return tiny_features(seed=cfg.seed)


def generator_inputs() -> dict[str, str]:
    """The evaluate stage's inputs: the shard and, per model of every family, its artifacts by role
    (``"<model>.<role>"``), taken from the families' ``GENERATORS``."""
    roles = {"shard": "shard"}
    for fam in FAMILIES:
        for model, needs in fam.GENERATORS.items():
            roles.update({f"{model}.{role}": stage for role, stage in needs.items()})
    return roles


def models_in(inputs: dict[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{model: (family, {role: input})} of every ``"<model>.<role>"`` input, in input order. The table is
    config-driven (full_pipeline.stage_table: e.g. PaGoDA grown to 512 px), so the models are the
    inputs', not a family's default ``GENERATORS``. The family: the one that lists the model, else the
    one whose generators need exactly these roles (every PaGoDA resolution needs one ``generator``)."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, art in inputs.items():
        model, dot, role = key.rpartition(".")
        if dot:
            grouped.setdefault(model, {})[role] = art
    out = {}
    for model, arts in grouped.items():
        fams = [f for f in FAMILIES if model in f.GENERATORS] or [
            f for f in FAMILIES if any(set(needs) == set(arts) for needs in f.GENERATORS.values())]
        if len(fams) != 1:
            raise ValueError(f"evaluate: input {model!r} (roles {sorted(arts)}) matches "
                             f"{len(fams)} families' generators, not one")
        out[model] = fams[0], arts
    return out


def run(inputs: dict[str, Artifact], cfg: EvaluateConfig, out: Artifact) -> dict[str, Any]:
    t0 = time.time()
    shard = inputs["shard"]
    feats = build_features(cfg)
    clip = None
    if "clip_score" in cfg.metrics:
        model, _, tokenizer = clip_mod.build_clip(cfg.clip_model, cfg.clip_pretrained)
        clip = (model, tokenizer)
    table: dict[str, dict[str, float]] = {}
    for fam, arts in models_in(inputs).values():
        gen = fam.load_generator(arts)
        real, caps = heldout_reals(shard, gen.resolution, cfg)
        with torch.no_grad():
            fake = gen.sample(caps, cfg.seed)
        table[gen.name] = score(fake, real, caps, cfg, feats, clip) | {"nfe": float(gen.nfe)}

    out.write_json("metrics.json", table)
    out.write_bytes("metrics.md", ("\n".join(report.metrics_markdown(table)) + "\n").encode())
    for m, v in table.items():
        log.info("[evaluate] %s: %s", m, ", ".join(f"{k}={x:.4g}" for k, x in v.items()))
    return {"models": len(table), "n_samples": cfg.n_samples, "wall_s": round(time.time() - t0, 2),
            **{f"swd_{m}": round(v["swd"], 4) for m, v in table.items() if "swd" in v}}


STAGE = Stage("evaluate", run, EvaluateConfig, inputs=generator_inputs())
