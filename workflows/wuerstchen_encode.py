"""Würstchen precompute: frozen encoders run once over the shard, never inside a training step.

    shard ──► wuerstchen_encode_a        (EMA Stage A latents + Stage B's CLIP token states)
    shard ──► wuerstchen_encode_semantic (frozen compressor latents + Stage C's CLIP token states)

Each is one Ray Data chain: ``read_parquet`` → drop held-out rows (``data_prep.splits``) →
``map_batches(WuerstchenEncoder)`` (a callable class that loads its models in ``__init__``)
→ ``write_parquet`` into ``{artifact}/data/`` (overwrite mode, deterministic names: a rerun
replaces a crashed run's partial files instead of appending to them). The same encoder
object also serves online use (the unit tests call it on a numpy batch without Ray).

Output rows: ``sample_id``, ``row_id`` (int64 hash of the id: the training loop's resume key),
``latent_a`` (4×R/4×R/4) and/or ``latent_sem`` (16×h×w), ``text_tokens`` (77×width, unpooled
last-layer CLIP states) — tensors stored as float16 — plus, for encode_a, the ``jpg_{R}`` bytes
that Stage B's jointly trained compressor still needs. ``uncond.safetensors`` holds the
empty caption's token states (condition dropout / CFG) and ``info.json`` the shapes and encoder.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from data_prep.splits import heldout_mask, row_ids
from workflows.store import Artifact, task_filenames

log = logging.getLogger("genmodels")

IMAGE_FORMATS = ("jpg", "png", "webp")  # shard columns {format}_{R}: encoded R×R centre crops
DATA = "data"  # parquet files live in {artifact}/data/, which an encode rerun overwrites as a whole


@dataclass(frozen=True)
class TextEncoderConfig:
    """An open_clip model. Paper: ViT-H-14 for Stage B, ViT-bigG-14 for Stage C (laion2b tags)."""

    name: str = "tiny-clip"
    pretrained: str = ""  # open_clip tag or local checkpoint; "" = random, seeded (tiny only)

    def validate(self) -> None:
        import open_clip

        import genmodels.clip  # noqa: F401 - registers tiny-clip

        if open_clip.get_model_config(self.name) is None:
            raise ValueError(f"name: unknown open_clip model {self.name!r}")

    @property
    def width(self) -> int:
        import open_clip

        import genmodels.clip  # noqa: F401

        return int(open_clip.get_model_config(self.name)["text_cfg"]["width"])

    def build(self):
        from genmodels.clip import build_clip

        return build_clip(self.name, self.pretrained or None)


@dataclass(frozen=True)
class EncodeConfig:
    """Fields shared by both encode stages (resources are per actor)."""

    resolution: int = 64  # which jpg_{R} shard column to encode
    caption_column: str = "recaption"  # or "caption"; an empty recaption falls back to the caption
    heldout_fraction: float = 0.1  # must match the evaluate stage's
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    batch_size: int = 64
    actors: int = 1
    cpus_per_actor: float = 0.5  # fractional: a pool of whole-CPU actors starves reads on 2 CPUs
    gpus_per_actor: float = 0.0
    rows_per_file: int = 50_000
    auto_resolution: ClassVar[bool] = False  # may resolution be 0 ("take it from upstream")?

    def validate(self) -> None:
        if not (self.auto_resolution and self.resolution == 0) and (self.resolution < 16 or self.resolution % 8):
            raise ValueError(f"resolution: expected a multiple of 8 >= 16, got {self.resolution}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction: expected [0, 1), got {self.heldout_fraction}")
        for key in ("batch_size", "actors", "rows_per_file"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor: resources must be >= 0")


@dataclass(frozen=True)
class EncodeAConfig(EncodeConfig):
    """Paper: text_encoder ViT-H-14 (Stage B's), resolution 1024."""


@dataclass(frozen=True)
class EncodeSemanticConfig(EncodeConfig):
    """Paper: text_encoder ViT-bigG-14 (Stage C's)."""

    resolution: int = 0  # 0: the resolution Stage B was trained at (what its compressor saw)
    auto_resolution: ClassVar[bool] = True


# ----------------------------------------------------------------------------------------------
# Row helpers (pure numpy; used by the encode stages and by Stage A's training data)


def training_rows(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """Drop held-out rows (by sample id, as every stage does) and add ``row_id``."""
    keep = ~heldout_mask(batch["sample_id"], fraction)
    out = {k: v[keep] for k, v in batch.items()}
    out["row_id"] = row_ids(out["sample_id"])
    return out


def decode_images(data, size: int) -> np.ndarray:
    """Encoded images (bytes) → float32 (N, 3, size, size) in [-1, 1]."""
    from PIL import Image, ImageOps

    from data_prep.images import decode_rgb

    out = np.empty((len(data), 3, size, size), dtype=np.float32)
    for i, b in enumerate(data):
        img = decode_rgb(bytes(b))
        if img.size != (size, size):  # shards are already R×R; stay correct if one is not
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def read_shard(shard: Artifact, columns: list[str], fraction: float, in_memory: bool = False,
               with_sample_id: bool = True):
    """The shard's training rows as a Ray Dataset: selected columns + ``row_id``, held-out dropped."""
    import ray.data

    if in_memory:
        table = _read_table(shard, ["sample_id", *columns], "", fraction)
        return ray.data.from_arrow(table if with_sample_id else table.drop_columns(["sample_id"]))
    ds = ray.data.read_parquet(shard.uri, filesystem=shard.fs, columns=["sample_id", *columns],
                               file_extensions=["parquet"])
    ds = ds.map_batches(training_rows, fn_kwargs={"fraction": fraction}, batch_format="numpy")
    return ds if with_sample_id else ds.select_columns(["row_id", *columns])


def read_encoded(art: Artifact, columns: list[str], in_memory: bool = False):
    """An encode stage's rows as a Ray Dataset (already training rows only)."""
    import ray.data

    if in_memory:
        return ray.data.from_arrow(_read_table(art, columns, DATA))
    return ray.data.read_parquet(art.child_uri(DATA), filesystem=art.fs, columns=columns, file_extensions=["parquet"])


def _read_table(art: Artifact, columns: list[str], subdir: str, fraction: float | None = None):
    """Small data only (the demo, tests): the whole table read once in the driver with pyarrow, so
    training iterates Ray's object store instead of re-reading files (or starting tasks) every epoch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers Ray's tensor extension type for tensor columns

    table = pa.concat_tables([pq.read_table(art.fs.open_input_file(art.child(n)), columns=columns)
                              for n in art.list(".parquet", subdir=subdir)])
    if fraction is not None:
        ids = table.column("sample_id").to_pylist()
        keep = ~heldout_mask(ids, fraction)
        table = table.filter(pa.array(keep)).append_column("row_id", pa.array(row_ids(np.array(ids)[keep])))
    return table


def head_rows(art: Artifact, columns: list[str], n: int, subdir: str = "",
              heldout_fraction: float | None = None) -> dict[str, np.ndarray]:
    """The first ``n`` (training) rows as numpy, read with pyarrow: previews need no Ray job."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers Ray's tensor extension type for tensor columns

    parts: list[dict[str, np.ndarray]] = []
    have = 0
    cols = columns if heldout_fraction is None else sorted({"sample_id", *columns})
    for name in art.list(".parquet", subdir=subdir):
        for batch in pq.ParquetFile(art.fs.open_input_file(art.child(name))).iter_batches(batch_size=n, columns=cols):
            rows = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in cols}
            if heldout_fraction is not None:
                rows = training_rows(rows, heldout_fraction)
            parts.append(rows)
            have += len(rows[columns[0]])
            if have >= n:
                return {c: np.concatenate([p[c] for p in parts])[:n] for c in columns}
    if not have:
        raise ValueError(f"{art.uri}: no rows to preview")
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def image_column(shard: Artifact, resolution: int, also: tuple[str, ...] = ()) -> str:
    """The shard's ``{jpg|png|webp}_{R}`` column; fails with the column list, not a deep Arrow error."""
    import pyarrow.parquet as pq

    files = shard.list(".parquet")
    if not files:
        raise ValueError(f"shard {shard.uri}: no parquet files (the shard stage's formats must include parquet)")
    names = pq.read_schema(shard.fs.open_input_file(shard.child(files[0]))).names
    found = [f"{ext}_{resolution}" for ext in IMAGE_FORMATS if f"{ext}_{resolution}" in names]
    missing = ([] if found else [f"jpg_{resolution}"]) + [c for c in also if c not in names]
    if missing:
        raise ValueError(f"shard {shard.uri} has no column {missing[0]!r} (columns: {', '.join(names)}); "
                         f"add {resolution} to the shard stage's resolutions or pick another")
    return found[0]


def load_uncond(art: Artifact):
    """Empty-caption token states (1, L, width) written by an encode stage."""
    from safetensors.torch import load

    return load(art.read_bytes("uncond.safetensors"))["text_tokens"]


# ----------------------------------------------------------------------------------------------
# The encoder: a Ray Data callable class, usable without Ray


class WuerstchenEncoder:
    """numpy batch (sample_id, row_id, jpg_{R}, caption) → latents + text token states.

    ``stage_a`` / ``compressor``: trained artifacts whose EMA weights are loaded here, once.
    ``keep_image`` passes the encoded image bytes through (Stage B's compressor trains on them).
    """

    def __init__(self, image_column: str, caption_column: str, text_encoder: TextEncoderConfig,
                 stage_a: Artifact | None = None, compressor: Artifact | None = None, keep_image: bool = False,
                 device: str = "auto"):
        import torch

        from workflows.wuerstchen_stages import load_trained

        self.torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.image_column, self.caption_column, self.keep_image = image_column, caption_column, keep_image
        self.size = int(image_column.rsplit("_", 1)[1])
        self.stage_a = load_trained(stage_a, "stage_a").to(self.device) if stage_a is not None else None
        self.compressor = load_trained(compressor, "compressor").to(self.device) if compressor is not None else None
        self.clip, _, self.tokenizer = text_encoder.build()
        self.clip.to(self.device)

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.device.type == "cuda")

    def text_tokens(self, captions) -> Any:
        from genmodels.clip import encode_text_tokens

        tokens = self.tokenizer([str(c) for c in captions]).to(self.device)
        with self.torch.no_grad(), self._autocast():
            return encode_text_tokens(self.clip, tokens).float()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        out = {"sample_id": batch["sample_id"], "row_id": batch["row_id"]}
        if self.stage_a is not None or self.compressor is not None:
            x = torch.from_numpy(decode_images(batch[self.image_column], self.size)).to(self.device)
            with torch.no_grad(), self._autocast():
                if self.stage_a is not None:
                    out["latent_a"] = _f16(self.stage_a.encode(x))
                if self.compressor is not None:
                    out["latent_sem"] = _f16(self.compressor(x))
        captions = batch[self.caption_column]
        if self.caption_column != "caption" and "caption" in batch:  # e.g. no recaption stage ran
            captions = [c or fallback for c, fallback in zip(captions, batch["caption"])]
        out["text_tokens"] = _f16(self.text_tokens(captions))
        if self.keep_image:
            out[self.image_column] = batch[self.image_column]
        return out


def _f16(t) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float16)


def _uncond_tokens(text_encoder: TextEncoderConfig) -> bytes:
    from safetensors.torch import save

    from genmodels.clip import encode_text_tokens

    model, _, tokenizer = text_encoder.build()
    return save({"text_tokens": encode_text_tokens(model, tokenizer([""])).float().contiguous()})


def run_encode(ds, cfg: EncodeConfig, out: Artifact, encoder_kwargs: dict[str, Any]) -> dict[str, Any]:
    """map_batches(WuerstchenEncoder) → data/*.parquet, uncond.safetensors; returns counts."""
    import pyarrow.parquet as pq
    import ray
    import ray.data

    remote = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor}
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
        raise RuntimeError(f"{out.uri}: no training rows were encoded (empty shard or all rows held out?)")
    schema = pq.read_schema(out.fs.open_input_file(out.child(files[0])))
    shapes = {c: list(schema.field(c).type.shape) for c in ("latent_a", "latent_sem", "text_tokens")
              if c in schema.names}
    info = {"rows": rows, "files": [posixpath.join(DATA, f.split("/")[-1]) for f in files], "shapes": shapes,
            "resolution": cfg.resolution, "image_column": encoder_kwargs["image_column"],
            "text_encoder": {"name": cfg.text_encoder.name, "pretrained": cfg.text_encoder.pretrained},
            "heldout_fraction": cfg.heldout_fraction}
    out.write_json("info.json", info)
    return {"rows": rows, "parquet_files": len(files),
            **{f"shape_{k}": "x".join(map(str, v)) for k, v in shapes.items()}}


def encode_a(inputs: dict[str, Artifact], cfg: EncodeAConfig, out: Artifact) -> dict[str, Any]:
    """Stage A latents + Stage B text tokens of every training row of the shard."""
    shard, stage_a = inputs["shard"], inputs["wuerstchen_stage_a"]
    captions = tuple(dict.fromkeys([cfg.caption_column, "caption"]))
    image = image_column(shard, cfg.resolution, captions)
    ds = read_shard(shard, [image, *captions], cfg.heldout_fraction)
    return run_encode(ds, cfg, out, {"image_column": image, "caption_column": cfg.caption_column,
                                     "text_encoder": cfg.text_encoder, "stage_a": stage_a, "keep_image": True})


def encode_semantic(inputs: dict[str, Artifact], cfg: EncodeSemanticConfig, out: Artifact) -> dict[str, Any]:
    """Frozen (EMA) compressor latents + Stage C text tokens of every training row of the shard."""
    import dataclasses

    shard, stage_b = inputs["shard"], inputs["wuerstchen_stage_b"]
    if not cfg.resolution:
        cfg = dataclasses.replace(cfg, resolution=int(stage_b.read_json("model_config.json")["resolution"]))
    captions = tuple(dict.fromkeys([cfg.caption_column, "caption"]))
    image = image_column(shard, cfg.resolution, captions)
    ds = read_shard(shard, [image, *captions], cfg.heldout_fraction)
    return run_encode(ds, cfg, out, {"image_column": image, "caption_column": cfg.caption_column,
                                     "text_encoder": cfg.text_encoder, "compressor": stage_b})
