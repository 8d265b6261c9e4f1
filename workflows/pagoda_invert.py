"""pagoda_invert: data-latent pairs by PF-ODE inversion of the frozen teacher (PaGoDA Sec. 3.2, Stage 2a),
and the data side that every PaGoDA stage shares (shard rows, pairs, captions -> CLIP tokens, the teacher).

    shard (training rows) -> Inverter actors (EMA teacher + text encoder, loaded once) -> pairs/*.parquet

For every training image x and its horizontal flip: z = reverse Heun of the teacher from
sigma = 0.002 to 80 on the 40-point Karras grid (78 evaluations), denoised output clipped to
[-1, 1]. A pair row is keyed by ``sample_id`` and holds ``latent``, ``latent_flip``, the text
conditions the teacher saw (``text``, ``text_mask``, ``text_embed``), the caption, and the
encoded images ``jpg_R`` (R >= B) that the distillation and growth stages train on, so those
stages read one artifact and need no join.

Resume: the shard's files are processed in chunks; chunk N is written to ``pairs/NNNNN/`` and
committed by ``chunks/NNNNN.json``, so a rerun skips finished chunks and rewrites only the
unfinished one. ``pairs.json`` (then the manifest) is written last.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import Tensor, nn

from data_prep.filter import actor_resources
from data_prep.splits import heldout_mask, row_ids
from genmodels import clip as clip_mod
from genmodels.pagoda import EDMPrecond, PagodaConfig, UNet, UNetConfig, invert_latents, ode_sample
from workflows.config import check
from workflows.store import Artifact, task_filenames
from workflows.train import load_weights

# ------------------------------------------------------------------------------------------
# Data: shard rows -> training rows (held-out rows dropped), decoded images


_IMAGE_COLUMN = re.compile(r"^(jpg|jpeg|png|webp)_(\d+)$")


def decode_images(column: np.ndarray, size: int) -> np.ndarray:
    """Encoded images -> (N, 3, size, size) float32 in [-1, 1] (resized when stored at another size)."""
    out = np.empty((len(column), 3, size, size), dtype=np.float32)
    for i, data in enumerate(column):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def shard_columns(art: Artifact, subdir: str = "") -> list[str]:
    import pyarrow.parquet as pq

    files = art.list(".parquet", subdir=subdir)
    if not files:
        raise ValueError(f"{art.uri}: no parquet files")
    with art.fs.open_input_file(art.child(files[0])) as f:
        return pq.read_schema(f).names


def image_columns(columns: list[str]) -> dict[int, str]:
    """{R: column} of the encoded images a shard stores per resolution (``jpg_64``, ``webp_256``, ...)."""
    found = (_IMAGE_COLUMN.match(c) for c in columns)
    return dict(sorted((int(m.group(2)), m.group(0)) for m in found if m))


def image_column(columns: list[str], resolution: int) -> str:
    """The image column at R, else the smallest stored resolution above R (resized on decode)."""
    cols = image_columns(columns)
    above = [r for r in cols if r >= resolution]
    if not above:
        raise ValueError(f"shard has images at {sorted(cols)}, none at or above {resolution}")
    return cols[above[0]]


def select_rows(batch: dict[str, np.ndarray], *, heldout_fraction: float, heldout: bool = False,
                fraction: float = 1.0, caption_column: str = "caption",
                decode: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """Keep training rows (or only held-out ones), pick the caption, optionally decode one image column."""
    ids = batch["sample_id"]
    keep = heldout_mask(ids, heldout_fraction) == heldout
    if fraction < 1.0:
        keep &= heldout_mask(ids, fraction, salt="genmodels-subset")
    out = {k: v[keep] for k, v in batch.items() if k not in ("caption", "recaption")}
    caption = batch["caption"].astype(object)
    alt = batch.get(caption_column)
    if alt is not None and caption_column != "caption":
        caption = np.where(np.array([bool(a) for a in alt]), alt, caption)
    out["caption"] = np.array([str(c or "") for c in caption[keep]], dtype=object)
    out["row_id"] = row_ids(out["sample_id"])
    if decode:
        col, size = decode
        out["image"] = decode_images(out.pop(col), size)
    return out


def read_rows(shard: Artifact, resolution: int, heldout_fraction: float, caption_column: str, heldout: bool = False,
              fraction: float = 1.0, carry: tuple[str, ...] = (), paths: list[str] | None = None):
    """Ray Dataset of the shard's training rows: row_id, sample_id, caption, image (B, 3, R, R) + carried columns."""
    import ray.data

    names = shard_columns(shard)
    src = image_column(names, resolution)
    cols = ["sample_id", "caption"] + [c for c in ("recaption",) if c in names] + sorted({src, *carry})
    ds = ray.data.read_parquet(paths or shard.uri, filesystem=shard.fs, columns=cols)
    decode = None if src in carry else (src, resolution)
    kwargs = {"heldout_fraction": heldout_fraction, "heldout": heldout, "fraction": fraction,
              "caption_column": caption_column, "decode": decode}
    return ds.map_batches(select_rows, batch_format="numpy", fn_kwargs=kwargs)


def read_pairs(pairs: Artifact, resolution: int):
    """Ray Dataset of inversion pairs with the image decoded at ``resolution`` (jpg_R carried by the pairs)."""
    import ray.data

    meta = pairs.read_json("pairs.json")
    col = image_column(meta["image_columns"], resolution)
    cols = ["sample_id", "latent", "latent_flip", col] + (["text", "text_mask", "text_embed"] if meta["text"] else [])

    def prepare(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = dict(b)
        b["row_id"] = row_ids(b.pop("sample_id"))
        b["image"] = decode_images(b.pop(col), resolution)
        return b

    return ray.data.read_parquet(pairs.child_uri("pairs"), filesystem=pairs.fs, columns=cols).map_batches(
        prepare, batch_format="numpy")


# ------------------------------------------------------------------------------------------
# Text encoder and the teacher, shared with the training stages


class TextEncoder(nn.Module):
    """Captions -> CLIP token states (B, L, width), mask (B, L), pooled embedding (B, D).

    One object for the teacher's step (online) and the inversion actors (offline). The text
    transformer is causal, so keeping the first L states after the encoder equals encoding L tokens.
    """

    def __init__(self, name: str = clip_mod.TINY, pretrained: str = "", tokens: int = 32):
        super().__init__()
        self.clip, _, self.tokenizer = clip_mod.build_clip(name, pretrained or None)
        self.tokens = tokens

    @torch.no_grad()
    def forward(self, captions) -> dict[str, Tensor]:
        tok = self.tokenizer([str(c) for c in captions]).to(next(self.clip.parameters()).device)
        states = clip_mod.encode_text_tokens(self.clip, tok)[:, : self.tokens].float()
        return {"text": states, "text_mask": tok[:, : self.tokens] != 0,
                "text_embed": clip_mod.encode_text_pooled(self.clip, tok).float()}


class TextColumns:
    """Ray Data callable class: adds ``text`` and ``text_mask`` (token states) to a batch with ``caption``."""

    def __init__(self, text: dict[str, Any]):
        self.encoder = TextEncoder(**text).to("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.encoder(batch["caption"])
        return {**batch, "text": enc["text"].cpu().numpy(), "text_mask": enc["text_mask"].cpu().numpy()}


def text_dims(text: dict | None) -> tuple[int, int]:
    """(token width, pooled width) of a text config without building the model."""
    if not text:
        return 0, 0
    cfg = open_clip.get_model_config(text["name"])
    return cfg["text_cfg"]["width"], cfg["embed_dim"]


def unet_from_dict(d: dict[str, Any]) -> UNetConfig:
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_teacher(art: Artifact) -> tuple[EDMPrecond, dict[str, Any]]:
    meta = art.read_json("model_config.json")
    teacher = EDMPrecond(UNet(unet_from_dict(meta["unet"])), meta["sigma_data"])
    teacher.load_state_dict(load_weights(art, "teacher"))
    return teacher.eval().requires_grad_(False), meta


# ------------------------------------------------------------------------------------------
# Stage 2a: inversion


@dataclass(frozen=True)
class InvertConfig:
    points: int = 40  # Karras grid points, 0.002 -> 80 (Sec. 3.2): 2 * (points - 1) evaluations per latent
    batch_size: int = 16
    actors: int = 1  # inversion actors (one per GPU on a cluster)
    num_gpus: float = 0.0  # per actor; GPU actors ask for no CPU so transforms keep the node's CPUs
    num_cpus: float = 0.5  # per actor when num_gpus is 0 (fractional: a 2-core machine must keep reading)
    fraction: float = 1.0  # invert this fraction of the training rows (by sample-id hash)
    heldout_fraction: float = 0.1  # held-out ids are never inverted (they are never trained on)
    caption_column: str = "recaption"
    resolutions: tuple[int, ...] = ()  # images (jpg_R) carried into the pairs; () = every stored R >= base
    files_per_chunk: int = 64  # shard files per committed chunk (the unit of resume)
    check_samples: int = 4  # per actor: forward Heun from z of its first rows must give x_B back

    def validate(self) -> None:
        checks = [("points", self.points >= 2, "must be >= 2"), ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("actors", self.actors >= 1, "must be >= 1"), ("num_gpus", self.num_gpus >= 0, "must be >= 0"),
                  ("num_cpus", self.num_cpus > 0 or self.num_gpus > 0, "must be > 0 without GPUs"),
                  ("fraction", 0 < self.fraction <= 1, "expected (0, 1]"),
                  ("heldout_fraction", 0 <= self.heldout_fraction < 1, "expected [0, 1)"),
                  ("files_per_chunk", self.files_per_chunk >= 1, "must be >= 1"),
                  ("check_samples", self.check_samples >= 0, "must be >= 0")]
        check(checks)


def resources(cfg: InvertConfig) -> dict[str, float]:
    """What the stage holds (Stage.resources): its inversion actors."""
    return {"GPU": cfg.num_gpus * cfg.actors} if cfg.num_gpus else {"CPU": cfg.num_cpus * cfg.actors}


class Inverter:
    """Ray Data callable class: the EMA teacher (and its text encoder) load once per actor in __init__."""

    def __init__(self, teacher: Artifact, points: int, carry: tuple[str, ...] = (), check: int = 0,
                 report: Artifact | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher, meta = load_teacher(teacher)
        self.teacher.to(self.device)
        self.text = TextEncoder(**meta["text"]).to(self.device).eval() if meta["text"] else None
        self.resolution, self.carry = meta["resolution"], carry
        self.cfg = PagodaConfig(resolution=self.resolution, inversion_points=points)
        # Round-trip check on this actor's first `check` rows, reported as roundtrip/<uuid>.json in `report`.
        self.check, self.report = (check, report) if report is not None else (0, None)

    @torch.no_grad()
    def roundtrip_error(self, x: torch.Tensor, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """|Heun(z) - x| per image and pixel: forward Heun on the same grid (+ Euler to 0) should give x_B back."""
        e = self.cfg.edm
        x_rec = ode_sample(self.teacher, z, self.cfg.inversion_points, e.sigma_min, e.sigma_max, e.rho, **cond)
        return (x_rec.clamp(-1, 1) - x).abs().flatten(1)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src = image_column(list(batch), self.resolution)
        x = torch.from_numpy(decode_images(batch[src], self.resolution)).to(self.device)
        cond = self.text(batch["caption"]) if self.text is not None else {}
        tcond = {k: cond[k] for k in ("text", "text_mask") if k in cond}
        z = invert_latents({"teacher": self.teacher}, {"image": x, **tcond}, self.cfg)
        out = {"sample_id": batch["sample_id"], "caption": batch["caption"],
               **{k: v.cpu().numpy() for k, v in {**z, **cond}.items()}, **{c: batch[c] for c in self.carry}}
        if self.check > 0:
            n = min(self.check, len(x))
            err = self.roundtrip_error(x[:n], z["latent"][:n], {k: v[:n] for k, v in tcond.items()})
            self.report.write_json(f"roundtrip/{uuid.uuid4().hex}.json", {
                "sample_id": [str(s) for s in batch["sample_id"][:n]], "mae": err.mean(1).tolist(),
                "max": err.amax(1).tolist()})
            self.check -= n
        return out


def _rows_in(out: Artifact, subdir: str) -> int:
    import pyarrow.parquet as pq

    n = 0
    for name in out.list(".parquet", subdir=subdir):
        with out.fs.open_input_file(out.child(name)) as f:
            n += pq.ParquetFile(f).metadata.num_rows
    return n


def run_invert(inputs: dict[str, Artifact], cfg: InvertConfig, out: Artifact) -> dict[str, Any]:
    import ray.data

    shard, teacher = inputs["shard"], inputs["pagoda_teacher"]
    meta = teacher.read_json("model_config.json")
    base = meta["resolution"]
    names = shard_columns(shard)
    stored = image_columns(names)
    keep = list(cfg.resolutions) or [r for r in stored if r >= base]
    missing = [r for r in keep if r not in stored]
    if missing:
        raise ValueError(f"resolutions: shard {shard.uri} has no images at {missing[0]} (stored: {sorted(stored)})")
    carry = tuple(stored[r] for r in keep)
    src = image_column(names, base)
    files = [shard.child_uri(n) for n in shard.list(".parquet")]
    chunks = [files[i:i + cfg.files_per_chunk] for i in range(0, len(files), cfg.files_per_chunk)]

    def inverted(paths: list[str], check: int):
        ds = read_rows(shard, base, cfg.heldout_fraction, cfg.caption_column, fraction=cfg.fraction,
                       carry=tuple(sorted({*carry, src})), paths=paths)
        return ds.map_batches(
            Inverter, fn_constructor_kwargs={"teacher": teacher, "points": cfg.points, "carry": carry,
                                             "check": check, "report": out},
            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            **actor_resources(cfg.num_gpus, cfg.num_cpus))

    t0, rows, skipped = time.time(), 0, 0
    for i, paths in enumerate(chunks):
        marker = f"chunks/{i:05d}.json"
        if out.exists(marker):
            rows += out.read_json(marker)["rows"]
            skipped += 1
            continue
        # OVERWRITE empties pairs/NNNNN/ first: a half-written chunk of an interrupted run goes away.
        inverted(paths, cfg.check_samples if i == 0 else 0).write_parquet(out.child_uri(f"pairs/{i:05d}"), filesystem=out.fs, mode="overwrite",
                                      filename_provider=task_filenames())
        n = _rows_in(out, f"pairs/{i:05d}")
        out.write_json(marker, {"rows": n, "files": paths})
        rows += n
    invert_s = time.time() - t0

    counts: dict[str, Any] = {"rows": rows, "latents": 2 * rows, "chunks": len(chunks), "chunks_skipped": skipped,
                              "invert_s": round(invert_s, 3), "teacher_evals_per_latent": 2 * (cfg.points - 1)}
    if rows and not skipped:  # images (each with its flip) and latents per second
        counts.update(images_per_s=round(rows / invert_s, 3), latents_per_s=round(2 * rows / invert_s, 3))
    checks = [out.read_json(n) for n in out.list(".json", subdir="roundtrip")]
    if checks:
        mae = [v for c in checks for v in c["mae"]]  # per image, in [-1, 1] pixel units
        counts.update(roundtrip_n=len(mae), roundtrip_mae=float(np.mean(mae)),
                      roundtrip_mae_median=float(np.median(mae)),
                      roundtrip_max=float(np.max([v for c in checks for v in c["max"]])))
    out.write_json("pairs.json", {"resolution": base, "image_columns": list(carry), "text": bool(meta["text"]),
                                  "points": cfg.points, "rows": rows, "teacher": teacher.uri})
    return counts
