"""pagoda_invert: data-latent pairs by PF-ODE inversion of the frozen teacher (PaGoDA Sec. 3.2, Stage 2a).

    shard (training rows) -> Inverter actors (EMA teacher + text encoder, loaded once) -> pairs/*.parquet

For every training image x and its horizontal flip: z = reverse Heun of the teacher from
sigma = 0.002 to 80 on the 40-point Karras grid (78 evaluations), denoised output clipped to
[-1, 1]. With ``dstl`` (text-to-image), each row also gets its L_dstl target: the CFG-omega teacher's
ODE solution from a noise and omega seeded by the row's id (``dstl_noise``, ``dstl_omega``,
``dstl_target``), so distillation runs no teacher. A pair row is keyed by ``sample_id`` and holds
``latent``, ``latent_flip``, the text conditions the teacher saw (``text``, ``text_mask``,
``text_embed``), the caption, and the encoded images ``jpg_R`` (R >= B) that the distillation and
growth stages train on, so those stages read one artifact and need no join (``read_pairs``).

Resume: the shard's files are processed in chunks; chunk N is written to ``pairs/NNNNN/`` and
committed by ``chunks/NNNNN.json``, so a rerun skips finished chunks and rewrites only the
unfinished one. ``pairs.json`` (then the manifest) is written last.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.splits import row_ids
from genmodels.pagoda import Guided, PagodaConfig, invert_latents, ode_sample
from pipeline.config import check
from pipeline.stage import ActorPoolConfig, actor_resources
from pipeline.store import Artifact, task_filenames
from workflows import shard_data
from workflows.fixed_batch import run_fixed
from workflows.pagoda.models import load_teacher
from workflows.text_clip import encoder

DSTL_COLUMNS = ["dstl_noise", "dstl_omega", "dstl_target"]  # precomputed L_dstl inputs (InvertConfig.dstl)


def read_pairs(pairs: Artifact, resolution: int, in_memory: bool = False):
    """Ray Dataset of inversion pairs with the image decoded at ``resolution`` (jpg_R carried by the pairs);
    ``in_memory``: read once in the driver, in ``sample_id`` order (shard_data.read_parquet)."""
    meta = pairs.read_json("pairs.json")
    col = shard_data.image_column(meta["image_columns"], resolution)
    cols = ["sample_id", "latent", "latent_flip", col] + (["text", "text_mask", "text_embed"] if meta["text"] else [])
    cols += DSTL_COLUMNS if meta.get("dstl") else []

    def prepare(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = dict(b)
        b["row_id"] = row_ids(b.pop("sample_id"))
        b["image"] = shard_data.decode(b.pop(col), resolution)
        return b

    ds = shard_data.read_parquet(pairs, cols, subdir="pairs", in_memory=in_memory)
    return ds.map_batches(prepare, batch_format="numpy")


# ------------------------------------------------------------------------------------------
# Stage 2a: inversion


@dataclass(frozen=True)
class InvertConfig(ActorPoolConfig):
    """The inversion actors' pool (``actors``: one per GPU on a cluster; ``batch_size`` images per
    call; ``cpus_per_actor`` fractional so that a 2-core machine keeps reading) and the inversion."""

    points: int = 40  # Karras grid points, 0.002 -> 80 (Sec. 3.2): 2 * (points - 1) evaluations per latent
    fraction: float = 1.0  # invert this fraction of the training rows (by sample-id hash)
    caption_column: str = "recaption"
    resolutions: tuple[int, ...] = ()  # images (jpg_R) carried into the pairs; () = every stored R >= base
    files_per_chunk: int = 64  # shard files per committed chunk (the unit of resume)
    check_samples: int = 4  # per actor: forward Heun from z of its first rows must give x_B back
    # Text-to-image L_dstl targets (Sec. 4.2), solved here once per row instead of in every distillation
    # step: noise eps ~ N(0, 80^2 I) and omega ~ U(dstl_omega_range) drawn from (dstl_seed, sample id),
    # target = Heun of the CFG-omega teacher from eps on the dstl_points grid (2 * (2 * points - 1)
    # teacher passes per row). Seeded by id, so a rewritten chunk gets the same values (exactly once).
    dstl: bool = False
    dstl_omega_range: tuple[float, float] = (0.0, 0.0)
    dstl_points: int = 40
    dstl_seed: int = 0

    def validate(self) -> None:
        self.validate_pool()
        check([("points", self.points >= 2, "must be >= 2"),
               ("fraction", 0 < self.fraction <= 1, "expected (0, 1]"),
               ("files_per_chunk", self.files_per_chunk >= 1, "must be >= 1"),
               ("check_samples", self.check_samples >= 0, "must be >= 0"),
               ("dstl_omega_range", 0 <= self.dstl_omega_range[0] <= self.dstl_omega_range[1],
                "expected (low, high) with 0 <= low <= high"),
               ("dstl_points", self.dstl_points >= 2, "must be >= 2")])

    def dstl_spec(self) -> dict[str, Any] | None:
        """What the Inverter needs for the L_dstl targets (and pairs.json records), None without them."""
        if not self.dstl:
            return None
        return {"omega_range": list(self.dstl_omega_range), "points": self.dstl_points, "seed": self.dstl_seed}


class Inverter:
    """Ray Data callable class: the EMA teacher (and its text encoder) load once per actor in __init__."""

    def __init__(self, teacher: Artifact, points: int, carry: tuple[str, ...] = (), check: int = 0,
                 report: Artifact | None = None, dstl: dict[str, Any] | None = None, compute_batch: int = 16):
        self.compute_batch = compute_batch  # the teacher always sees this many rows (workflows.fixed_batch)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher, meta = load_teacher(teacher)
        self.teacher.to(self.device)
        self.text = encoder(**meta["text"]).to(self.device).eval() if meta["text"] else None
        self.resolution, self.carry = meta["resolution"], carry
        self.cfg = PagodaConfig(resolution=self.resolution, inversion_points=points)
        # Round-trip check on this actor's first `check` rows, reported as roundtrip/<uuid>.json in `report`.
        self.check, self.report = (check, report) if report is not None else (0, None)
        self.dstl = dstl

    @torch.no_grad()
    def dstl_targets(self, sample_ids: np.ndarray, cond: dict) -> dict[str, torch.Tensor]:
        """Per row: ``dstl_noise`` eps, ``dstl_omega`` and ``dstl_target`` = the CFG-omega teacher's ODE
        solution from eps (the L_dstl target, Sec. 4.2), drawn from (seed, sample id)."""
        spec, r, e = self.dstl, self.resolution, self.cfg.edm
        noise, omega = [], []
        for rid in row_ids(sample_ids):
            g = torch.Generator().manual_seed((int(rid) + 1_000_003 * spec["seed"]) % 2**63)
            noise.append(torch.randn(3, r, r, generator=g) * e.sigma_max)
            omega.append(torch.rand((), generator=g))
        lo, hi = spec["omega_range"]
        eps = torch.stack(noise).to(self.device)
        w = (lo + torch.stack(omega) * (hi - lo)).to(self.device)
        target = ode_sample(Guided(self.teacher, w), eps, spec["points"], e.sigma_min, e.sigma_max, e.rho, **cond)
        return {"dstl_noise": eps, "dstl_omega": w, "dstl_target": target.clamp(-1, 1)}

    @torch.no_grad()
    def roundtrip_error(self, x: torch.Tensor, z: torch.Tensor, cond: dict) -> torch.Tensor:
        """|Heun(z) - x| per image and pixel: forward Heun on the same grid (+ Euler to 0) should give x_B back."""
        e = self.cfg.edm
        x_rec = ode_sample(self.teacher, z, self.cfg.inversion_points, e.sigma_min, e.sigma_max, e.rho, **cond)
        return (x_rec.clamp(-1, 1) - x).abs().flatten(1)

    @torch.no_grad()
    def pairs(self, x: torch.Tensor, captions: list[str], sample_ids: list[str]) -> dict[str, torch.Tensor]:
        """Latents (and L_dstl targets) of one fixed-size chunk, with the text conditions the teacher saw."""
        cond = self.text(captions) if self.text is not None else {}
        tcond = {k: cond[k] for k in ("text", "text_mask") if k in cond}
        z = invert_latents({"teacher": self.teacher}, {"image": x, **tcond}, self.cfg)
        if self.dstl is not None:
            z.update(self.dstl_targets(np.array(sample_ids, dtype=object), tcond))
        return {**z, **cond}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src = shard_data.image_column(batch, self.resolution)
        x = torch.from_numpy(shard_data.decode(batch[src], self.resolution)).to(self.device)
        # Padding captions are "", padding ids repeat the last real one (their noise is dropped with them).
        z = run_fixed(self.pairs, self.compute_batch, x, list(batch["caption"]), list(batch["sample_id"]),
                      fills=(None, ""))
        out = {"sample_id": batch["sample_id"], "caption": batch["caption"],
               **{k: v.cpu().numpy() for k, v in z.items()}, **{c: batch[c] for c in self.carry}}
        if self.check > 0:
            n = min(self.check, len(x))
            keys = [k for k in ("text", "text_mask") if k in z]
            # on the fixed batch too: the report then depends on the rows, not on where a batch ended
            err = run_fixed(lambda xs, zs, *t: self.roundtrip_error(xs, zs, dict(zip(keys, t))), self.compute_batch,
                            x[:n], z["latent"][:n], *(z[k][:n] for k in keys))
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
    """Inputs: ``shard`` (its training rows are inverted) and ``teacher``."""
    import ray.data

    shard, teacher = inputs["shard"], inputs["teacher"]
    meta = teacher.read_json("model_config.json")
    base = meta["resolution"]
    names = shard_data.columns(shard)
    stored = shard_data.image_columns(names)
    keep = list(cfg.resolutions) or [r for r in stored if r >= base]
    missing = [r for r in keep if r not in stored]
    if missing:
        raise ValueError(f"resolutions: shard {shard.uri} has no images at {missing[0]} (stored: {sorted(stored)})")
    carry = tuple(stored[r] for r in keep)
    src = shard_data.image_column(names, base)
    files = [shard.child_uri(n) for n in shard.list(".parquet")]
    chunks = [files[i:i + cfg.files_per_chunk] for i in range(0, len(files), cfg.files_per_chunk)]

    def inverted(paths: list[str], check: int):
        ds = shard_data.read(shard, split=shard_data.TRAIN, carry=sorted({*carry, src}),
                             caption_column=cfg.caption_column, fraction=cfg.fraction, paths=paths)
        return ds.map_batches(
            Inverter, fn_constructor_kwargs={"teacher": teacher, "points": cfg.points, "carry": carry,
                                             "check": check, "report": out, "dstl": cfg.dstl_spec(),
                                             "compute_batch": cfg.batch_size},
            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            **actor_resources(cfg))

    t0, rows, skipped = time.time(), 0, 0
    for i, paths in enumerate(chunks):
        marker = f"chunks/{i:05d}.json"
        if out.exists(marker):
            rows += out.read_json(marker)["rows"]
            skipped += 1
            continue
        # OVERWRITE empties pairs/NNNNN/ first: a half-written chunk of an interrupted run goes away.
        inverted(paths, cfg.check_samples if i == 0 else 0).write_parquet(
            out.child_uri(f"pairs/{i:05d}"), filesystem=out.fs, mode="overwrite", filename_provider=task_filenames())
        n = _rows_in(out, f"pairs/{i:05d}")
        out.write_json(marker, {"rows": n, "files": paths})
        rows += n
    invert_s = time.time() - t0

    counts: dict[str, Any] = {"rows": rows, "latents": 2 * rows, "chunks": len(chunks), "chunks_skipped": skipped,
                              "invert_s": round(invert_s, 3), "teacher_evals_per_latent": 2 * (cfg.points - 1)}
    if cfg.dstl:  # each guided evaluation is a conditional and an unconditional pass
        counts["dstl_teacher_passes_per_row"] = 2 * (2 * cfg.dstl_points - 1)
    if rows and not skipped:  # images (each with its flip) and latents per second
        counts.update(images_per_s=round(rows / invert_s, 3), latents_per_s=round(2 * rows / invert_s, 3))
    checks = [out.read_json(n) for n in out.list(".json", subdir="roundtrip")]
    if checks:
        mae = [v for c in checks for v in c["mae"]]  # per image, in [-1, 1] pixel units
        counts.update(roundtrip_n=len(mae), roundtrip_mae=float(np.mean(mae)),
                      roundtrip_mae_median=float(np.median(mae)),
                      roundtrip_max=float(np.max([v for c in checks for v in c["max"]])))
    out.write_json("pairs.json", {"resolution": base, "image_columns": list(carry), "text": bool(meta["text"]),
                                  "points": cfg.points, "rows": rows, "teacher": teacher.uri,
                                  "dstl": cfg.dstl_spec()})
    return counts
