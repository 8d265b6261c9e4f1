"""Würstchen precompute: frozen encoders run once over the shard's training rows, never inside a
training step.

    shard ──► wuerstchen_encode_a        (EMA Stage A latents + Stage B's CLIP token states)
    shard ──► wuerstchen_encode_semantic (frozen compressor latents + Stage C's CLIP token states)

Each is one Ray Data chain: ``shard_data.read(split=train)`` → ``map_batches(WuerstchenEncoder)``
(a callable class that loads its models in ``__init__``) → ``write_parquet`` into
``{artifact}/data/`` (overwrite mode, deterministic names: a rerun replaces a crashed run's
partial files instead of appending to them). The same encoder object also serves online use
(the unit tests call it on a numpy batch without Ray).

Output rows (training rows only): ``sample_id``, ``row_id`` (the training loop's resume key),
``latent_a`` (4×R/4×R/4) and/or ``latent_sem`` (16×h×w), ``text_tokens`` (77×width, unpooled
last-layer CLIP states) — tensors stored as float16 — plus, for encode_a, the encoded image
bytes that Stage B's jointly trained compressor still needs. ``uncond.safetensors`` holds the
empty caption's token states (condition dropout / CFG) and ``info.json`` the shapes and encoder.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from safetensors.torch import load, save

from pipeline.stage import ActorPoolConfig, actor_resources
from pipeline.store import Artifact, task_filenames
from workflows import shard_data
from workflows.fixed_batch import run_fixed
from workflows.text_clip import weights
from workflows.wuerstchen.models import TextEncoderConfig, load_trained

DATA = "data"  # parquet files live in {artifact}/data/, which an encode rerun overwrites as a whole


@dataclass(frozen=True)
class EncodeConfig(ActorPoolConfig):
    """Fields shared by both encode stages (``actors``, ``cpus_per_actor``, ``gpus_per_actor``,
    ``batch_size``: the actor pool, as every model stage spells it)."""

    batch_size: int = 64
    resolution: int = 64  # the shard's image at R (or the smallest stored side above it, resized)
    caption_column: str = "recaption"  # or "caption"; an empty recaption falls back to the caption
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    rows_per_file: int = 50_000
    auto_resolution: ClassVar[bool] = False  # may resolution be 0 ("take it from upstream")?

    def validate(self) -> None:
        self.validate_pool()
        if not (self.auto_resolution and self.resolution == 0) and (self.resolution < 16 or self.resolution % 8):
            raise ValueError(f"resolution: expected a multiple of 8 >= 16, got {self.resolution}")
        if self.rows_per_file < 1:
            raise ValueError("rows_per_file: must be >= 1")


@dataclass(frozen=True)
class EncodeAConfig(EncodeConfig):
    """Paper: text_encoder ViT-H-14 (Stage B's), resolution 1024."""


@dataclass(frozen=True)
class EncodeSemanticConfig(EncodeConfig):
    """Paper: text_encoder ViT-bigG-14 (Stage C's)."""

    resolution: int = 0  # 0: the resolution Stage B was trained at (what its compressor saw)
    auto_resolution: ClassVar[bool] = True


def load_uncond(art: Artifact) -> torch.Tensor:
    """Empty-caption token states (1, L, width) written by an encode stage."""
    return load(art.read_bytes("uncond.safetensors"))["text_tokens"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# The encoder: a Ray Data callable class, usable without Ray


class WuerstchenEncoder:
    """numpy batch (sample_id, row_id, image bytes, captions) → latents + text token states.

    ``stage_a`` / ``compressor``: trained artifacts whose EMA weights are loaded here, once.
    ``image_column`` is decoded at ``size``; ``keep_image`` passes its bytes through (Stage B's
    compressor trains on them). Captions: ``shard_data.captions`` of ``caption_column``.

    The networks always run on ``compute_batch`` rows (:mod:`workflows.fixed_batch`): a batch of
    fewer than 16 rows changes a latent by ~1e-6, enough to flip an fp16 step.
    """

    def __init__(self, image_column: str, size: int, text_encoder: TextEncoderConfig, caption_column: str = "caption",
                 stage_a: Artifact | None = None, compressor: Artifact | None = None, keep_image: bool = False,
                 device: str = "auto", compute_batch: int = 64):
        self.device = _device(device)
        self.compute_batch = compute_batch
        self.image_column, self.size, self.caption_column = image_column, size, caption_column
        self.keep_image = keep_image
        self.stage_a = load_trained(stage_a, "stage_a").to(self.device) if stage_a is not None else None
        self.compressor = load_trained(compressor, "compressor").to(self.device) if compressor is not None else None
        self.text = text_encoder.build().to(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"sample_id": batch["sample_id"], "row_id": batch["row_id"]}
        with self._autocast():
            if self.stage_a is not None or self.compressor is not None:
                x = torch.from_numpy(shard_data.decode(batch[self.image_column], self.size)).to(self.device)
                if self.stage_a is not None:
                    out["latent_a"] = _f16(run_fixed(self.stage_a.encode, self.compute_batch, x))
                if self.compressor is not None:
                    out["latent_sem"] = _f16(run_fixed(self.compressor, self.compute_batch, x))
            caps = list(shard_data.captions(batch, self.caption_column))  # str already
            out["text_tokens"] = _f16(run_fixed(lambda c: self.text(c)["text"], self.compute_batch, caps, fills=("",)))
        if self.keep_image:
            out[self.image_column] = batch[self.image_column]
        return out


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float16)


def _uncond_tokens(text_encoder: TextEncoderConfig) -> bytes:
    return save({"text_tokens": text_encoder.build()([""])["text"].contiguous()})


def run_encode(ds, cfg: EncodeConfig, out: Artifact, encoder_kwargs: dict[str, Any]) -> dict[str, Any]:
    """map_batches(WuerstchenEncoder) → data/*.parquet, uncond.safetensors; returns counts."""
    remote = actor_resources(cfg)
    ds = ds.map_batches(WuerstchenEncoder, fn_constructor_kwargs=encoder_kwargs, batch_size=cfg.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors), **remote)
    # The empty caption's states come from a task started first, so its start-up overlaps the data job.
    uncond = ray.remote(_uncond_tokens).options(**remote).remote(cfg.text_encoder)
    # Fixed names with OVERWRITE, which first clears a crashed run's partial files.
    ds.write_parquet(out.child_uri(DATA), filesystem=out.fs, filename_provider=task_filenames(),
                     mode=ray.data.SaveMode.OVERWRITE, min_rows_per_file=cfg.rows_per_file)
    out.write_bytes("uncond.safetensors", ray.get(uncond))
    files = out.list(".parquet", subdir=DATA)
    rows = sum(pq.read_metadata(out.fs.open_input_file(out.child(f))).num_rows for f in files)
    if rows == 0:
        raise RuntimeError(f"{out.uri}: no training rows were encoded (empty shard or no '{shard_data.TRAIN}' rows?)")
    schema = pq.read_schema(out.fs.open_input_file(out.child(files[0])))
    shapes = {c: list(schema.field(c).type.shape) for c in ("latent_a", "latent_sem", "text_tokens")
              if c in schema.names}
    info = {"rows": rows, "files": [posixpath.join(DATA, f.split("/")[-1]) for f in files], "shapes": shapes,
            "resolution": cfg.resolution, "image_column": encoder_kwargs["image_column"], "split": shard_data.TRAIN,
            "text_encoder": dataclasses.asdict(cfg.text_encoder)}
    out.write_json("info.json", info)
    return {"rows": rows, "parquet_files": len(files),
            **{f"shape_{k}": "x".join(map(str, v)) for k, v in shapes.items()}}


def _encode(inputs: dict[str, Artifact], cfg: EncodeConfig, out: Artifact, **models: Any) -> dict[str, Any]:
    shard, text = inputs["shard"], cfg.text_encoder
    if text.library == "open_clip":  # the clip stage's weights unless the config names others
        cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(
            text, pretrained=weights(inputs.get("clip"), text.name, text.pretrained)))
    image = shard_data.image_column(shard_data.columns(shard), cfg.resolution)
    # caption_column: the chosen caption (with the fallback rule) arrives as "caption".
    ds = shard_data.read(shard, split=shard_data.TRAIN, carry=[image], caption_column=cfg.caption_column)
    return run_encode(ds, cfg, out, {"image_column": image, "size": cfg.resolution,
                                     "text_encoder": cfg.text_encoder, "compute_batch": cfg.batch_size, **models})


def encode_a(inputs: dict[str, Artifact], cfg: EncodeAConfig, out: Artifact) -> dict[str, Any]:
    """Stage A latents + Stage B text tokens of every training row of the shard."""
    return _encode(inputs, cfg, out, stage_a=inputs["stage_a"], keep_image=True)


def encode_semantic(inputs: dict[str, Artifact], cfg: EncodeSemanticConfig, out: Artifact) -> dict[str, Any]:
    """Frozen (EMA) compressor latents + Stage C text tokens of every training row of the shard."""
    stage_b = inputs["stage_b"]
    if not cfg.resolution:
        cfg = dataclasses.replace(cfg, resolution=int(stage_b.read_json("model_config.json")["resolution"]))
    return _encode(inputs, cfg, out, compressor=stage_b)
