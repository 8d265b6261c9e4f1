"""Stage ``oracle``: a classifier of the ground truth, trained once on the real training images, that
``evaluate`` uses as its judge (genmodels.metrics.oracle).

Reads the shard's ``train`` rows that carry ``labels`` (the demo's shape scenes; real data has none),
trains :class:`SceneOracle` to predict the main object's colour and shape and the background colour
(the shape from the scene's foreground map only, which no recolouring changes: see that module),
and measures it on the ``heldout`` rows at every resolution the generators sample at (a 16 px image
is resized up to the oracle's input, as a 16 px sample will be). Without labelled rows it writes an
empty artifact and ``evaluate`` leaves the oracle's metrics out.

Output: ``oracle.pt`` (state dict), ``oracle.json`` (classes, network, colour-blind heads, held-out
accuracy per resolution and attribute, chance = the most frequent class's share of the held-out rows,
training seconds).
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from genmodels.metrics.oracle import OracleConfig, SceneOracle, accuracy, fit, resize
from pipeline.stage import Stage, in_task
from pipeline.store import Artifact
from workflows import shard_data

log = logging.getLogger("genmodels")

ATTRIBUTES = ("colour", "shape", "background")


@dataclass(frozen=True)
class OracleStageConfig:
    """resolution: the shard images it learns from; judged_at: resolutions its held-out accuracy is
    reported at (the generators'); size/patch/width/hidden: the network (OracleConfig); steps,
    batch_size, lr, seed: its training (600 steps: about 20 s on one busy thread for the demo's 350
    images, every attribute >= 0.98 held out at 32 and 64 px)."""

    resolution: int = 64
    judged_at: list[int] = field(default_factory=lambda: [16, 32, 64])
    size: int = 64
    patch: int = 24
    width: int = 16
    hidden: int = 64
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size, lr: must be positive, got {self.steps}, {self.batch_size}, "
                             f"{self.lr}")
        if self.patch < 8 or self.patch % 8:
            raise ValueError(f"patch: a multiple of 8 (the trunk halves it three times), got {self.patch}")
        if self.size < 8 or self.width < 8 or self.width % 8 or self.hidden < 1:
            raise ValueError(f"size >= 8, width a multiple of 8 (group norm), hidden >= 1: got {self.size}, "
                             f"{self.width}, {self.hidden}")


def targets(labels: list[dict[str, str]], classes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Class indices per attribute; -1 where the value is not among the classes (not seen in training)."""
    index = {k: {c: i for i, c in enumerate(v)} for k, v in classes.items()}
    return {k: torch.tensor([index[k].get(lab[k], -1) for lab in labels]) for k in classes}


def chance(labels: list[dict[str, str]]) -> dict[str, float]:
    """The most frequent value's share per attribute: what a judge-blind constant guess scores."""
    if not labels:
        return {k: float("nan") for k in ATTRIBUTES}
    return {k: Counter(lab[k] for lab in labels).most_common(1)[0][1] / len(labels) for k in ATTRIBUTES}


def run(inputs: dict[str, Artifact], cfg: OracleStageConfig, out: Artifact) -> dict[str, Any]:
    """In a Ray task of one CPU when Ray is up (torch gets one thread there and Ray schedules it like
    any other stage's work); in the driver it competed with everything the driver runs. The same
    training took 345 s in the driver on a loaded machine, 13.7 s as a task on a quiet one and 56 s as
    a task beside the whole test suite."""
    return in_task(train_and_judge, inputs, cfg, out, num_cpus=1)


def train_and_judge(inputs: dict[str, Artifact], cfg: OracleStageConfig, out: Artifact) -> dict[str, Any]:
    t0 = time.time()
    shard = inputs["shard"]
    x, labels, _ = shard_data.labelled(shard, cfg.resolution, shard_data.TRAIN)
    if not labels:
        out.write_json("oracle.json", {"labelled_train": 0})
        log.info("[oracle] %s has no labelled rows: no oracle (evaluate leaves its metrics out)", shard.uri)
        return {"labelled_train": 0}
    classes = {k: sorted({lab[k] for lab in labels}) for k in ATTRIBUTES}
    torch.manual_seed(cfg.seed)
    net = OracleConfig(size=cfg.size, patch=cfg.patch, width=cfg.width, hidden=cfg.hidden)
    # The shape head reads only the recolouring-invariant foreground map: with a few hundred images, a
    # head shown the colours memorises each (colour, background) pair instead of learning the outline.
    model = SceneOracle({k: len(v) for k, v in classes.items()}, net, colour_blind=("shape",))
    log.info("[oracle] training on %d labelled images (%s classes) for %d steps", len(labels),
             "/".join(str(len(v)) for v in classes.values()), cfg.steps)
    t1 = time.time()
    losses = fit(model, torch.from_numpy(x), targets(labels, classes), steps=cfg.steps, batch_size=cfg.batch_size,
                 lr=cfg.lr, seed=cfg.seed)
    train_s = time.time() - t1
    hx, hlabels, _ = shard_data.labelled(shard, cfg.resolution, shard_data.HELDOUT)
    held = torch.from_numpy(hx)
    want = targets(hlabels, classes)
    acc: dict[str, dict[str, float]] = {}
    for r in cfg.judged_at:
        pred, _ = model.predict(resize(held, r))
        acc[str(r)] = {k: accuracy(pred[k], want[k]) for k in ATTRIBUTES}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    out.write_bytes("oracle.pt", buf.getvalue())
    meta = {"labelled_train": len(labels), "labelled_heldout": len(hlabels), "classes": classes,
            "network": asdict(net), "colour_blind": list(model.colour_blind), "heldout_accuracy": acc,
            "chance": chance(hlabels), "train_s": round(train_s, 2), "loss_first": losses[0],
            "loss_last": sum(losses[-20:]) / len(losses[-20:])}
    out.write_json("oracle.json", meta)
    for r, a in acc.items():
        log.info("[oracle] held-out accuracy at %s px (%d images): %s", r, len(hlabels),
                 ", ".join(f"{k} {v:.3f}" for k, v in a.items()))
    return {"labelled_train": len(labels), "labelled_heldout": len(hlabels), "steps": cfg.steps,
            "train_s": round(train_s, 2), "wall_s": round(time.time() - t0, 2),
            **{f"acc_{k}_{r}": round(v, 4) for r, a in acc.items() for k, v in a.items()}}


def load(art: Artifact) -> tuple[SceneOracle, dict[str, Any]] | None:
    """The trained oracle and its ``oracle.json``; None when the shard had no labels."""
    meta = art.read_json("oracle.json")
    if not meta.get("labelled_train"):
        return None
    net = meta["network"]
    model = SceneOracle({k: len(v) for k, v in meta["classes"].items()}, OracleConfig(**net),
                        colour_blind=tuple(meta.get("colour_blind", ("shape",))))
    state = torch.load(io.BytesIO(art.read_bytes("oracle.pt")), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), meta


STAGE = Stage("oracle", run, OracleStageConfig, inputs={"shard": "shard"})
