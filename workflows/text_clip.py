"""Stage ``clip``: the CLIP that every text encoder of the run uses, trained contrastively on the
shard's training pairs when no pretrained one can be loaded (the demo, offline).

Both families condition on CLIP text features (Würstchen §3 on token states, PaGoDA §4.2 on a text
encoder), and a paper run loads LAION's weights by their open_clip tags. A laptop has none, and a
random CLIP maps "a red circle" and "a blue circle" to nearly the same features: the prompt then
cannot steer a model trained for minutes (issue 11's measurements: colour at chance). So this stage
trains the configured open_clip model with CLIP's objective (``genmodels.clip.contrastive_loss``)
on the ``train`` rows' images and captions, as its pretraining would on LAION, and the stages
that encode text load its weights (:func:`weights`):

- a text encoder of the same model name with no ``pretrained`` of its own gets this stage's
  checkpoint; one that names a tag or a path keeps it (a cluster's ViT-bigG is never replaced);
- ``steps: 0`` trains nothing and writes only ``clip.json`` (paper runs: pretrained tags).

Output: ``clip.pt`` (the model's state dict, open_clip's checkpoint format) and ``clip.json``
(model, steps, loss first/last, held-out retrieval top-1 against chance, seconds).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genmodels import clip as clip_mod
from pipeline.stage import Stage, in_task
from pipeline.store import Artifact, local_file
from workflows import shard_data

log = logging.getLogger("genmodels")

CHECKPOINT = "clip.pt"


@dataclass(frozen=True)
class ClipConfig:
    """model: the open_clip model trained (the one the text encoders name); steps 0: train none.
    Laptop default: tiny-clip, 300 steps of 64 pairs at lr 1e-3: 110 s on one core of a busy 2-core
    machine for the demo's 366 pairs, held-out retrieval top-1 0.69 against chance 0.03 (the demo runs
    200: 79 s, 0.63)."""

    model: str = clip_mod.TINY
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    caption_column: str = "caption"
    seed: int = 0
    cpus: float = 1.0
    gpus: float = 0.0

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"steps >= 0, batch_size >= 2, lr > 0, weight_decay >= 0: got {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.weight_decay}")
        if not known_clip_model(self.model):
            raise ValueError(f"model: unknown open_clip model {self.model!r}")


def known_clip_model(name: str) -> bool:
    """Whether open_clip has a model config called ``name``. Its configs are JSON files shipped in
    the package (``open_clip/model_configs/<name>.json``; genmodels registers tiny-clip), so a file of
    that name answers without importing open_clip: ~5 s of CPU that every CLI run (``--dry-run``
    included) paid to validate its config. Any other name is asked of open_clip itself."""
    if name == clip_mod.TINY:
        return True
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    for folder in [Path(p, "model_configs") for p in (spec.submodule_search_locations or [])] if spec else []:
        try:
            cfg = json.loads((folder / f"{name}.json").read_text()) if "/" not in name else None
        except (OSError, ValueError):  # no such file, or not a name a file can have
            continue
        # open_clip registers a file only when it has these keys (factory._rescan_model_configs)
        if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            return True
    return clip_mod.open_clip_lib().get_model_config(name) is not None


def run(inputs: dict[str, Artifact], cfg: ClipConfig, out: Artifact) -> dict[str, Any]:
    """In a Ray task (one CPU by default) when Ray is up, like the oracle."""
    return in_task(train, inputs, cfg, out, num_cpus=cfg.cpus, num_gpus=cfg.gpus)


def train(inputs: dict[str, Artifact], cfg: ClipConfig, out: Artifact) -> dict[str, Any]:
    if cfg.steps == 0:
        out.write_json("clip.json", {"model": cfg.model, "steps": 0})
        return {"steps": 0}
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, tokenizer = clip_mod.build_clip(cfg.model, seed=cfg.seed)
    model.to(device).train().requires_grad_(True)
    size = clip_mod.image_size(model)
    x, _, caps = shard_data.split_rows(inputs["shard"], size, shard_data.TRAIN, cfg.caption_column)
    if len(caps) < 2:
        raise ValueError(f"{inputs['shard'].uri}: {len(caps)} training rows; contrastive training needs >= 2")
    images, tokens = torch.from_numpy(x), tokenizer(caps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # 20 warm-up steps
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("[clip] training %s on %d pairs for %d steps of %d", cfg.model, len(caps), cfg.steps, cfg.batch_size)
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(caps), (min(cfg.batch_size, len(caps)),), generator=gen)
        im = images[idx]
        if torch.rand(1, generator=gen).item() < 0.5:  # a mirrored scene keeps its caption
            im = im.flip(-1)
        img = model.encode_image(clip_mod.preprocess_tensor(model, im.to(device)), normalize=True)
        txt = model.encode_text(tokens[idx].to(device), normalize=True)
        loss = clip_mod.contrastive_loss(img, txt, model.logit_scale, tokens[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clips the temperature at 100 (Radford et al. 2021, Sec. 2.5)
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log.info("[clip] step %d/%d loss %.3f, %.1f steps/s", step + 1, cfg.steps, sum(losses[-50:]) /
                     len(losses[-50:]), (step + 1) / (time.time() - t0))
    model.eval()
    top1, n_held = heldout_retrieval(model, tokenizer, inputs["shard"], size, cfg.caption_column)
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    out.write_bytes(CHECKPOINT, buf.getvalue())
    meta = {"model": cfg.model, "steps": cfg.steps, "pairs": len(caps), "loss_first": losses[0],
            "loss_last": sum(losses[-20:]) / len(losses[-20:]), "heldout_pairs": n_held,
            "heldout_top1": top1, "chance_top1": 1 / n_held if n_held else None, "train_s": round(time.time() - t0, 2)}
    out.write_json("clip.json", meta)
    log.info("[clip] trained: loss %.3f -> %.3f, held-out image->caption top-1 %.3f over %d pairs (chance %.3f)",
             meta["loss_first"], meta["loss_last"], top1, n_held, 1 / max(n_held, 1))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in meta.items() if k != "model"}


@torch.no_grad()
def heldout_retrieval(model, tokenizer, shard: Artifact, size: int, caption_column: str) -> tuple[float, int]:
    """Image -> caption top-1 among the held-out pairs (chance 1/N): what the training taught that
    carries to unseen pairs."""
    x, _, caps = shard_data.split_rows(shard, size, shard_data.HELDOUT, caption_column)
    if len(caps) < 2:
        return float("nan"), len(caps)
    dev = next(model.parameters()).device
    img = model.encode_image(clip_mod.preprocess_tensor(model, torch.from_numpy(x).to(dev)), normalize=True)
    txt = model.encode_text(tokenizer(caps).to(dev), normalize=True)
    return float(((img @ txt.T).argmax(1).cpu() == torch.arange(len(caps))).float().mean()), len(caps)


def weights(clip: Artifact | None, name: str, pretrained: str) -> str:
    """What a text encoder of open_clip model ``name`` loads: its own ``pretrained`` when set, else this
    stage's checkpoint (its URI) when the stage trained ``name``, else "" (random, seeded)."""
    if pretrained or clip is None or not clip.exists(CHECKPOINT):
        return pretrained or ""
    return clip.child_uri(CHECKPOINT) if clip.read_json("clip.json").get("model") == name else ""


def _local(pretrained: str) -> str:
    # An artifact URI on S3 is fetched to a local file first: open_clip opens paths and tags only.
    return local_file(pretrained) if pretrained and "://" in pretrained else pretrained


def encoder(name: str = clip_mod.TINY, pretrained: str = "", **kw: Any) -> clip_mod.TextEncoder:
    """``genmodels.clip.TextEncoder`` with ``pretrained`` a tag, a path or an artifact URI."""
    return clip_mod.TextEncoder(name, _local(pretrained), **kw)


def clip_model(name: str = clip_mod.TINY, pretrained: str = ""):
    """The whole open_clip model (frozen, eval) with ``pretrained`` a tag, a path or an artifact URI."""
    return clip_mod.build_clip(name, _local(pretrained) or None)[0]


STAGE = Stage("clip", run, ClipConfig, inputs={"shard": "shard"}, uses_ray=True)
