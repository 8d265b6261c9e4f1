"""PaGoDA's cost claim in miniature: quality per training compute at a fixed image budget.

Arm "pagoda": an EDM teacher at the base resolution B, DDIM inversion of the training
images, a one-step generator distilled at B, grown 2× to R = 2B (PaGoDA §3, Alg. 1–3).
Arm "direct": the same EDM U-Net trained directly at R, sampled with Heun (EDM Alg. 1).
Both arms see the same number of training images. Compute is counted in FLOPs with
``torch.utils.flop_counter`` (forward + backward of one step, times the steps) plus the
inversion; quality is the sliced Wasserstein distance to held-out real images at R.

    python benchmarks/bench_pagoda_cost.py --budget 4000 --base 16

Prints a table and appends one JSON line to benchmarks/results.jsonl. Tiny models on a CPU
say little about ImageNet; the point is that the harness measures the claim the same way
at any scale (pass --channels/--budget for bigger runs on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results import device_name, record  # noqa: E402
from data_prep import demo  # noqa: E402
from genmodels.metrics import swd  # noqa: E402
from genmodels.pagoda import (  # noqa: E402
    EDMConfig,
    EDMPrecond,
    Generator,
    PagodaConfig,
    ProjectedDiscriminator,
    TinyFeatures,
    UNet,
    UNetConfig,
    discriminator_loss,
    edm_loss,
    generator_loss,
    grow_2x,
    ode_invert,
    ode_sample,
)


def load_images(n: int, size: int, seed: int) -> torch.Tensor:
    items = demo.generate(n, seed, min_size=max(64, size), max_size=128)
    out = []
    for it in items:
        im = Image.open(io.BytesIO(it.data)).convert("RGB")
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
        out.append(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def batches(x: torch.Tensor, bs: int, g: torch.Generator):
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            yield perm[i:i + bs]


def train_teacher(x: torch.Tensor, res: int, images: int, bs: int, ch: int, lr: float, seed: int):
    torch.manual_seed(seed)
    attn = (res // 2,) if res >= 16 else ()
    net = EDMPrecond(UNet(UNetConfig(img_resolution=res, model_channels=ch, attn_resolutions=attn)))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    data = F.interpolate(x, size=(res, res), mode="area") if x.shape[-1] != res else x
    it = batches(data, bs, g)

    def step():
        loss = edm_loss(net, data[next(it)], EDMConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step_flops = flops_of(step)
    steps = max(1, images // bs)
    for _ in range(steps - 1):
        step()
    return net.eval(), step_flops * steps


def gan_phase(gen, data, lat, cfg: PagodaConfig, images: int, bs: int, seed: int):
    disc = ProjectedDiscriminator.tiny()
    feats = TinyFeatures(size=32)
    models = {"generator": gen, "discriminator": disc, "perceptual": feats}
    opt_g = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=cfg.lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=cfg.lr_d, betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(seed)
    it = batches(data, bs, g)
    state = {"step": 0}

    def step():
        idx = next(it)
        batch = {"image": data[idx], "latent": lat[idx]}
        loss, _ = generator_loss(models, batch, cfg, state["step"])
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        d_loss, _ = discriminator_loss(models, batch, cfg)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        state["step"] += 1

    step_flops = flops_of(step)
    steps = max(1, images // bs)
    for _ in range(steps - 1):
        step()
    return gen.eval(), step_flops * steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=4000, help="training images per arm")
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--heun-points", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    B, R = a.base, 2 * a.base
    x = load_images(a.n_train + a.n_eval, R, a.seed)
    train, real = x[:a.n_train], x[a.n_train:]
    t0 = time.time()

    # PaGoDA: half the budget on the teacher at B, a quarter each on distillation and growth.
    teacher, f_teacher = train_teacher(train, B, a.budget // 2, a.batch, a.channels, 2e-3, a.seed)
    x_b = F.interpolate(train, size=(B, B), mode="area")
    f_inv = flops_of(lambda: ode_invert(teacher, x_b[:1], num_points=40)) * len(x_b)
    lat = ode_invert(teacher, x_b, num_points=40)
    gen = Generator.from_teacher(teacher)
    cfg_b = PagodaConfig(resolution=B, lr_g=2e-4, lr_d=1e-3)
    gen, f_distill = gan_phase(gen, x_b, lat, cfg_b, a.budget // 4, a.batch, a.seed)
    grown = grow_2x(copy.deepcopy(gen))
    cfg_r = PagodaConfig(resolution=R, w_adv=1.0, lr_g=2e-4, lr_d=1e-3)
    grown, f_grow = gan_phase(grown, train, lat, cfg_r, a.budget // 4, a.batch, a.seed + 1)
    t_pagoda = time.time() - t0
    g = torch.Generator().manual_seed(a.seed + 7)
    z = torch.randn(a.n_eval, 3, B, B, generator=g) * 80.0
    with torch.no_grad():
        t = time.time()
        fake_p = grown(z).clamp(-1, 1)
        lat_p = time.time() - t
        init = grow_2x(Generator.from_teacher(copy.deepcopy(teacher))).eval()
        fake_init = init(z).clamp(-1, 1)

    # Direct: the whole budget on a teacher at R, sampled with Heun.
    t0 = time.time()
    direct, f_direct = train_teacher(train, R, a.budget, a.batch, a.channels, 2e-3, a.seed)
    t_direct = time.time() - t0
    zr = torch.randn(a.n_eval, 3, R, R, generator=g) * 80.0
    with torch.no_grad():
        t = time.time()
        fake_d = ode_sample(direct, zr, num_points=a.heun_points).clamp(-1, 1)
        lat_d = time.time() - t

    gen_s = torch.Generator().manual_seed(0)
    swd_p = swd(fake_p, real, generator=gen_s)[1]
    swd_d = swd(fake_d, real, generator=torch.Generator().manual_seed(0))[1]
    swd_i = swd(fake_init, real, generator=torch.Generator().manual_seed(0))[1]
    f_pagoda = f_teacher + f_inv + f_distill + f_grow
    rows = [
        ("pagoda (B→R)", f_pagoda / 1e12, t_pagoda, swd_p, lat_p / a.n_eval * 1e3, 1),
        ("direct at R", f_direct / 1e12, t_direct, swd_d, lat_d / a.n_eval * 1e3, 2 * a.heun_points - 1),
        ("grown G at init", float("nan"), 0.0, swd_i, float("nan"), 1),
    ]
    print(f"\nPaGoDA cost claim in miniature: base {B} → {R}, {a.budget} training images per arm, "
          f"device {device_name()}")
    print(f"{'arm':<18}{'train TFLOP':>12}{'train s':>9}{'SWD×1e3':>9}{'ms/img':>8}{'NFE':>5}")
    for name, tf, ts, s, ms, nfe in rows:
        print(f"{name:<18}{tf:>12.3f}{ts:>9.1f}{s:>9.2f}{ms:>8.2f}{nfe:>5}")
    print(f"compute ratio direct/pagoda: {f_direct / f_pagoda:.2f}×; "
          f"(teacher {f_teacher / 1e12:.3f}, inversion {f_inv / 1e12:.3f}, distill {f_distill / 1e12:.3f}, "
          f"grow {f_grow / 1e12:.3f} TFLOP)")
    record("pagoda_cost", {"base": B, "target": R, "budget_images": a.budget, "channels": a.channels,
                           "tflop_pagoda": f_pagoda / 1e12, "tflop_direct": f_direct / 1e12,
                           "tflop_breakdown": {"teacher": f_teacher / 1e12, "inversion": f_inv / 1e12,
                                               "distill": f_distill / 1e12, "grow": f_grow / 1e12},
                           "swd_pagoda": swd_p, "swd_direct": swd_d, "swd_grown_init": swd_i,
                           "train_s_pagoda": t_pagoda, "train_s_direct": t_direct,
                           "ms_per_image_pagoda": lat_p / a.n_eval * 1e3,
                           "ms_per_image_direct": lat_d / a.n_eval * 1e3})


if __name__ == "__main__":
    main()
