"""Sample a Würstchen model set (prompts → Stage C → Stage B → Stage A) with one command.

Which models, in order of precedence:

    # the newest trained set under a pipeline root: the latest wuerstchen_stage_c manifest, and
    # the stage_b / stage_a artifacts its manifest chain names (so the three always belong together)
    python workflows/sample_wuerstchen.py --root runs/demo --prompt "a red circle" --out grid.png

    # the set a wuerstchen_sample artifact was made from
    python workflows/sample_wuerstchen.py --sample-artifact runs/demo/wuerstchen_sample/<key> \
        --prompt ... --out grid.png

    # three training artifacts explicitly (local paths or s3:// URIs)
    python workflows/sample_wuerstchen.py --stage-a A --stage-b B --stage-c C --prompt ... --out grid.png

    # the public v2 weights in diffusers layout (DIR/prior, DIR/decoder, DIR/vqgan); text encoders
    # are open_clip ViT-bigG-14 (C) and ViT-H-14 (B) with their LAION tags (downloaded on a cluster)
    python workflows/sample_wuerstchen.py --official DIR --prompt ... --size 1024 --out grid.png

``--out X.png`` writes the grid only; ``--out DIR`` (local or s3://) writes grid.png,
samples/NNN_MM.png and prompts.json, exactly like the ``wuerstchen_sample`` stage. All prompts
are sampled as one batch, each drawing its noise from its own generator seeded ``seed + prompt
index``: same prompts and seed, same pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from genmodels.clip import encode_text_tokens
from genmodels.wuerstchen import (
    COMPRESSOR_PRESETS,
    map_diffusers_state_dict,
    sample_stage_b,
    sample_stage_c,
)
from workflows.store import Artifact, filesystem, open_artifact
from workflows.train.export import png_grid, png_image
from workflows.wuerstchen_encode import TextEncoderConfig
from workflows.wuerstchen_stages import (
    SampleConfig,
    build_module,
    load_trained,
    model_config,
    sem_latent_size,
    stage_c_steps,
)

OFFICIAL_SUBDIR = {"stage_c": "prior", "stage_b": "decoder", "stage_a": "vqgan"}
OFFICIAL_TEXT = {"stage_c": TextEncoderConfig("ViT-bigG-14", "laion2b_s39b_b160k"),
                 "stage_b": TextEncoderConfig("ViT-H-14", "laion2b_s32b_b79k")}


@dataclass
class ModelSet:
    stage_a: nn.Module
    stage_b: nn.Module
    stage_c: nn.Module
    text_c: TextEncoderConfig
    text_b: TextEncoderConfig
    compressor: dict[str, Any]  # its config: fixes the semantic latent size for an image size
    image_size: int  # the resolution it was trained at

    def to(self, device: torch.device) -> ModelSet:
        for m in (self.stage_a, self.stage_b, self.stage_c):
            m.to(device)
        return self

    def sem_size(self, image_size: int) -> tuple[int, int]:
        return sem_latent_size(self.compressor, image_size)


# ----------------------------------------------------------------------------------------------
# Loading


def load_trained_set(a: Artifact, b: Artifact, c: Artifact) -> ModelSet:
    mb, mc = b.read_json("model_config.json"), c.read_json("model_config.json")
    return ModelSet(stage_a=load_trained(a, "stage_a"), stage_b=load_trained(b, "stage_b", meta=mb),
                    stage_c=load_trained(c, "stage_c", meta=mc), text_c=TextEncoderConfig(**mc["text_encoder"]),
                    text_b=TextEncoderConfig(**mb["text_encoder"]), compressor=mb["modules"]["compressor"],
                    image_size=int(mb["resolution"]))


def _sibling(art: Artifact, stage: str, key: str) -> Artifact:
    """``{root}/{stage}/{key}`` next to ``art`` (= ``{root}/{its stage}/{its key}``)."""
    root = art.uri.rsplit("/", 2)[0]
    return open_artifact(f"{root}/{stage}/{key}")


def from_sample_artifact(uri: str) -> tuple[Artifact, Artifact, Artifact]:
    s = open_artifact(uri)
    if not s.manifest:
        raise ValueError(f"{uri}: no manifest.json (not a finished wuerstchen_sample artifact)")
    keys = s.manifest["inputs"]
    return tuple(_sibling(s, k, keys[k]) for k in ("wuerstchen_stage_a", "wuerstchen_stage_b", "wuerstchen_stage_c"))


def latest_under_root(root: str) -> tuple[Artifact, Artifact, Artifact]:
    """The newest finished Stage C under a pipeline root and the B and A its manifest chain names."""
    import pyarrow.fs as pafs

    fs, path = filesystem(root)
    base = posixpath.join(path, "wuerstchen_stage_c")
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    root_uri = root.rstrip("/") if "://" in root else path
    cands = [open_artifact(f"{root_uri}/wuerstchen_stage_c/{posixpath.basename(i.path)}") for i in infos
             if i.type == pafs.FileType.Directory]
    cands = [c for c in cands if c.manifest]
    if not cands:
        raise ValueError(f"{root}: no finished wuerstchen_stage_c artifact")
    c = max(cands, key=lambda x: x.manifest.get("created_at", ""))
    sem = _sibling(c, "wuerstchen_encode_semantic", c.manifest["inputs"]["wuerstchen_encode_semantic"])
    b = _sibling(c, "wuerstchen_stage_b", sem.manifest["inputs"]["wuerstchen_stage_b"])
    a = _sibling(c, "wuerstchen_stage_a", b.manifest["inputs"]["wuerstchen_stage_a"])
    return a, b, c


def _read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """diffusers weights in a folder: an index of shards, one file, or .bin; non-variant preferred."""
    from safetensors.torch import load_file

    files = sorted(os.listdir(folder))
    for ext, loader in ((".safetensors", load_file),
                        (".bin", lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        index = [f for f in files if f.endswith(f"{ext}.index.json")]
        if index:
            with open(os.path.join(folder, index[0])) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        else:
            shards = [f for f in files if f.endswith(ext)]
            plain = [f for f in shards if f == f"diffusion_pytorch_model{ext}"]
            shards = plain or shards[:1]
        if shards:
            sd: dict[str, torch.Tensor] = {}
            for f in shards:
                sd.update(loader(os.path.join(folder, f)))
            return sd
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weights")


def official_config(kind: str, cfg: dict[str, Any]):
    """diffusers config.json (WuerstchenPrior / WuerstchenDiffNeXt / PaellaVQModel) → our config."""
    g = cfg.get
    if kind == "stage_c":
        return model_config("stage_c", "paper", {"c_in": g("c_in", 16), "c": g("c", 1536), "c_clip": g("c_cond", 1280),
                                                 "c_r": g("c_r", 64), "depth": g("depth", 32), "nhead": g("nhead", 24),
                                                 "dropout": g("dropout", 0.1)})
    if kind == "stage_b":
        drop = g("dropout", 0.1)
        return model_config("stage_b", "paper", {k: v for k, v in {
            "c_in": g("c_in"), "c_r": g("c_r"), "patch_size": g("patch_size"), "c_cond": g("c_cond"),
            "c_hidden": g("c_hidden"), "nhead": [max(h, 0) for h in g("nhead")] if g("nhead") else None,
            "blocks": g("blocks"), "level_config": g("level_config"), "inject_sem": g("inject_effnet"),
            "c_sem": g("effnet_embd"), "c_clip": g("clip_embd"), "kernel_size": g("kernel_size"),
            "dropout": drop[0] if isinstance(drop, list) else drop}.items() if v is not None})
    if kind == "stage_a":
        if g("up_down_scale_factor", 2) != 2:
            raise ValueError("stage_a: only up_down_scale_factor=2 (f4) is supported")
        return model_config("stage_a", "paper", {k: v for k, v in {
            "c_in": g("in_channels"), "levels": g("levels"), "bottleneck_blocks": g("bottleneck_blocks"),
            "c_hidden": g("embed_dim"), "c_latent": g("latent_channels"), "codebook_size": g("num_vq_embeddings"),
            "scale_factor": g("scale_factor")}.items() if v is not None})
    raise ValueError(f"unknown kind {kind!r}; expected stage_a, stage_b or stage_c")


def load_official(directory: str, kind: str) -> nn.Module:
    """One public v2 network from a local diffusers-layout directory (the pipeline root or the
    component's own folder: config.json + diffusion_pytorch_model*.safetensors|.bin)."""
    folder = os.path.join(directory, OFFICIAL_SUBDIR[kind]) if kind in OFFICIAL_SUBDIR else directory
    if not os.path.isdir(folder):
        folder = directory
    cfg_path = os.path.join(folder, "config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    module = build_module(kind, official_config(kind, cfg))
    module.load_state_dict(map_diffusers_state_dict(kind, _read_state_dict(folder)), strict=True)
    return module.eval().requires_grad_(False)


def load_official_set(directory: str, clip_c: str = "", clip_b: str = "") -> ModelSet:
    text_c = dataclasses.replace(OFFICIAL_TEXT["stage_c"], **({"pretrained": clip_c} if clip_c else {}))
    text_b = dataclasses.replace(OFFICIAL_TEXT["stage_b"], **({"pretrained": clip_b} if clip_b else {}))
    return ModelSet(stage_a=load_official(directory, "stage_a"), stage_b=load_official(directory, "stage_b"),
                    stage_c=load_official(directory, "stage_c"), text_c=text_c, text_b=text_b,
                    compressor=dataclasses.asdict(COMPRESSOR_PRESETS["paper"]), image_size=1024)


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
    model, _, tokenizer = text.build()
    model.to(device)
    states = torch.cat([encode_text_tokens(model, tokenizer([p]).to(device)).float() for p in [*prompts, ""]])
    del model
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
        z = sample_stage_c(models, tc, tc_u, sem_size=sem_hw, steps=ts_c, guidance=cfg.guidance_c, generator=gens)
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


def run_stage(inputs: dict[str, Artifact], cfg: SampleConfig, out: Artifact) -> dict[str, Any]:
    ms = load_trained_set(inputs["wuerstchen_stage_a"], inputs["wuerstchen_stage_b"], inputs["wuerstchen_stage_c"])
    images, times = generate(ms, cfg)
    counts = write_outputs(out, images, list(cfg.prompts), cfg)
    return counts | {f"seconds_{k}": round(v, 3) for k, v in times.items()} | {"device": str(device_for(cfg.device))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="pipeline root (local or s3://): newest trained set")
    src.add_argument("--sample-artifact", help="a wuerstchen_sample artifact: the set it was made from")
    src.add_argument("--stage-c", help="Stage C training artifact (with --stage-b and --stage-a)")
    src.add_argument("--official", help="local diffusers-layout directory of the public v2 weights")
    p.add_argument("--stage-b")
    p.add_argument("--stage-a")
    p.add_argument("--clip-c", default="", help="--official: open_clip tag or local checkpoint for ViT-bigG-14")
    p.add_argument("--clip-b", default="", help="--official: open_clip tag or local checkpoint for ViT-H-14")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-c", type=int, default=29)
    p.add_argument("--steps-b", type=int, default=12)
    p.add_argument("--guidance-c", type=float, default=4.0)
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
