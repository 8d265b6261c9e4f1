"""pagoda_sample: one-step samples from every trained generator, and SWD to held-out real images.

    shard (held-out split) + every generator stage -> grid_{R}.png, samples/{R}/*.png, swd.json

The same latents z ~ N(0, 80² I) at the base resolution feed every generator, so the grids show
one sample at each resolution. ``swd.json`` compares the largest generator with the same-size
generator at initialization (the teacher copy, grown), both against the held-out images.
``decode`` is the one batched one-step decoder, also behind the family's ``load_generator``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genmodels.metrics.swd import swd
from genmodels.pagoda import (
    EDMConfig,
    EDMPrecond,
    Generator,
    GeneratorConfig,
    GrowthConfig,
    Guided,
    grow_2x,
    ode_sample,
    sample_latents,
)
from pipeline.config import check
from pipeline.stage import ActorPoolConfig, actor_resources, in_task
from pipeline.store import Artifact, open_artifact
from workflows import shard_data
from workflows.pagoda.models import load_one_step, load_teacher, unet_from_dict
from workflows.text_clip import encoder
from workflows.train.export import png_grid, png_image


@dataclass(frozen=True)
class SampleConfig(ActorPoolConfig):
    """One Ray task samples every generator (``actors`` stays 1; ``batch_size`` latents per forward pass)."""

    n: int = 64  # one-step samples per generator: grid_{R}.png and samples/{R}/*.png
    seed: int = 0  # the same latents at every resolution, and for the trained and the initial G
    omega: float = 0.0  # CFG scale of omega-conditioned generators
    caption_column: str = "recaption"
    swd_real: int = 512  # held-out real images (at most) at the final resolution
    swd_fakes_per_real: int = 2
    swd_projections: int = 512
    swd_patches: int = 128  # per image and pyramid level
    batch_size: int = 64
    cpus_per_actor: float = 1.0

    def validate(self) -> None:
        self.validate_pool()
        check([("actors", self.actors == 1, "the sample stage is one task: expected 1"),
               ("n", self.n >= 1, "must be >= 1"), ("swd_real", self.swd_real >= 2, "must be >= 2"),
               ("swd_fakes_per_real", self.swd_fakes_per_real >= 1, "must be >= 1")])


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def decode(gen: Generator, z: Tensor, cond: dict[str, Tensor], batch_size: int = 64, omega: float = 0.0) -> Tensor:
    """One forward pass per latent, in batches; returns CPU images in [-1, 1]."""
    dev = next(gen.parameters()).device
    kw = {"omega": omega} if gen.cfg.omega_cond else {}
    outs = []
    for i in range(0, len(z), batch_size):
        c = {k: v[i:i + batch_size].to(dev) for k, v in cond.items() if k in ("text", "text_mask")}
        outs.append(gen(z[i:i + batch_size].to(dev), **c, **kw).float().clamp(-1, 1).cpu())
    return torch.cat(outs)


@torch.no_grad()
def teacher_sample(teacher: EDMPrecond, z: Tensor, cond: dict[str, Tensor], points: int, omega: float = 0.0,
                   batch_size: int = 64) -> Tensor:
    """The teacher's multi-step sampler: deterministic Heun from z (sigma_max scale) on the EDM grid of
    ``points`` (+ an Euler step to 0), CFG at ``omega``, in batches; CPU images in [-1, 1]."""
    dev = next(teacher.parameters()).device
    net = Guided(teacher, omega) if omega != 0 else teacher
    e = EDMConfig()
    outs = []
    for i in range(0, len(z), batch_size):
        c = {k: v[i:i + batch_size].to(dev) for k, v in cond.items() if k in ("text", "text_mask")}
        x = ode_sample(net, z[i:i + batch_size].to(dev), points, e.sigma_min, e.sigma_max, e.rho, **c)
        outs.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(outs)


def init_generator(meta: dict[str, Any]) -> Generator:
    """The generator as the pipeline initializes it: a copy of the EMA teacher, grown to meta's size."""
    teacher, _ = load_teacher(open_artifact(meta["teacher"]))
    gen = Generator.from_teacher(teacher, GeneratorConfig(**meta["generator"]))
    for ch in unet_from_dict(meta["unet"]).grown:
        gen = grow_2x(gen, GrowthConfig(channels=ch))
    return gen.eval()


def _captions(real: dict[str, np.ndarray], n: int) -> list[str]:
    caps = list(real["caption"]) or [""]
    return [str(caps[i % len(caps)]) for i in range(n)]


def sample_generators(gens: list[tuple[int, str, Artifact]], real: dict[str, np.ndarray], cfg: SampleConfig,
                      out: Artifact) -> dict[str, Any]:
    """Grids per resolution, then SWD at the final resolution: trained G vs. G at initialization."""
    dev = device()
    torch.manual_seed(cfg.seed)
    final_meta = gens[-1][2].read_json("model_config.json")
    text = encoder(**final_meta["text"]).to(dev) if final_meta["text"] else None
    encode = (lambda caps: text(caps)) if text else (lambda caps: {})
    base = final_meta["base_resolution"]
    cond = encode(_captions(real, cfg.n))
    z = sample_latents((cfg.n, 3, base, base), generator=torch.Generator().manual_seed(cfg.seed))
    counts: dict[str, Any] = {"n": cfg.n}
    for r, _role, art in gens:
        gen = load_one_step(art)[0].to(dev)
        decode(gen, z[:1], {k: v[:1] for k, v in cond.items()}, omega=cfg.omega)  # warm-up
        t0 = time.perf_counter()
        x = decode(gen, z, cond, cfg.batch_size, cfg.omega)
        counts[f"ms_per_image_{r}"] = round(1e3 * (time.perf_counter() - t0) / cfg.n, 3)
        out.write_bytes(f"grid_{r}.png", png_grid(x))
        for i, img in enumerate(x):
            out.write_bytes(f"samples/{r}/{i:04d}.png", png_image(img))
        final = gen

    r = gens[-1][0]
    m = len(real["image"]) * cfg.swd_fakes_per_real
    cond = encode(_captions(real, m))
    z = sample_latents((m, 3, base, base), generator=torch.Generator().manual_seed(cfg.seed + 1))
    real_x = torch.from_numpy(np.asarray(real["image"], dtype=np.float32))
    result: dict[str, Any] = {"resolution": r, "n_real": len(real_x), "n_fake": m, "seed": cfg.seed}
    for key, gen in (("trained", final), ("init", init_generator(final_meta).to(dev))):
        fake = decode(gen, z, cond, cfg.batch_size, cfg.omega)
        per_level, mean = swd(fake, real_x, patches_per_image=cfg.swd_patches, num_projections=cfg.swd_projections,
                              generator=torch.Generator().manual_seed(cfg.seed))
        result[key] = {"swd": mean, "per_level": per_level}
    out.write_json("swd.json", result)
    counts.update(swd_trained=round(result["trained"]["swd"], 3), swd_init=round(result["init"]["swd"], 3),
                  swd_resolution=r, swd_real=len(real_x))
    return counts


def heldout_images(shard: Artifact, resolution: int, n: int, caption_column: str) -> dict[str, np.ndarray]:
    """The first ``n`` held-out rows: ``caption`` and ``image`` (N, 3, R, R) in [-1, 1]."""
    col = shard_data.image_column(shard_data.columns(shard), resolution)
    try:
        rows = shard_data.head(shard, [col], n, split=shard_data.HELDOUT, caption_column=caption_column)
    except ValueError:  # no held-out rows at all
        rows = {"caption": np.array([], dtype=object), col: []}
    return {"caption": rows["caption"], "image": shard_data.decode(rows[col], resolution)}


def run_sample(inputs: dict[str, Artifact], cfg: SampleConfig, out: Artifact) -> dict[str, Any]:
    """Inputs: ``shard`` (its held-out split) and any number of generators (every other role)."""
    gens = sorted((a.read_json("model_config.json")["resolution"], role, a) for role, a in inputs.items()
                  if role != "shard")
    if not gens:
        raise ValueError(f"pagoda_sample needs at least one generator stage, got {sorted(inputs)}")
    real = heldout_images(inputs["shard"], gens[-1][0], cfg.swd_real, cfg.caption_column)
    if len(real["image"]) < 2:
        raise ValueError(f"pagoda_sample: {len(real['image'])} held-out rows, SWD needs at least 2; "
                         "raise shard.heldout_fraction")
    return in_task(sample_generators, gens, real, cfg, out, **actor_resources(cfg))
