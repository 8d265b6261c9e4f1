"""Würstchen throughput and latency: Stage C / Stage B training and three-stage sampling.

    python benchmarks/bench_wuerstchen.py                                  # tiny presets (CPU: seconds)
    python benchmarks/bench_wuerstchen.py --preset paper --resolution 1024 --batch-b 4 --batch-c 32 \\
        --peak-tflops 989                                                  # one H100, bf16

Training: one optimizer step = forward + backward + AdamW of Stage C alone, and of Stage B with the
jointly trained semantic compressor (its images go through the compressor; Stage A latents are
precomputed, as in the pipeline). Throughput in images/s; MFU = model FLOPs per step (counted by
``torch.utils.flop_counter`` on one forward+backward) × steps/s ÷ the peak you pass (bf16 dense:
H100 SXM 989, A100 312 TFLOP/s). bf16 autocast on GPU, fp32 on CPU.

Sampling: text states → Stage C (29 steps on the paper's schedule, CFG 4: two passes per step,
batched) → Stage B (12 steps, no CFG) → Stage A decode, timed per stage, plus one network pass of
each stage for reference. Text encoders are not timed (random token states of the right width).

``--input-pipeline`` measures Stage B's input pipeline alone (images/s delivered to the step, no
model): encoded JPEGs in Ray's object store (as ``in_memory``), read with ``iter_batches``, either
decoded inside the step by the collate (before) or by ``stages.decode_images`` in a Ray Data
``map_batches`` ahead of it (after); ``--step-ms`` adds a simulated accelerator step (a sleep: the
CPU is free meanwhile), where the second overlaps decoding with training.

``--flops-only`` builds the networks on the meta device (no memory, any preset, no GPU) and prints
the model FLOPs per image of one training step and the throughput they imply at a given MFU.

Prints a table and appends one JSON line per run to benchmarks/results.jsonl (device name included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.results import device_name, record
from genmodels.wuerstchen import (
    SemanticCompressor,
    StageA,
    StageB,
    StageC,
    sample_stage_b,
    sample_stage_c,
    stage_b_loss,
    stage_c_loss,
)
from genmodels.wuerstchen.diffusion import stage_c_timesteps
from workflows.preflight_models import wuerstchen_flops
from workflows.wuerstchen.models import TextEncoderConfig, model_config

TEXT = {"tiny": ("tiny-clip", "tiny-clip"), "paper": ("ViT-bigG-14", "ViT-H-14")}  # (C, B)
def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build(preset: str, resolution: int, device: torch.device, grad_ckpt: bool):
    w_c, w_b = (TextEncoderConfig(n).width for n in TEXT[preset])
    comp = SemanticCompressor(dataclasses.replace(model_config("compressor", preset), pretrained=False))
    sem_hw = comp.latent_size((resolution, resolution))
    nets = {
        "stage_a": StageA(model_config("stage_a", preset)),
        "compressor": comp,
        "stage_b": StageB(model_config("stage_b", preset, c_clip=w_b, grad_checkpointing=grad_ckpt)),
        "stage_c": StageC(model_config("stage_c", preset, c_clip=w_c, grad_checkpointing=grad_ckpt)),
    }
    return {k: v.to(device) for k, v in nets.items()}, sem_hw, (w_c, w_b)


def train_bench(name, models, trained, make_batch, loss_fn, steps, warmup, device, bf16, peak):
    params = [p for m in trained for p in models[m].parameters()]
    for m in models.values():
        m.train(False)
    for m in trained:
        models[m].train()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    batch = make_batch()
    n = next(iter(batch.values())).shape[0]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(models, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(models, batch)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    for _ in range(warmup):
        step()
    t0 = sync(device)
    for _ in range(steps):
        step()
    dt = (sync(device) - t0) / steps
    row = {"bench": f"train_{name}", "batch": n, "step_s": dt, "images_per_s": n / dt,
           "tflops_per_step": flops / 1e12, "achieved_tflops": flops / dt / 1e12,
           "params_m": sum(p.numel() for p in params) / 1e6}
    if peak:
        row["mfu"] = flops / dt / (peak * 1e12)
    if device.type == "cuda":
        row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


@torch.no_grad()
def sample_bench(models, sem_hw, widths, resolution, n, steps_b, device, bf16, repeats):
    w_c, w_b = widths
    g = torch.Generator(device=device).manual_seed(0)
    text_c, text_b = torch.randn(n, 77, w_c, device=device), torch.randn(n, 77, w_b, device=device)
    unc_c = torch.randn(1, 77, w_c, device=device)  # Stage B samples without CFG (guidance 0)
    lat_hw = (resolution // 4,) * 2
    for m in models.values():
        m.eval()
    rows, times = [], {"stage_c": [], "stage_b": [], "stage_a": []}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for r in range(repeats + 1):  # the first round warms up (kernels, allocator)
            t = [sync(device)]
            z = sample_stage_c(models, text_c, unc_c, sem_size=sem_hw, steps=stage_c_timesteps(), guidance=4.0,
                               generator=g)
            t.append(sync(device))
            lat = sample_stage_b(models, z, text_b, latent_size=lat_hw, steps=steps_b, guidance=0.0, generator=g)
            t.append(sync(device))
            models["stage_a"].decode(lat)
            t.append(sync(device))
            if r:
                for k, a, b in zip(times, t, t[1:]):
                    times[k].append(b - a)
        # one network pass per stage (Stage C with its CFG pair, as one sampling step runs it)
        x_c = torch.randn(2 * n, 16, *sem_hw, device=device)
        r_c = torch.full((2 * n,), 0.5, device=device)
        x_b, r_b = torch.randn(n, 4, *lat_hw, device=device), torch.full((n,), 0.5, device=device)
        one = {
            "stage_c": lambda: models["stage_c"](x_c, r_c, torch.cat([text_c, unc_c.expand_as(text_c)])),
            "stage_b": lambda: models["stage_b"](x_b, r_b, z, text_b),
            "stage_a": lambda: models["stage_a"].decode(lat),
        }
        for k, fn in one.items():
            fn()
            t0 = sync(device)
            for _ in range(repeats):
                fn()
            one[k] = (sync(device) - t0) / repeats
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, steps in (("stage_c", 29), ("stage_b", steps_b), ("stage_a", 1)):
        rows.append({"bench": f"sample_{k}", "batch": n, "steps": steps, "seconds": med[k], "one_pass_s": one[k]})
    rows.append({"bench": "sample_total", "batch": n, "steps": 29 + steps_b, "seconds": sum(med.values()),
                 "images_per_s": n / sum(med.values())})
    return rows


def flops_per_image(preset: str, resolution: int) -> dict[str, float]:
    """Forward+backward FLOPs of one image, counted on the meta device by the preflight's builders
    (workflows/preflight_models.py), with this benchmark's text encoders."""
    return wuerstchen_flops(preset, resolution, *TEXT[preset])


def _jpegs(n: int, size: int, distinct: int = 16) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields + grain, quality 95), ``distinct`` of them cycled."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(distinct):
        f = rng.uniform(1, 6, size=(3, 2))
        img = np.stack([np.sin(f[c, 0] * 3 * xx + f[c, 1] * 2 * yy + rng.uniform(0, 6)) for c in range(3)], -1)
        img = (img * 100 + 128 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return [out[i % distinct] for i in range(n)]


def input_pipeline_bench(n: int, resolution: int, batch: int, step_ms: float, epochs: int = 2) -> list[dict]:
    """Stage B's input pipeline, decode in the step (before) vs in Ray Data (after); last epoch timed."""
    import ray
    import ray.data

    from workflows.wuerstchen.stages import _collate, decode_images, image_float

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    data = _jpegs(n, resolution)
    # Blocks of a few batches, as parquet files give (one block would decode in one task).
    ds = ray.data.from_items([{"row_id": i, "jpg": b} for i, b in enumerate(data)],
                             override_num_blocks=max(1, n // (4 * batch))).materialize()
    after = ds.map_batches(decode_images, fn_kwargs={"column": "jpg", "size": resolution}, batch_size=batch,
                           batch_format="numpy")
    rows = []
    for name, source, in_step in (("input_decode_in_step", ds, True), ("input_decode_in_ray_data", after, False)):
        for _ in range(epochs):  # the first epoch starts Ray Data's workers
            t0, seen = time.perf_counter(), 0
            for b in source.iter_batches(batch_size=batch, batch_format="numpy"):
                x = _collate(b, (), ("jpg", resolution))["image"] if in_step else image_float(_collate(b, ())["image"])
                if step_ms:
                    time.sleep(step_ms / 1000)
                seen += len(x)
            dt = time.perf_counter() - t0
        rows.append({"bench": name, "batch": batch, "resolution": resolution, "images": seen, "seconds": dt,
                     "step_ms": step_ms, "images_per_s": seen / dt, "cpus": os.cpu_count()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    p.add_argument("--resolution", type=int, default=64, help="image size (paper: 1024)")
    p.add_argument("--batch-b", type=int, default=8)
    p.add_argument("--batch-c", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed sampling rounds (median)")
    p.add_argument("--steps-b", type=int, default=12)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for MFU (H100 SXM 989); default 989 on GPU, none on CPU")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device and stop")
    p.add_argument("--mfu", type=float, default=0.4, help="--flops-only: the MFU to project images/s at")
    p.add_argument("--input-pipeline", action="store_true",
                   help="time Stage B's input pipeline only (decode in the step vs in Ray Data) and stop")
    p.add_argument("--input-images", type=int, default=256, help="--input-pipeline: images per epoch")
    p.add_argument("--input-resolution", type=int, default=512, help="--input-pipeline: JPEG side (paper: 1024)")
    p.add_argument("--step-ms", type=float, default=0.0, help="--input-pipeline: simulated step per batch (ms)")
    args = p.parse_args(argv)
    if args.input_pipeline:
        rows = input_pipeline_bench(args.input_images, args.input_resolution, args.batch_b, args.step_ms)
        print(f"Stage B input pipeline @ {args.input_resolution}px, batch {args.batch_b}, step {args.step_ms} ms, "
              f"{os.cpu_count()} CPUs")
        for x in rows:
            print(f"  {x['bench']:<28}{x['images']:>6} images{x['seconds']:>9.2f} s{x['images_per_s']:>9.1f} img/s")
        if not args.no_save:
            record("wuerstchen", {"preset": "input_pipeline", "rows": rows})
        return 0
    if args.flops_only:
        peak = args.peak_tflops or 989.0
        print(f"Würstchen {args.preset} @ {args.resolution}px: training FLOPs per image (fwd+bwd), "
              f"images/s at MFU {args.mfu} of {peak} TFLOP/s")
        for k, f in flops_per_image(args.preset, args.resolution).items():
            print(f"  {k:<22}{f / 1e9:>12.2f} GFLOP/image{args.mfu * peak * 1e12 / f:>14.1f} images/s")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = device.type == "cuda"
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    torch.manual_seed(0)
    models, sem_hw, (w_c, w_b) = build(args.preset, args.resolution, device, args.grad_checkpointing)
    r, lat = args.resolution, args.resolution // 4

    def batch_c():
        n = args.batch_c
        return {"latent_sem": torch.randn(n, 16, *sem_hw, device=device),
                "text_tokens": torch.randn(n, 77, w_c, device=device)}

    def batch_b():
        n = args.batch_b
        return {"latent_a": torch.randn(n, 4, lat, lat, device=device),
                "image_sem": torch.rand(n, 3, r, r, device=device) * 2 - 1,
                "text_tokens": torch.randn(n, 77, w_b, device=device)}

    rows = [train_bench("stage_c", models, ["stage_c"], batch_c, stage_c_loss, args.steps, args.warmup, device, bf16,
                        peak),
            train_bench("stage_b+compressor", models, ["stage_b", "compressor"], batch_b, stage_b_loss, args.steps,
                        args.warmup, device, bf16, peak)]
    rows += sample_bench(models, sem_hw, (w_c, w_b), r, args.sample_batch, args.steps_b, device, bf16, args.repeats)
    meta = {"preset": args.preset, "resolution": r, "sem_size": list(sem_hw), "precision": "bf16" if bf16 else "fp32",
            "peak_tflops": peak, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"Würstchen {args.preset} @ {r}px on {device_name()} ({meta['precision']}); semantic latent {sem_hw}")
    print(f"{'bench':<26}{'batch':>6}{'steps':>6}{'seconds':>10}{'img/s':>10}{'TFLOP/step':>12}{'MFU':>8}"
          f"{'1 pass s':>10}")
    def cell(x, key, width, fmt):
        return f"{format(x[key], fmt) if key in x else '-':>{width}}"

    for x in rows:
        sec = x.get("seconds", x.get("step_s"))
        print(f"{x['bench']:<26}{x['batch']:>6}{x.get('steps', 1):>6}{sec:>10.4f}" + cell(x, "images_per_s", 10, ".1f")
              + cell(x, "tflops_per_step", 12, ".4f") + cell(x, "mfu", 8, ".3f") + cell(x, "one_pass_s", 10, ".4f"))
    if not args.no_save:
        record("wuerstchen", {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
