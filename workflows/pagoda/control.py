"""Controllable generation with trained PaGoDA artifacts, through the inversion encoder (PaGoDA Sec. 5.3).

The image side (load, crop, write) and a CLI over genmodels.pagoda.control:

    python -m workflows.pagoda.control superres    --generator ART --image low.png --out DIR [--prompt "..."]
    python -m workflows.pagoda.control inpaint     --generator ART --image x.png --out DIR [--box 0.3,0.3,0.7,0.7]
    python -m workflows.pagoda.control transfer    --generator ART --image x.png --src-prompt "a red circle" \
                                                   --prompt "a blue square" --out DIR
    python -m workflows.pagoda.control interpolate --generator ART --image a.png --image b.png --out DIR [--num 8]

ART is a generator stage's artifact (local path or s3://), e.g. runs/demo/pagoda_grow_64/<key>; the
teacher that serves as the encoder is the one named in its model_config.json unless --teacher is given.
For text-conditioned models the prompt is encoded with the model's own CLIP ("" if not given).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from genmodels.pagoda import control
from pipeline.store import open_artifact
from workflows.pagoda.models import load_one_step, load_teacher
from workflows.text_clip import encoder
from workflows.train.export import png_grid, png_image

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
    gen, meta = load_one_step(open_artifact(args.generator))
    teacher, _ = load_teacher(open_artifact(args.teacher or meta["teacher"]))
    text = encoder(**meta["text"]) if meta["text"] else None
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
