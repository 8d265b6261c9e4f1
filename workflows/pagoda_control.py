"""One-step generation from trained PaGoDA artifacts: the ``pagoda_sample`` stage and a CLI for
controllable generation through the inversion encoder (PaGoDA Sec. 5.3).

    python workflows/pagoda_control.py superres    --generator ART --image low.png --out DIR [--prompt "..."]
    python workflows/pagoda_control.py inpaint     --generator ART --image x.png --out DIR [--box 0.3,0.3,0.7,0.7]
    python workflows/pagoda_control.py transfer    --generator ART --image x.png --src-prompt "a red circle" \
                                                   --prompt "a blue square" --out DIR
    python workflows/pagoda_control.py interpolate --generator ART --image a.png --image b.png --out DIR [--num 8]

ART is a generator stage's artifact (local path or s3://), e.g. runs/demo/pagoda_grow_64/<key>; the
teacher that serves as the encoder is the one named in its model_config.json unless --teacher is given.
For text-conditioned models the prompt is encoded with the model's own CLIP ("" if not given).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from genmodels.metrics.swd import swd
from genmodels.pagoda import Generator, GeneratorConfig, GrowthConfig, control, grow_2x, sample_latents
from workflows.config import check
from workflows.pagoda_invert import TextEncoder, load_teacher, read_rows, unet_from_dict
from workflows.pagoda_stages import load_generator
from workflows.store import Artifact, open_artifact
from workflows.train.export import png_grid, png_image

# ------------------------------------------------------------------------------------------
# pagoda_sample stage


@dataclass(frozen=True)
class SampleConfig:
    n: int = 64  # one-step samples per generator: grid_{R}.png and samples/{R}/*.png
    seed: int = 0  # the same latents at every resolution, and for the trained and the initial G
    omega: float = 0.0  # CFG scale of omega-conditioned generators
    heldout_fraction: float = 0.1
    caption_column: str = "recaption"
    swd_real: int = 512  # held-out real images (at most) at the final resolution
    swd_fakes_per_real: int = 2
    swd_projections: int = 512
    swd_patches: int = 128  # per image and pyramid level
    batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self) -> None:
        check([("n", self.n >= 1, "must be >= 1"), ("swd_real", self.swd_real >= 2, "must be >= 2"),
               ("swd_fakes_per_real", self.swd_fakes_per_real >= 1, "must be >= 1"),
               ("heldout_fraction", 0 < self.heldout_fraction < 1, "expected (0, 1): SWD needs held-out"),
               ("batch_size", self.batch_size >= 1, "must be >= 1")])


def resources(cfg: SampleConfig) -> dict[str, float]:
    return {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus else {})}


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
    text = TextEncoder(**final_meta["text"]).to(dev) if final_meta["text"] else None
    encode = (lambda caps: text(caps)) if text else (lambda caps: {})
    base = final_meta["base_resolution"]
    cond = encode(_captions(real, cfg.n))
    z = sample_latents((cfg.n, 3, base, base), generator=torch.Generator().manual_seed(cfg.seed))
    counts: dict[str, Any] = {"n": cfg.n}
    for r, name, art in gens:
        gen = load_generator(art)[0].to(dev)
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


def run_sample(inputs: dict[str, Artifact], cfg: SampleConfig, out: Artifact) -> dict[str, Any]:
    """Inputs: ``shard`` (held-out real images) and every generator stage to sample (any names)."""
    import ray

    gens = sorted((a.read_json("model_config.json")["resolution"], name, a) for name, a in inputs.items()
                  if name != "shard")
    if not gens:
        raise ValueError(f"pagoda_sample needs at least one generator stage, got {sorted(inputs)}")
    real = read_rows(inputs["shard"], gens[-1][0], cfg.heldout_fraction, cfg.caption_column, heldout=True)
    real = real.select_columns(["caption", "image"]).take_batch(cfg.swd_real, batch_format="numpy")
    if len(real["image"]) < 2:
        raise ValueError(f"heldout_fraction: {len(real['image'])} held-out rows, SWD needs at least 2")
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(sample_generators)
    return ray.get(task.remote(gens, real, cfg, out))


# ------------------------------------------------------------------------------------------
# Controllable generation CLI


def load_image(path: str, size: int | None = None) -> Tensor:
    """(1, 3, S, S) in [-1, 1]: center-cropped square, resized to ``size`` when given."""
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    img = ImageOps.fit(img, (size or side, size or side), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)[None]


def _write(out_dir: str, name: str, x: Tensor) -> str:
    path = os.path.join(out_dir, name)
    with open(path, "wb") as f:
        f.write(png_image(x))
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("superres", "z = inv(down(y)), then G_R(z)"), ("inpaint", "optimize z to match known pixels"),
                        ("transfer", "invert under --src-prompt, decode under --prompt"),
                        ("interpolate", "slerp between two inverted latents")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--generator", required=True, help="generator artifact (path or s3:// URI)")
        s.add_argument("--teacher", help="teacher artifact (default: the one in the generator's model_config.json)")
        s.add_argument("--image", action="append", required=True, help="input image (interpolate: twice)")
        s.add_argument("--out", required=True, help="output directory for the PNGs")
        s.add_argument("--prompt", default="", help="condition of the output (text models)")
        s.add_argument("--points", type=int, default=40, help="Karras grid points of the inversion")
        s.add_argument("--seed", type=int, default=0)
        if name == "transfer":
            s.add_argument("--src-prompt", default="", help="condition the input is inverted under")
        if name == "inpaint":
            s.add_argument("--box", default="0.3,0.3,0.7,0.7", help="hole as x0,y0,x1,y1 fractions")
            s.add_argument("--steps", type=int, default=100)
            s.add_argument("--lr", type=float, default=0.05)
        if name == "interpolate":
            s.add_argument("--num", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    gen, meta = load_generator(open_artifact(args.generator))
    teacher, _ = load_teacher(open_artifact(args.teacher or meta["teacher"]))
    text = TextEncoder(**meta["text"]) if meta["text"] else None
    def cond(prompt: str) -> dict:
        return {k: v for k, v in text([prompt]).items() if k != "text_embed"} if text else {}

    r = meta["resolution"]
    os.makedirs(args.out, exist_ok=True)
    written = []
    with torch.no_grad():
        if args.command == "superres":
            y = load_image(args.image[0])
            low = control.downsample(y, meta["base_resolution"])
            x = control.super_resolution(gen, teacher, low, args.points, **cond(args.prompt))
            written += [_write(args.out, "input.png", low[0]), _write(args.out, "superres.png", x[0])]
        elif args.command == "transfer":
            y = load_image(args.image[0], r)
            src, tgt = cond(args.src_prompt), cond(args.prompt)
            z = control.encode(teacher, y, args.points, **src)  # control.condition_transfer, inverted once for both
            written += [_write(args.out, "input.png", y[0]),
                        _write(args.out, "reconstruction.png", gen(z, **src)[0]),
                        _write(args.out, "transfer.png", gen(z, **tgt)[0])]
        elif args.command == "interpolate":
            if len(args.image) != 2:
                raise SystemExit("interpolate: give --image twice")
            c = cond(args.prompt)
            z0, z1 = (control.encode(teacher, load_image(p, r), args.points, **c) for p in args.image)
            frames = control.interpolate(gen, z0, z1, args.num, **c)[:, 0]
            written.append(os.path.join(args.out, "interpolate.png"))
            with open(written[-1], "wb") as f:
                f.write(png_grid(frames, nrow=args.num))
            written += [_write(args.out, f"frame_{i:02d}.png", fr) for i, fr in enumerate(frames)]
    if args.command == "inpaint":
        y = load_image(args.image[0], r)
        x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
        mask = torch.ones(1, 1, r, r)
        mask[..., int(y0 * r):int(y1 * r), int(x0 * r):int(x1 * r)] = 0  # 1 = known pixel
        known_mean = (y * mask).sum((2, 3), keepdim=True) / mask.sum()
        c = cond(args.prompt)
        z = control.encode(teacher, y * mask + known_mean * (1 - mask), args.points, **c)  # start from a coarse fill
        x, _ = control.inpaint(gen, y, mask, z=z, steps=args.steps, lr=args.lr, **c)
        written += [_write(args.out, "masked.png", (y * mask)[0]), _write(args.out, "inpaint.png", x[0])]
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
