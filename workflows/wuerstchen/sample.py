"""Sample a Würstchen model set (prompts → Stage C → Stage B → Stage A) with one command.

Which models, in order of precedence:

    # the newest trained set under a pipeline root: the latest wuerstchen_stage_c manifest, and
    # the stage_b / stage_a artifacts its manifest chain names (so the three always belong together)
    python -m workflows.wuerstchen.sample --root runs/demo --prompt "a red circle" --out grid.png

    # the set a wuerstchen_sample artifact was made from
    python -m workflows.wuerstchen.sample --sample-artifact runs/demo/wuerstchen_sample/<key> \
        --prompt ... --out grid.png

    # three training artifacts explicitly (local paths or s3:// URIs)
    python -m workflows.wuerstchen.sample --stage-a A --stage-b B --stage-c C --prompt ... --out grid.png

    # the public v2 weights in diffusers layout (DIR/prior, DIR/decoder, DIR/vqgan); text encoders
    # are open_clip ViT-bigG-14 (C) and ViT-H-14 (B) with their LAION tags (downloaded on a cluster)
    python -m workflows.wuerstchen.sample --official DIR --prompt ... --size 1024 --out grid.png

``--out X.png`` writes the grid only; ``--out DIR`` (local or s3://) writes grid.png,
samples/NNN_MM.png and prompts.json, exactly like the ``wuerstchen_sample`` stage. All prompts
are sampled as one batch, each drawing its noise from its own generator seeded ``seed + prompt
index``: same prompts and seed, same pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from genmodels.wuerstchen import sample_stage_b, sample_stage_c
from pipeline.store import Artifact, filesystem, open_artifact
from workflows.family import Generator
from workflows.train.export import png_grid, png_image
from workflows.wuerstchen.models import ModelSet, TextEncoderConfig, initial_module, load_trained_set, stage_c_steps
from workflows.wuerstchen.official import load_official_set

ROLES = ("stage_a", "stage_b", "stage_c")  # the sample stage's inputs, and a generator's artifacts


@dataclass(frozen=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: [
        "a red circle on a white background", "a blue square on a light green background",
        "a yellow star and a black triangle on a beige background", "a portrait of a smiling astronaut"])
    n_per_prompt: int = 4
    seed: int = 0
    steps_c: int = 29  # 29: the paper's schedule; any other count: linear in t
    steps_b: int = 12
    guidance_c: float = 0.0  # 0: the CFG scale Stage C recorded (ModelSet.guidance_c); <= 1 elsewhere: no CFG
    guidance_b: float = 0.0
    image_size: int = 0  # 0: the resolution Stage B was trained at
    device: str = "auto"  # auto: cuda when available (bf16 autocast), else cpu (fp32)

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")
        for key in ("n_per_prompt", "steps_c", "steps_b"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1")
        if self.image_size and self.image_size % 16:
            raise ValueError(f"image_size: expected a multiple of 16, got {self.image_size}")


# ----------------------------------------------------------------------------------------------
# Which trained set: walk manifests by role (inputs: {role: key}, upstream: {role: stage name})


def _upstream(art: Artifact, role: str) -> Artifact:
    """The artifact ``art`` read as ``role``: ``{root}/{upstream stage}/{key}`` next to ``art``."""
    m = art.manifest
    if not m or role not in m.get("inputs", {}) or role not in m.get("upstream", {}):
        raise ValueError(f"{art.uri}: its manifest names no input {role!r} (not finished, or written by "
                         "an older runner: rerun the stage)")
    root = art.uri.rsplit("/", 2)[0]
    return open_artifact(f"{root}/{m['upstream'][role]}/{m['inputs'][role]}")


def from_sample_artifact(uri: str) -> tuple[Artifact, Artifact, Artifact]:
    """The (A, B, C) training artifacts a finished sample artifact was made from."""
    s = open_artifact(uri)
    if not s.manifest:
        raise ValueError(f"{uri}: no manifest.json (not a finished wuerstchen_sample artifact)")
    a, b, c = (_upstream(s, role) for role in ROLES)
    return a, b, c


def latest_under_root(root: str, stage_c: str = "wuerstchen_stage_c") -> tuple[Artifact, Artifact, Artifact]:
    """The newest finished Stage C under a pipeline root and the B and A its manifest chain names:
    C's ``latents`` came from the compressor of its encode stage's ``stage_b``, and that Stage B
    names its ``stage_a``."""
    fs, path = filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(path, stage_c), allow_not_found=True))
    root_uri = root.rstrip("/") if "://" in root else path
    cands = [open_artifact(f"{root_uri}/{stage_c}/{posixpath.basename(i.path)}") for i in infos
             if i.type == pafs.FileType.Directory]
    cands = [c for c in cands if c.manifest]
    if not cands:
        raise ValueError(f"{root}: no finished {stage_c} artifact")
    c = max(cands, key=lambda x: x.manifest.get("created_at", ""))
    b = _upstream(_upstream(c, "latents"), "stage_b")
    return _upstream(b, "stage_a"), b, c


# ----------------------------------------------------------------------------------------------
# Sampling


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def text_states(text: TextEncoderConfig, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt token states (P, L, w), empty-caption states (1, L, w)), as the encode stages make them.

    One prompt at a time, so an image depends on its prompt and seed only, not on its batch."""
    encoder = text.build().to(device)
    states = torch.cat([encoder([p])["text"] for p in [*prompts, ""]])
    del encoder
    return states[:-1], states[-1:]


@torch.no_grad()
def generate(ms: ModelSet, cfg: SampleConfig,
             prompts: list[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Images (P * n_per_prompt, 3, H, W) in [-1, 1], prompt-major, and seconds per stage."""
    prompts = list(prompts or cfg.prompts)
    device = device_for(cfg.device)
    ms.to(device)
    size = cfg.image_size or ms.image_size
    sem_hw, lat_hw = ms.sem_size(size), (size // ms.stage_a.downscale,) * 2
    t0 = time.perf_counter()
    tc, tc_u = text_states(ms.text_c, prompts, device)
    tb, tb_u = (tc, tc_u) if ms.text_b == ms.text_c else text_states(ms.text_b, prompts, device)
    times = {"text": time.perf_counter() - t0}
    ts_c = stage_c_steps(cfg.steps_c)
    models = {"stage_a": ms.stage_a, "stage_b": ms.stage_b, "stage_c": ms.stage_c}
    n = cfg.n_per_prompt
    # All prompts in one batch; prompt i draws all its noise from its own generator (seed + i).
    gens = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(len(prompts))]
    tc, tb = tc.repeat_interleave(n, dim=0), tb.repeat_interleave(n, dim=0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        marks = [time.perf_counter()]
        z = sample_stage_c(models, tc, tc_u, sem_size=sem_hw, steps=ts_c, guidance=cfg.guidance_c or ms.guidance_c,
                           generator=gens)
        marks.append(_sync(device))
        lat = sample_stage_b(models, z, tb, tb_u, latent_size=lat_hw, steps=cfg.steps_b, guidance=cfg.guidance_b,
                             generator=gens)
        marks.append(_sync(device))
        images = ms.stage_a.decode(lat).float().clamp(-1, 1).cpu()
        marks.append(_sync(device))
    times.update({k: e - s for k, s, e in zip(("stage_c", "stage_b", "stage_a"), marks, marks[1:])})
    return images, times


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def write_outputs(out: Artifact, images: torch.Tensor, prompts: list[str], cfg: SampleConfig) -> dict[str, Any]:
    n = cfg.n_per_prompt
    out.write_bytes("grid.png", png_grid(images, nrow=n))  # one row per prompt
    records = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            name = f"samples/{i:03d}_{j:02d}.png"
            out.write_bytes(name, png_image(images[i * n + j]))
            records.append({"file": name, "prompt": prompt, "prompt_index": i, "sample": j, "seed": cfg.seed + i})
    out.write_json("prompts.json", records)
    return {"images": len(records), "prompts": len(prompts), "image_size": int(images.shape[-1])}


def sample(inputs: dict[str, Artifact], cfg: SampleConfig, out: Artifact) -> dict[str, Any]:
    """The sample stage: prompts → C → B → A: grid.png, samples/*.png, prompts.json."""
    ms = load_trained_set(*(inputs[role] for role in ROLES))
    images, times = generate(ms, cfg)
    counts = write_outputs(out, images, list(cfg.prompts), cfg)
    return counts | {f"seconds_{k}": round(v, 3) for k, v in times.items()} | {"device": str(device_for(cfg.device))}


def load_generator(artifacts: dict[str, Artifact], name: str = "wuerstchen", initial: bool = False) -> Generator:
    """The family face (``workflows.family``): one image per prompt on the CPU with the default
    sampler settings (29 Stage C steps at the CFG scale Stage C recorded, else 4; 12 Stage B steps),
    prompt i seeded ``seed + i``. ``initial``: Stage C as its stage initialised it, A and B trained:
    the text-conditional prior is where prompts enter, so this is the floor its training is read against."""
    ms = load_trained_set(*(artifacts[role] for role in ROLES))
    if initial:
        ms.stage_c = initial_module(artifacts["stage_c"], "stage_c")
    base = SampleConfig(n_per_prompt=1, device="cpu")

    def draw(prompts: list[str], seed: int) -> torch.Tensor:
        prompts = list(prompts)
        return generate(ms, dataclasses.replace(base, prompts=prompts, seed=seed), prompts)[0]

    # Network evaluations per image: one per Stage C step (CFG's conditional and unconditional
    # halves run as one batched call), one per Stage B step, one Stage A decode; text encoding
    # is not counted.
    return Generator(name, ms.image_size, draw, nfe=base.steps_c + base.steps_b + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="pipeline root (local or s3://): newest trained set")
    src.add_argument("--sample-artifact", help="a wuerstchen_sample artifact: the set it was made from")
    src.add_argument("--stage-c", help="Stage C training artifact (with --stage-b and --stage-a)")
    src.add_argument("--official", help="local diffusers-layout directory of the public v2 weights")
    p.add_argument("--stage-b")
    p.add_argument("--stage-a")
    p.add_argument("--clip-c", default="", help="--official: transformers CLIP text model (dir or hub id) for Stage C")
    p.add_argument("--clip-b", default="", help="--official: transformers CLIP text model (dir or hub id) for Stage B")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-c", type=int, default=29)
    p.add_argument("--steps-b", type=int, default=12)
    p.add_argument("--guidance-c", type=float, default=0.0, help="0: the scale Stage C recorded (else 4)")
    p.add_argument("--guidance-b", type=float, default=0.0)
    p.add_argument("--size", type=int, default=0, help="image size (default: the training resolution)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="X.png (grid only) or a directory / s3:// prefix")
    args = p.parse_args(argv)
    cfg = SampleConfig(prompts=args.prompt, n_per_prompt=args.n, seed=args.seed, steps_c=args.steps_c,
                       steps_b=args.steps_b, guidance_c=args.guidance_c, guidance_b=args.guidance_b,
                       image_size=args.size, device=args.device)
    try:
        cfg.validate()
        if args.official:
            ms = load_official_set(args.official, args.clip_c, args.clip_b)
        else:
            if args.stage_c:
                if not (args.stage_b and args.stage_a):
                    raise ValueError("--stage-c needs --stage-b and --stage-a")
                arts = (open_artifact(args.stage_a), open_artifact(args.stage_b), open_artifact(args.stage_c))
            else:
                arts = from_sample_artifact(args.sample_artifact) if args.sample_artifact else \
                    latest_under_root(args.root)
            print("models: " + ", ".join(a.uri for a in arts), flush=True)
            ms = load_trained_set(*arts)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images, times = generate(ms, cfg)
    if args.out.endswith(".png"):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "wb") as f:
            f.write(png_grid(images, nrow=cfg.n_per_prompt))
    else:
        out = open_artifact(args.out if "://" in args.out else os.path.abspath(args.out))
        write_outputs(out, images, args.prompt, cfg)
    print(f"wrote {args.out}: {len(images)} images; seconds " + ", ".join(f"{k}={v:.2f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
