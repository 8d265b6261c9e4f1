"""The final training artifact, written once by rank 0 after the last step.

    weights/{name}.safetensors       EMA weights (raw ones for modules without EMA)
    weights/raw/{name}.safetensors   raw weights of modules that also have EMA
    model_config.json, train_config.json
    metrics.jsonl                    one line per logged step, replayed steps removed
    metrics.json                     the summary (also the stage manifest's counts)
    loss_curve.png                   every logged loss* scalar against steps
    preview.png                      a grid of spec.sample() from the EMA weights
    logs/                            live metrics.jsonl, TensorBoard events, previews/
    ray_train/                       checkpoints (resume or extend training)
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pipeline.store import Artifact, is_local

log = logging.getLogger("genmodels.train")


def write(out: Artifact, *, weights: dict[str, dict[str, Tensor]], ema_weights: dict[str, dict[str, Tensor]],
          model_config: dict[str, Any], train_config: dict[str, Any], history: list[dict[str, Any]],
          summary: dict[str, Any], preview: Tensor | None) -> None:
    step = str(summary.get("steps", ""))
    for name, sd in weights.items():
        if name in ema_weights:
            out.write_bytes(f"weights/{name}.safetensors", _safetensors(ema_weights[name], name, "true", step))
            out.write_bytes(f"weights/raw/{name}.safetensors", _safetensors(sd, name, "false", step))
        else:
            out.write_bytes(f"weights/{name}.safetensors", _safetensors(sd, name, "false", step))
    out.write_json("model_config.json", model_config)
    out.write_json("train_config.json", train_config)
    out.write_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    out.write_json("metrics.json", summary)
    curve = loss_curve_png(history)
    if curve:
        out.write_bytes("loss_curve.png", curve)
    if preview is not None:
        out.write_bytes("preview.png", png_grid(preview))


def load_weights(art: Artifact, name: str, raw: bool = False) -> dict[str, Tensor]:
    """State dict of one exported module (EMA unless ``raw``; raw-only modules either way)."""
    path = f"weights/raw/{name}.safetensors" if raw and art.exists(f"weights/raw/{name}.safetensors") \
        else f"weights/{name}.safetensors"
    return st_load(art.read_bytes(path))


def _safetensors(sd: dict[str, Tensor], name: str, ema: str, step: str) -> bytes:
    # clone(): tied weights share storage, which safetensors refuses.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    return st_save(tensors, metadata={"module": name, "ema": ema, "step": step})


def read_history(art: Artifact) -> list[dict[str, Any]]:
    """The exported ``metrics.jsonl``: one dict per logged step."""
    return [json.loads(ln) for ln in art.read_bytes("metrics.jsonl").decode().splitlines() if ln.strip()]


def to_uint8(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] (any leading dims, channels first) -> uint8 numpy, same layout."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def png_image(image: Tensor) -> bytes:
    """One CHW image in [-1, 1] to PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image).transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def png_grid(images: Tensor, nrow: int | None = None) -> bytes:
    """NCHW images in [-1, 1] (C = 1 or 3) to one PNG, tiles separated by 2 px."""
    from PIL import Image

    x = to_uint8(images)
    if x.shape[2] < 64:  # tiny test images: enlarge (nearest) so the grid can be looked at
        f = -(-64 // x.shape[2])
        x = x.repeat(f, axis=2).repeat(f, axis=3)
    n, c, h, w = x.shape
    if c == 1:
        x = np.repeat(x, 3, axis=1)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            x[i, :3].transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def captioned_grid(images: Tensor, captions: list[str], cell: int = 96, ncol: int = 8) -> bytes:
    """NCHW images in [-1, 1], each enlarged (nearest) to ``cell`` px with its prompt written under it:
    what a person needs to judge whether a sample shows what it was asked for."""
    import textwrap

    from PIL import Image, ImageDraw

    x = to_uint8(images)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    text_h, pad = 40, 4
    ncol = min(ncol, len(x))
    rows = -(-len(x) // ncol)
    sheet = Image.new("RGB", (ncol * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(zip(x, captions)):
        r, c = divmod(i, ncol)
        left, top = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        sheet.paste(Image.fromarray(img[:3].transpose(1, 2, 0)).resize((cell, cell), Image.NEAREST), (left, top))
        lines = textwrap.wrap(cap, width=cell // 6)[:4]
        draw.multiline_text((left, top + cell + 1), "\n".join(lines), fill=(0, 0, 0), spacing=0)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def loss_curve_png(history: list[dict[str, Any]]) -> bytes | None:
    keys = sorted({k for r in history for k in r if k.startswith("loss")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in history if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    if all(r[k] > 0 for r in history for k in keys if k in r):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class MetricsLog:
    """Rank 0's live log: ``logs/metrics.jsonl``, TensorBoard events and preview grids, written
    as training goes (a local artifact) or uploaded at every checkpoint (S3)."""


    def __init__(self, out: Artifact, history: list[dict[str, Any]], start_step: int):
        self.out, self.local = out, is_local(out.fs)
        self.dir = out.child("logs") if self.local else tempfile.mkdtemp(prefix="train-logs-")
        os.makedirs(os.path.join(self.dir, "previews"), exist_ok=True)
        self.history = history
        with open(os.path.join(self.dir, "metrics.jsonl"), "w") as f:  # drop lines of replayed steps
            f.writelines(json.dumps(r) + "\n" for r in history)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"), purge_step=start_step + 1)

    def write(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])
        log.info("step %d  %s", rec["step"], "  ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k != "step"))

    def preview(self, step: int, images: Tensor) -> None:
        with open(os.path.join(self.dir, "previews", f"step_{step:08d}.png"), "wb") as f:
            f.write(png_grid(images))

    def sync(self) -> None:
        self.tb.flush()
        if not self.local:
            self.out.upload_dir(self.dir, prefix="logs")

    def close(self) -> None:
        self.sync()
        self.tb.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
