"""Per-step cost of the training adapter against a bare ``deepspeed.initialize`` loop.

Same model (the synthetic denoiser), same micro-batch, same ZeRO stage, one process. Each
variant runs in its own subprocess so that peak memory is its own:

  bare         engine(x) / engine.backward / engine.step on a batch already on the device
  adapter      workflows.train.loop.run: numpy batch -> collate -> step fn -> backward_step,
               grad-norm and metric reduction every log_every steps, no EMA
  adapter+ema  the same with an EMA copy updated every step (the default)

Clocks are read at the start of step ``warmup`` and of step ``warmup + steps``, so a step
includes everything the loop does around the step function. On CPU the ratio uses process
CPU time (a shared machine's wall time measures the neighbours), on GPU wall time. Prints a
table and appends one JSON line to benchmarks/results.jsonl.

    python benchmarks/bench_train_adapter.py [--steps 200] [--channels 128] [--zero 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("bare", "adapter", "adapter+ema")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _one(variant: str, args: argparse.Namespace) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.store import Store
    from workflows.train import TrainConfig, engines, loop, synthetic
    from workflows.train.checkpoint import DirCheckpoints
    from workflows.train.distributed import import_deepspeed, process_group

    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    first, last = args.warmup, args.warmup + args.steps
    cfg = TrainConfig(num_workers=1, use_gpu=device.type == "cuda", zero_stage=args.zero, batch_size=args.batch,
                      lr=1e-3, total_steps=last + 1, log_every=10, ckpt_every=0, precision="fp32")
    rows = synthetic.rows_for_ids(np.arange(args.batch))
    marks: dict[int, tuple[float, float]] = {}

    def mark(i: int) -> None:
        """Clocks at the start of steps ``first`` and ``last``: ``args.steps`` whole steps between."""
        if i in (first, last):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[i] = (time.perf_counter(), time.process_time())

    if variant == "bare":
        with process_group(cfg, device):
            deepspeed = import_deepspeed()
            torch.manual_seed(0)
            model = synthetic.Denoiser(args.channels).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=engines.ds_config(cfg, False),
                                              dist_init_required=False)
            x = torch.from_numpy(rows["image"]).to(device)
            for i in range(last + 1):
                mark(i)
                den = engine(x + synthetic.SIGMA * torch.randn_like(x))
                loss = torch.nn.functional.mse_loss(den, x)
                engine.backward(loss)
                engine.step()
            params = sum(p.numel() for p in model.parameters())
    else:
        spec = synthetic.spec(channels=args.channels)
        if variant == "adapter":
            spec.ema_modules = ()
        inner = spec.step

        def step(ctx, batch, i):
            if ctx.micro == 0:
                mark(i)
            return inner(ctx, batch, i)

        def data(epoch, skip):
            while True:
                yield rows

        spec.step = step
        with tempfile.TemporaryDirectory() as tmp:
            out = Store(tmp).artifact("bench", variant.replace("+", "_"))
            s = loop.run(spec, cfg, out, checkpoints=DirCheckpoints(out), data=data, device=device)
        params = s["params"]["denoiser"]
    (w0, c0), (w1, c1) = marks[first], marks[last]
    return {"variant": variant, "wall_ms": (w1 - w0) / args.steps * 1e3, "cpu_ms": (c1 - c0) / args.steps * 1e3,
            "peak_mb": _peak_mb(device), "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_one(args.variant, args)))
        return

    child_args = [f"--{k}={getattr(args, k)}" for k in ("steps", "warmup", "batch", "channels", "zero", "threads")]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits all variants alike
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, f"--variant={variant}", *child_args],
                                  check=False, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # On a shared CPU, wall time mostly measures the neighbours: compare CPU time there (one torch
    # thread), wall time on a GPU. Best of the repeats = the least disturbed run.
    sys.path.insert(0, str(REPO))
    from benchmarks.results import device_name, record

    key = "wall_ms" if _cuda() else "cpu_ms"
    rows = [min(runs[v], key=lambda r: r[key]) for v in VARIANTS]
    bare = rows[0][key]
    device = device_name()
    print(f"device: {device}; ZeRO-{args.zero}, fp32, batch {args.batch}, {rows[0]['params']:,} params, "
          f"{args.steps} steps after {args.warmup} warm-up, best of {args.repeats}; ratio on {key}")
    print(f"{'variant':<12} {'cpu ms/step':>12} {'wall ms/step':>13} {'ratio':>7} {'overhead ms':>12} {'peak MB':>9}")
    for r in rows:
        print(f"{r['variant']:<12} {r['cpu_ms']:>12.2f} {r['wall_ms']:>13.2f} {r[key] / bare:>7.3f} "
              f"{r[key] - bare:>12.2f} {r['peak_mb']:>9.0f}")
    record("train_adapter", {
        "zero_stage": args.zero, "batch": args.batch, "params": rows[0]["params"], "steps": args.steps,
        "threads": args.threads, "repeats": args.repeats, "ratio_on": key,
        "results": {r["variant"]: {"cpu_ms": round(r["cpu_ms"], 3), "wall_ms": round(r["wall_ms"], 3),
                                   "ratio": round(r[key] / bare, 4), "peak_mb": round(r["peak_mb"], 1)}
                    for r in rows}})


if __name__ == "__main__":
    main()
