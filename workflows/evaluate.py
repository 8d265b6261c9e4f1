"""Stage ``evaluate``: every trained model against held-out real images, one metrics table.

One loop over the generators among the stage's inputs (``"<model>.<role>"``, as the stage table
built them), each loaded by its family (``workflows.family``: ``GENERATORS`` and ``load_generator``);
every generator samples one image per held-out caption with a fixed
seed; the result is compared with the held-out real images at the generator's resolution (the
shard stage decided the split, so no training stage saw them). Metrics: SWD on patches always
(needs no weights); Fréchet distance and k-NN precision/recall on a pluggable feature network
(``features``: ``tiny`` random convs offline, ``inception`` for FID, ``dinov2`` for FD-DINOv2
where weights exist); CLIP score with the configured open_clip model (the ``clip`` stage's weights
when it trained that model). Where the data carry ground
truth (the demo), the ``oracle`` stage's classifier grades prompt following (``colour_acc``,
``shape_acc``, ``background_acc``: the predicted attribute against the prompt's) and gives
``oracle_fd``; the table adds the chance level and the oracle's own accuracy on real held-out images.
With ``initial`` each model is also scored as its stage initialised it (``<model> (init)``), the
floor that learning is read against. Writes ``metrics.json``, ``metrics.md`` and one
``grid_<model>.png`` per model (samples with their prompts).
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
from genmodels.metrics.oracle import accuracy
from pipeline.stage import Stage
from pipeline.store import Artifact
from workflows import oracle, pagoda, report, shard_data, text_clip, wuerstchen
from workflows.train import export

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
    initial: bool = True  # also score each model as its stage initialised it: the floor learning is read against
    grid_images: int = 16  # samples per model drawn with their prompts (grid_<model>.png)
    prompt_repeats: int = 1  # samples per held-out prompt for the oracle's grades (distinct seeds)

    def validate(self) -> None:
        if self.n_samples < 2:
            raise ValueError(f"n_samples: need at least 2, got {self.n_samples}")
        if self.prompt_repeats < 1:
            raise ValueError(f"prompt_repeats: need at least 1, got {self.prompt_repeats}")


def heldout_reals(shard: Artifact, resolution: int,
                  cfg: EvaluateConfig) -> tuple[torch.Tensor, list[str], list[dict[str, str] | None]]:
    """Held-out images at ``resolution`` in [-1, 1], their captions and their ground truth
    (``shard_data.scene_labels``; all None for real data), in a deterministic order: by id."""
    images, truth, caps = shard_data.split_rows(shard, resolution, shard_data.HELDOUT, cfg.caption_column,
                                                limit=cfg.n_samples)
    if len(caps) < 2:
        raise ValueError(f"evaluate: only {len(caps)} held-out rows in {shard.uri}; "
                         "raise stages.shard.heldout_fraction")
    return torch.from_numpy(images), caps, truth


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


def judged(fake: torch.Tensor, real: torch.Tensor, truth: list[dict[str, str] | None],
           judge: tuple[Any, dict[str, Any]]) -> dict[str, float]:
    """The oracle's grades (workflows.oracle): per attribute, the share of samples whose predicted class
    is the one their prompt's ground truth names (``<attr>_acc``, over prompts with ground truth), and
    the Fréchet distance between the oracle's features of the samples and of the held-out reals."""
    model, meta = judge
    pf, ff = model.predict(fake)
    _, fr = model.predict(real)
    out = {"oracle_fd": float(frechet_distance_from_features(ff.double(), fr.double()))}
    known = [i for i, t in enumerate(truth) if t is not None]
    want = oracle.targets([truth[i] for i in known], meta["classes"])
    for attr, target in want.items():
        out[f"{attr}_acc"] = accuracy(pf[attr][known], target)
    return out


def build_features(cfg: EvaluateConfig) -> Callable | None:
    if not {"fd", "prdc"} & set(cfg.metrics):
        return None
    if cfg.features == "inception":
        return inception_features(pretrained=True)
    if cfg.features == "dinov2":
        return dinov2_features(pretrained=True)
    return tiny_features(seed=cfg.seed)


def generator_inputs(generators: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The evaluate stage's inputs: the shard, the oracle and, per model, its artifacts by role
    (``"<model>.<role>"``), from ``generators`` ({model: {role: stage}}; default: the families'
    ``GENERATORS``)."""
    if generators is None:
        generators = {m: needs for fam in FAMILIES for m, needs in fam.GENERATORS.items()}
    roles = {"shard": "shard", "oracle": "oracle", "clip": "clip"}
    for model, needs in generators.items():
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
        model = text_clip.clip_model(cfg.clip_model, text_clip.weights(inputs.get("clip"), cfg.clip_model,
                                                                       cfg.clip_pretrained))
        clip = (model, clip_mod.open_clip_lib().get_tokenizer(cfg.clip_model))
    table: dict[str, dict[str, float]] = {}
    judge = oracle.load(inputs["oracle"]) if "oracle" in inputs else None
    reals: dict[int, tuple[torch.Tensor, list[str], list[dict[str, str] | None]]] = {}
    models = models_in(inputs)
    for fam, arts in models.values():
        for initial in (False, True) if cfg.initial else (False,):
            gen = fam.load_generator(arts, initial=initial)
            name = f"{gen.name} (init)" if initial else gen.name
            if gen.resolution not in reals:
                reals[gen.resolution] = heldout_reals(shard, gen.resolution, cfg)
            real, caps, truth = reals[gen.resolution]
            with torch.no_grad():  # each prompt prompt_repeats times: the oracle's grades get more samples
                fake = gen.sample(caps * cfg.prompt_repeats, cfg.seed)
            table[name] = score(fake[:len(caps)], real, caps, cfg, feats, clip) | {"nfe": float(gen.nfe)}
            if judge is not None:
                table[name] |= judged(fake, real, truth * cfg.prompt_repeats, judge)
            if not initial:
                out.write_bytes(f"grid_{gen.name}.png", export.captioned_grid(fake[:cfg.grid_images],
                                                                               caps[:cfg.grid_images]))
    if judge is not None and reals:
        truth = next(iter(reals.values()))[2]
        table["chance"] = {f"{k}_acc": v for k, v in oracle.chance([t for t in truth if t]).items()}
        for r, acc in judge[1]["heldout_accuracy"].items():
            table[f"oracle on real {r} px"] = {f"{k}_acc": v for k, v in acc.items()}
    out.write_json("metrics.json", table)
    out.write_bytes("metrics.md", ("\n".join(report.metrics_markdown(table)) + "\n").encode())
    for m, v in table.items():
        log.info("[evaluate] %s: %s", m, ", ".join(f"{k}={x:.4g}" for k, x in v.items()))
    return {"models": len(models), "n_samples": cfg.n_samples, "wall_s": round(time.time() - t0, 2),
            **{f"swd_{m}": round(v["swd"], 4) for m, v in table.items() if "swd" in v}}


STAGE = Stage("evaluate", run, EvaluateConfig, inputs=generator_inputs())
