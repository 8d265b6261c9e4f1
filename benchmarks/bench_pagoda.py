"""PaGoDA speed: one-step sampling at resolution R vs. the teacher's multi-step Heun sampling at the
base resolution, training images/s of every stage's step, and inversion images/s.

    python benchmarks/bench_pagoda.py                                   # tiny models, CPU, any machine
    python benchmarks/bench_pagoda.py --preset paper --resolution 512   # EDM's ADM at 64 grown to 512 (GPU)

Weights are random (speed does not depend on them; the paper preset's DINO / DeiT / EfficientNet
backbones are built without downloading). Prints a table and appends one JSON line to
benchmarks/results.jsonl with the device name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.results import RESULTS, device_name, record  # noqa: E402
from genmodels.pagoda import (
    DiscriminatorConfig,
    EDMPrecond,
    Generator,
    PagodaConfig,
    ProjectedDiscriminator,
    ProjectedFeatures,
    TinyFeatures,
    UNet,
    build_timm_features,
    discriminator_loss,
    generator_loss,
    grow_2x,
    invert_latents,
    ode_sample,
    teacher_loss,
)
from workflows.pagoda.models import TEACHER_PRESETS

PRESETS = {  # base resolution, U-Net, text width / tokens / pooled width, batch sizes
    "tiny": {"base": 16, "net": "micro", "text": (64, 32, 64), "train_batch": 8, "sample_batch": 16,
             "invert_batch": 16},
    "paper": {"base": 64, "net": "paper", "text": (768, 77, 768), "train_batch": 16, "sample_batch": 16,
              "invert_batch": 64},
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], dev: torch.device, iters: int, warmup: int = 1) -> float:
    """Seconds per call (median of ``iters``) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def gd_step(models, batch, pcfg, opt_g, opt_d, autocast) -> Callable[[], None]:
    """One alternating generator + discriminator update, as the training stages run it."""
    def step() -> None:
        with autocast():
            loss, _ = generator_loss(models, batch, pcfg)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        with autocast():
            loss, _ = discriminator_loss(models, batch, pcfg)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
    return step


def rec_ab(iters: int) -> list[dict]:
    """Demo-shaped G+D steps (micro generator at 16 / 32 / 64, the stages' L_rec nets) with L_rec "plain"
    (raw features, no augmentation) vs. "official" (projection + shared augmentation, the default),
    interleaved, CPU time of this process on one thread: medians per arm (issue 12 #8)."""
    from workflows.pagoda.stages import DistillConfig, build_discriminator, build_perceptual

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = dataclasses.replace(TEACHER_PRESETS["micro"], img_resolution=16, text_dim=64)
    gens = [Generator.from_teacher(EDMPrecond(UNet(net)))]
    gens += [grow_2x(gens[0])]
    gens += [grow_2x(gens[1])]
    out = []
    for g, r, b in zip(gens, (16, 32, 64), (16, 16, 8)):
        steps, times = {}, {}
        for arm, kw in (("plain", {"perceptual_projection": False, "rec_augment": False}), ("official", {})):
            cfg = DistillConfig(w_adv=0.1, **kw)
            d = build_discriminator(cfg, r, 64)
            models = {"generator": g.train(), "discriminator": d, "perceptual": list(build_perceptual(cfg, r))}
            pcfg = PagodaConfig(resolution=r, w_adv=0.1, rec_augment=cfg.rec_augment)
            opt_g = torch.optim.AdamW([q for q in g.parameters() if q.requires_grad], lr=1e-5)
            opt_d = torch.optim.AdamW([q for q in d.parameters() if q.requires_grad], lr=1e-4)
            batch = {"image": torch.rand(b, 3, r, r) * 2 - 1, "latent": torch.randn(b, 3, 16, 16) * 80,
                     "text": torch.randn(b, 32, 64), "text_mask": torch.ones(b, 32, dtype=torch.bool),
                     "text_embed": torch.randn(b, 64)}
            steps[arm] = gd_step(models, batch, pcfg, opt_g, opt_d, contextlib.nullcontext)
            steps[arm]()  # warm-up
            times[arm] = []
        for _ in range(iters):
            for arm, step in steps.items():
                t0 = time.process_time()
                step()
                times[arm].append(time.process_time() - t0)
        med = {arm: sorted(t)[len(t) // 2] for arm, t in times.items()}
        out.append({"resolution": r, "batch": b, **{f"{a}_ms": round(1e3 * v, 1) for a, v in med.items()},
                    "ratio": round(med["official"] / med["plain"], 3)})
        print(f"L_rec A/B at {r}px, batch {b}: plain {1e3 * med['plain']:.1f} ms, official "
              f"{1e3 * med['official']:.1f} ms per G+D step (CPU time), ratio {out[-1]['ratio']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--resolution", type=int, help="one-step output resolution (default: tiny 64, paper 512)")
    p.add_argument("--points", type=int, default=40, help="Karras grid of the teacher's Heun sampler / inversion")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--rec-ab", type=int, default=0, metavar="STEPS",
                   help="only time L_rec plain vs. official in demo-shaped G+D steps, STEPS per arm and size")
    args = p.parse_args(argv)
    if args.rec_ab:
        record("pagoda_rec_ab", {"torch": torch.__version__, "rows": rec_ab(args.rec_ab)}, path=args.out)
        return 0
    ps = PRESETS[args.preset]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dev.type == "cuda"
    base = ps["base"]
    res = args.resolution or (64 if args.preset == "tiny" else 512)
    width, tokens, pooled = ps["text"]
    torch.manual_seed(0)

    net = dataclasses.replace(TEACHER_PRESETS[ps["net"]], img_resolution=base, text_dim=width)
    teacher = EDMPrecond(UNet(net)).to(dev)

    def text(n: int) -> dict[str, torch.Tensor]:
        return {"text": torch.randn(n, tokens, width, device=dev),
                "text_mask": torch.ones(n, tokens, dtype=torch.bool, device=dev)}

    gens = [Generator.from_teacher(teacher)]
    while gens[-1].net.cfg.out_resolution < res:
        gens.append(grow_2x(gens[-1]))
    gens = [g.to(dev) for g in gens]
    nets = [] if args.preset == "tiny" else [
        build_timm_features("deit_base_distilled_patch16_224", (2, 5, 8, 11), pretrained=False),
        build_timm_features("tf_efficientnet_lite0", (1, 2, 3, 4), pretrained=False)]

    nets = [ProjectedFeatures(n, n.channels) for n in nets]  # L_rec as the stages build it (issue 12 #8)

    def feats(r: int) -> list[torch.nn.Module]:
        if nets:
            return [n.to(dev) for n in nets]
        tiny = TinyFeatures(size=max(32, r))
        return [ProjectedFeatures(tiny, tiny.channels, tiny.channels[0]).to(dev)]

    def disc(r: int) -> ProjectedDiscriminator:
        if args.preset == "tiny":
            return ProjectedDiscriminator.tiny(DiscriminatorConfig(
                channels=16, cmap_dim=16, text_dim=pooled, size=max(32, r))).to(dev)
        return ProjectedDiscriminator.build(DiscriminatorConfig(text_dim=pooled), pretrained=False).to(dev)

    rows = []

    def row(what: str, r: int, batch: int, sec: float, images: int) -> None:
        rows.append({"what": what, "resolution": r, "batch": batch, "s_per_call": round(sec, 5),
                     "ms_per_image": round(1e3 * sec / images, 3), "images_per_s": round(images / sec, 2)})

    def ac():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    with torch.no_grad(), ac():
        for b in (1, ps["sample_batch"]):
            z = torch.randn(b, 3, base, base, device=dev) * 80
            cond = text(b)
            row(f"one-step G ({res}px)", res, b, timed(lambda z=z, c=cond: gens[-1](z, **c), dev, args.iters), b)
            row(f"teacher Heun {2 * args.points - 1} NFE ({base}px)", base, b,
                timed(lambda z=z, c=cond: ode_sample(teacher, z, args.points, **c), dev, 1, warmup=0), b)
        b = ps["invert_batch"]
        x = torch.rand(b, 3, base, base, device=dev) * 2 - 1
        cfg = PagodaConfig(resolution=base, inversion_points=args.points)
        row("inversion (image + flip)", base, b,
            timed(lambda: invert_latents({"teacher": teacher}, {"image": x, **text(b)}, cfg), dev, 1, warmup=0), b)

    b = ps["train_batch"]
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    x = torch.rand(b, 3, base, base, device=dev) * 2 - 1

    def teacher_step():
        with ac():
            loss, _ = teacher_loss({"teacher": teacher}, {"image": x, **text(b)}, PagodaConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row("train: teacher", base, b, timed(teacher_step, dev, args.iters), b)
    for i, g in enumerate(gens):
        r = g.net.cfg.out_resolution
        d = disc(r)
        models = {"generator": g.train(), "discriminator": d, "perceptual": feats(r)}
        pcfg = PagodaConfig(resolution=r, w_adv=0.2 if i == 0 else 1.0)
        opt_g = torch.optim.AdamW([q for q in g.parameters() if q.requires_grad], lr=1e-5)
        opt_d = torch.optim.AdamW([q for q in d.parameters() if q.requires_grad], lr=1e-4)
        batch = {"image": torch.rand(b, 3, r, r, device=dev) * 2 - 1, "latent": torch.randn(b, 3, base, base,
                 device=dev) * 80, "text_embed": torch.randn(b, pooled, device=dev), **text(b)}

        row(f"train: {'distill' if i == 0 else f'grow_{r}'} (G+D)", r, b,
            timed(gd_step(models, batch, pcfg, opt_g, opt_d, ac), dev, args.iters), b)

    one = next(x for x in rows if x["what"].startswith("one-step") and x["batch"] == 1)
    heun = next(x for x in rows if x["what"].startswith("teacher Heun") and x["batch"] == 1)
    figures = {"preset": args.preset, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "precision": "bf16" if bf16 else "fp32",
               "one_step_speedup_vs_heun_batch1": round(heun["s_per_call"] / one["s_per_call"], 1), "rows": rows}
    print(f"PaGoDA benchmark, preset {args.preset}, {device_name()}, {figures['precision']}")
    print(f"{'what':<34} {'res':>5} {'batch':>5} {'s/call':>9} {'ms/img':>9} {'img/s':>9}")
    for x in rows:
        print(f"{x['what']:<34} {x['resolution']:>5} {x['batch']:>5} {x['s_per_call']:>9.4f} "
              f"{x['ms_per_image']:>9.2f} {x['images_per_s']:>9.1f}")
    print(f"one-step {res}px vs teacher Heun {base}px (batch 1): {figures['one_step_speedup_vs_heun_batch1']}x faster")
    record("pagoda", figures, path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
