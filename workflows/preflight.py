"""``full_pipeline.py --preflight``: fit every stage to the cluster and price it before any spend.

No Ray, no downloads, no weights: networks are built on the ``meta`` device (workflows/preflight_models.py).
For each stage of the table:

- the node type of ``run.cluster`` (a Ray cluster-launcher YAML: ``available_node_types``) that holds
  one unit of its request (a Ray Train worker, a Ray Data actor, a task): the cheapest that fits, and
  enough of them (``max_workers``) for all units at once;
- training stages: parameters (total / trainable), bytes per GPU for weights, gradients, optimizer
  state and EMA under the stage's ZeRO stage, plus activations; FLOPs per training image (counted);
  GPU-hours at ``MFU["train"]`` of the GPU's peak; cost from ``run.prices``;
- model actor stages (filter, recaption, encode, inversion): FLOPs per row and GPU-hours at ``MFU``;
- CPU data stages: core-hours and node-hours from the per-core rates in ``RATES``.

A request no node type holds, or a model that does not fit its GPU, ends the preflight with one line
naming the stage (exit 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from pipeline.stage import ActorPoolConfig, Stage
from workflows import preflight_models as pm
from workflows.report import resource_price
from workflows.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GPU: (memory GiB, dense bf16 TFLOP/s, fp32 TFLOP/s without tensor cores), from the vendors' datasheets.
GPUS = {"H100": (80, 989.0, 67.0), "H200": (141, 989.0, 67.0), "A100": (80, 312.0, 19.5),
        "A100-40G": (40, 312.0, 19.5), "L40S": (48, 362.0, 91.6), "A10G": (24, 125.0, 31.2), "L4": (24, 121.0, 30.3)}
# AWS instance type -> its GPU (Ray's launcher fills CPU/GPU counts from the same catalogue).
INSTANCES = {"p5.48xlarge": "H100", "p5e.48xlarge": "H200", "p4de.24xlarge": "A100", "p4d.24xlarge": "A100-40G",
             "g6e.2xlarge": "L40S", "g6e.12xlarge": "L40S", "g5.2xlarge": "A10G", "g5.12xlarge": "A10G",
             "g6.2xlarge": "L4"}
# Model FLOP utilisation assumed for the projections (replace by measurements, BENCHMARKS.md). Training:
# 0.4 is what bench_wuerstchen projects with; batched encoder forwards 0.3; LLaVA's greedy decoding is
# memory-bound (one token per forward), 0.05.
MFU = {"train": 0.40, "encode": 0.30, "generate": 0.05}
USABLE_GPU_MEMORY = 0.92  # CUDA context, NCCL buffers and allocator fragmentation take the rest
# CPU rows/s per core. download: img2dataset's published 1,300 images/s on one 16-core, 2 Gbps machine
# (shared/reference/ray.md); the demo's loopback figure (BENCHMARKS.md, 7 rows/s/core) is its process
# start-up. filter (decode, checks, dedup; CLIP on GPU) and shard: marginal rates of bench_data_prep.py
# (BENCHMARKS.md 2026-11-23, 208 -> 808 rows: 600 rows in 1.33 s and 5.02 s on 2 cores). urls: one parquet
# pass, not measured; 10,000 assumed.
RATES = {"urls": 10_000.0, "download": 1300 / 16, "filter": 600 / 1.33 / 2, "recaption": 600 / 1.33 / 2,
         "shard": 600 / 5.02 / 2}
# The data funnel where the config cannot say: LAION-2B-en-aesthetic's published row count when
# urls.limit is 0; share of URLs that still download (link rot; the demo's 99% is loopback); share the
# filter keeps (min side 512, CLIP >= 0.28, dedup on an already aesthetic-filtered source). Assumed.
SOURCE_ROWS = 52_698_424
DOWNLOAD_KEEP = 0.6
FILTER_KEEP = 0.5
LLAVA_PARAMS = 7.06e9  # llava-1.5-7b: Vicuna-7B 6.74B + CLIP ViT-L/14-336 0.30B + projector
LLAVA_TOKENS = 576 + 40  # image tokens at 336 px + the prompt; the generated tokens are added per config


class PreflightError(ValueError):
    """One line: the stage and why it cannot run on this cluster."""


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int
    gpu: str | None  # key of GPUS

    def holds(self, unit: dict[str, float]) -> int:
        """How many units of a request one node holds."""
        n = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in unit.items() if v > 0]
        return min(n) if n else 0

    def price(self, prices: dict[str, float], unit: dict[str, float] | None = None) -> float:
        """$/hour of the node, or of ``unit`` on it (resource-hours, as the report prices them)."""
        res = unit if unit is not None else self.resources
        return sum(v * resource_price(k, prices, self.gpu) for k, v in res.items())


def load_cluster(path: str) -> tuple[str, dict[str, NodeType]]:
    """Node types of a cluster-launcher YAML; the GPU from ``accelerator_type:<GPU>`` in ``resources``
    (Ray's own resource name) or from the AWS ``InstanceType``."""
    full = path if os.path.isabs(path) else os.path.join(REPO, path)
    try:
        with open(full) as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise PreflightError(f"run.cluster: cannot read {path} ({e.strerror})") from e
    head = spec.get("head_node_type")
    types = {}
    for name, t in (spec.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        gpu = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        gpu = gpu or INSTANCES.get((t.get("node_config") or {}).get("InstanceType", ""))
        if res.get("GPU", 0) > 0 and gpu not in GPUS:
            kind = gpu or "no accelerator_type / InstanceType"
            raise PreflightError(f"run.cluster: node type {name} has GPUs of an unknown kind ({kind}); "
                                 f"known: {', '.join(GPUS)}")
        types[name] = NodeType(name, res, 1 if name == head else int(t.get("max_workers", 0)), gpu)
    if not spec.get("available_node_types"):
        raise PreflightError(f"run.cluster: {path} has no available_node_types")
    return head or "", types


@dataclass
class Row:
    stage: str
    kind: str  # train | actors | tasks | driver
    node: str = ""
    units: int = 0  # workers / actors (0: as many tasks as fit)
    gpus: float = 0.0  # in all
    params: int = 0
    trainable: int = 0
    gib_per_gpu: dict[str, float] = field(default_factory=dict)
    gpu_gib: float = 0.0
    gflop_per_image: float = 0.0
    images: float = 0.0
    gpu_hours: float = 0.0
    node_hours: float = 0.0
    cost: float = 0.0
    note: str = ""


def request(stage: Stage, cfg: Any) -> tuple[str, dict[str, float], int]:
    """(kind, one unit's Ray resources, units) of a stage's config."""
    train = getattr(cfg, "train", None)
    if isinstance(train, TrainConfig):
        return "train", dict(train.worker_resources), train.world_size
    if isinstance(cfg, ActorPoolConfig):
        unit = {"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {"CPU": cfg.cpus_per_actor}
        return ("actors", unit, cfg.actors) if stage.uses_ray else ("driver", {"CPU": 1.0}, 1)
    if stage.uses_ray and hasattr(cfg, "cpus_per_task"):
        return "tasks", {"CPU": cfg.cpus_per_task}, 0
    return "driver", {}, 1


def place(stage: str, unit: dict[str, float], units: int, types: dict[str, NodeType], head: str,
          prices: dict[str, float]) -> NodeType:
    """The cheapest worker node type that holds one unit and, with max_workers nodes, all of them."""
    workers = [t for n, t in types.items() if n != head or len(types) == 1]  # one machine: the head works
    fits = [t for t in workers if t.holds(unit) >= 1]
    want = ", ".join(f"{k}: {v:g}" for k, v in unit.items())
    if not fits:
        have = "; ".join(f"{t.name} {{{', '.join(f'{k}: {v:g}' for k, v in t.resources.items())}}}"
                         for t in types.values())
        raise PreflightError(f"stages.{stage}: {{{want}}} per worker fits no node type of the cluster ({have})")
    best = min(fits, key=lambda t: (t.price(prices), sum(t.resources.values())))
    room = [t for t in sorted(fits, key=lambda t: (t.price(prices), sum(t.resources.values())))
            if t.holds(unit) * t.max_workers >= units]
    if not room:
        raise PreflightError(f"stages.{stage}: {units} x {{{want}}} need more than {best.name} holds "
                             f"({best.holds(unit)} per node x max_workers {best.max_workers})")
    return room[0]


def memory(fp: pm.Footprint, t: TrainConfig, bf16: bool) -> dict[str, float]:
    """GiB per GPU under the adapter's precision (torch.autocast: fp32 weights, grads and AdamW state;
    bf16 adds a cast copy of the weights) and ZeRO stage (ZeRO paper, Rajbhandari et al. 2020, Sec. 5:
    stage 1 shards optimizer state, 2 also gradients, 3 also parameters over the data-parallel ranks)."""
    n, z, gib = t.world_size, t.zero_stage, 2.0 ** 30
    frozen = fp.params - fp.trainable
    weights = 4 * (fp.trainable / (n if z >= 3 else 1) + frozen) + (2 * fp.params if bf16 else 0)
    grads = 4 * fp.trainable / (n if z >= 2 else 1)
    optim = 0.0 if t.offload else 8 * fp.trainable / (n if z >= 1 else 1)
    ema = 4 * fp.trainable if t.ema_decay > 0 else 0.0
    act = fp.activation_bytes * t.batch_size * (0.5 if bf16 else 1.0)
    return {k: v / gib for k, v in {"weights": weights, "grads": grads, "optimizer": optim, "ema": ema,
                                    "activations": act}.items()}


def footprint(name: str, cfg: Any, cfgs: dict[str, Any]) -> pm.Footprint:
    """The stage's networks, built as the stage builds them (inputs' configs read where it reads them)."""
    if name == "wuerstchen_stage_a":
        return pm.wuerstchen_stage_a(cfg)
    if name == "wuerstchen_stage_b":
        enc = cfgs["wuerstchen_encode_a"]
        return pm.wuerstchen_stage_b(cfg, cfgs["wuerstchen_stage_a"], enc.resolution, enc.text_encoder.width)
    if name == "wuerstchen_stage_c":
        sem = cfgs["wuerstchen_encode_semantic"]
        res = sem.resolution or cfgs["wuerstchen_encode_a"].resolution
        return pm.wuerstchen_stage_c(cfg, pm.semantic_size(cfgs["wuerstchen_stage_b"], res), sem.text_encoder.width)
    if name == "pagoda_teacher":
        return pm.pagoda_teacher(cfg)
    grows = []
    if name.startswith("pagoda_grow_"):
        res = cfgs["pagoda_teacher"].resolution * 2
        while res <= int(name.rsplit("_", 1)[1]):
            grows.append(cfgs[f"pagoda_grow_{res}"])
            res *= 2
    return pm.pagoda_generator(cfgs["pagoda_teacher"], cfgs["pagoda_distill"], grows)


def data_rows(cfgs: dict[str, Any]) -> dict[str, float]:
    """Rows into each data stage (the funnel above), and the training rows after the held-out split."""
    urls = cfgs["urls"].limit or (cfgs["urls"].n if cfgs["urls"].source == "demo" else SOURCE_ROWS)
    kept = urls * DOWNLOAD_KEEP * FILTER_KEEP
    return {"urls": urls, "download": urls, "filter": urls * DOWNLOAD_KEEP, "recaption": kept, "shard": kept,
            "train": kept * (1 - cfgs["shard"].heldout_fraction)}


def actor_flops(name: str, cfg: Any, cfgs: dict[str, Any]) -> tuple[float, str]:
    """Forward FLOPs per row of a model actor stage, and the MFU key it runs at."""
    if name == "filter":
        return pm.clip_params_flops(cfg.clip_model)[1], "encode"
    if name == "recaption":
        n = LLAVA_PARAMS if cfg.model != "tiny" else 1e6
        return 2 * n * (LLAVA_TOKENS + cfg.max_new_tokens), "generate"  # 2 N per token (Kaplan et al. 2020)
    if name == "wuerstchen_encode_a":
        return pm.encode_flops(cfgs["wuerstchen_stage_a"], None, cfg.resolution) + pm.text_flops(
            cfg.text_encoder.name), "encode"
    if name == "wuerstchen_encode_semantic":
        res = cfg.resolution or cfgs["wuerstchen_encode_a"].resolution
        return pm.encode_flops(None, cfgs["wuerstchen_stage_b"], res) + pm.text_flops(cfg.text_encoder.name), "encode"
    if name == "pagoda_invert":  # 2 (points - 1) teacher evaluations per latent, two latents (x, flip(x))
        return 4 * (cfg.points - 1) * pm.teacher_forward_flops(cfgs["pagoda_teacher"]) * cfg.fraction, "encode"
    return 0.0, "encode"


def plan_stage(st: Stage, cfgs: dict[str, Any], types: dict[str, NodeType], head: str,
               prices: dict[str, float], rows: dict[str, float], size_cpu_training: bool = True) -> Row:
    """One stage placed, sized and priced. ``size_cpu_training=False`` (the report) skips counting a
    training stage that trains on CPU (``use_gpu`` false or no GPU on its node): there is no GPU time to
    project, and measuring the demo's eight would add seconds to its report."""
    cfg = cfgs[st.name]
    kind, unit, units = request(st, cfg)
    row = Row(st.name, kind, units=units)
    if kind == "driver":
        row.node, row.note = f"{head} (driver)", "runs in the driver process"
        return row
    node = place(st.name, unit, max(units, 1), types, head, prices)
    row.node = node.name
    row.gpus = unit.get("GPU", 0.0) * units
    gpu = GPUS.get(node.gpu or "")
    if kind == "train":
        t: TrainConfig = cfg.train
        bf16 = t.bf16(on_gpu=gpu is not None and t.use_gpu)
        if (gpu is None or not t.use_gpu) and not size_cpu_training:
            row.note = "trains on CPU: not projected"
            return row
        fp = footprint(st.name, cfg, cfgs)
        row.params, row.trainable = fp.params, fp.trainable
        row.gib_per_gpu = memory(fp, t, bf16)
        row.gpu_gib = sum(row.gib_per_gpu.values())
        row.gflop_per_image = fp.flops / 1e9
        row.images = t.steps * t.global_batch
        if gpu is None:
            row.note = "no GPU: not projected"
            return row
        if row.gpu_gib > gpu[0] * USABLE_GPU_MEMORY:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row.gib_per_gpu.items())
            raise PreflightError(f"stages.{st.name}: needs {row.gpu_gib:.1f} GiB per GPU ({parts}; ZeRO-"
                                 f"{t.zero_stage}, {'bf16' if bf16 else 'fp32'}, batch {t.batch_size}) but "
                                 f"{node.gpu} on {node.name} has {gpu[0]} GiB ({USABLE_GPU_MEMORY:.0%} usable)")
        peak = (gpu[1] if bf16 else gpu[2]) * 1e12
        row.gpu_hours = row.images * fp.flops / (MFU["train"] * peak) / 3600
        row.node_hours = row.gpu_hours / max(unit.get("GPU", 1), 1e-9) / node.holds(unit)
        row.cost = row.gpu_hours / unit.get("GPU", 1) * node.price(prices, unit)
        row.note = f"{t.steps} steps x {t.global_batch}"
        return row
    n_rows = rows.get(st.name, rows["train"])
    row.images = n_rows
    if kind == "actors" and unit.get("GPU", 0) > 0 and gpu is not None:
        flops, mfu = actor_flops(st.name, cfg, cfgs)
        row.gflop_per_image = flops / 1e9
        row.gpu_hours = n_rows * flops / (MFU[mfu] * gpu[1] * 1e12) / 3600
        row.node_hours = row.gpu_hours / unit["GPU"] / node.holds(unit)
        row.cost = row.gpu_hours / unit["GPU"] * node.price(prices, unit)
        if st.name in RATES:  # the CPU side of the stage (decode, checks) on the same rows
            core_h = n_rows / RATES[st.name] / 3600
            row.cost += core_h * resource_price("CPU", prices)
        return row
    if st.name in RATES:
        core_h = n_rows / RATES[st.name] / 3600
        row.node_hours = core_h / max(node.resources.get("CPU", 1), 1)
        row.cost = core_h * resource_price("CPU", prices)
        row.note = f"{RATES[st.name]:.0f} rows/s/core"
    else:
        row.note = "small: not projected"
    return row


def preflight(stages: list[Stage], cfg: Any) -> dict[str, Any]:
    """Every stage placed, sized and priced; raises PreflightError (one line) at the first that cannot run."""
    head, types = load_cluster(cfg.run.cluster)
    cfgs = dict(cfg.stages)
    rows = data_rows(cfgs)
    out = [plan_stage(st, cfgs, types, head, cfg.run.prices, rows) for st in stages]
    total = {"gpu_hours": sum(r.gpu_hours for r in out), "node_hours": sum(r.node_hours for r in out),
             "cost": sum(r.cost for r in out)}
    return {"cluster": cfg.run.cluster, "mfu": MFU, "usable_gpu_memory": USABLE_GPU_MEMORY,
            "assumptions": {"source_rows": rows["urls"], "download_keep": DOWNLOAD_KEEP, "filter_keep": FILTER_KEEP,
                            "rows_per_s_per_core": RATES},
            "stages": [asdict(r) for r in out], "total": total}


def projection(stages: list[Stage], cfg: Any) -> dict[str, dict[str, Any]]:
    """What the preflight projects per stage for a run's config (the report sets it beside the actual):
    node type, its GPU kind and resources, GPU-hours, node-hours, cost. A stage that cannot be placed
    carries its one-line reason; an unreadable ``run.cluster`` raises PreflightError."""
    head, types = load_cluster(cfg.run.cluster)
    cfgs = dict(cfg.stages)
    rows = data_rows(cfgs)
    out: dict[str, dict[str, Any]] = {}
    for st in stages:
        try:
            r = plan_stage(st, cfgs, types, head, cfg.run.prices, rows, size_cpu_training=False)
        except PreflightError as e:
            out[st.name] = {"note": str(e)}
            continue
        node = types.get(r.node)
        out[st.name] = {"node": r.node, "gpu": node.gpu if node else None, "node_resources": node.resources if node
                        else {}, "gpu_hours": r.gpu_hours, "node_hours": r.node_hours, "cost": r.cost, "note": r.note}
    return out


def _num(x: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}"
    return f"{x:.3g}" if x else "-"


def _gib(x: float) -> str:
    return f"{x:.1f}" if x else "-"


def table(doc: dict[str, Any]) -> str:
    lines = [f"preflight on {doc['cluster']} (MFU train {doc['mfu']['train']}, encode {doc['mfu']['encode']}, "
             f"generate {doc['mfu']['generate']}; {doc['assumptions']['source_rows']:,} source rows)",
             f"{'stage':<27}{'node type':<21}{'units':>6}{'GPUs':>6}{'params':>8}{'train':>8}{'GiB/GPU':>9}"
             f"{'GFLOP/img':>11}{'images':>8}{'GPU-h':>9}{'node-h':>9}{'cost $':>10}"]
    for r in doc["stages"]:
        lines.append(f"{r['stage']:<27}{r['node']:<21}{r['units'] or 'tasks':>6}{r['gpus']:>6g}{_num(r['params']):>8}"
                     f"{_num(r['trainable']):>8}{_gib(r['gpu_gib']):>9}"
                     f"{_num(r['gflop_per_image']):>11}{_num(r['images']):>8}{_num(r['gpu_hours']):>9}"
                     f"{_num(r['node_hours']):>9}{_num(r['cost']):>10}")
    t = doc["total"]
    lines.append(f"{'total':<27}{'':<21}{'':>6}{'':>6}{'':>8}{'':>8}{'':>9}{'':>11}{'':>8}{_num(t['gpu_hours']):>9}"
                 f"{_num(t['node_hours']):>9}{_num(t['cost']):>10}")
    return "\n".join(lines)


def main(stages: list[Stage], cfg: Any, as_json: bool = False) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs (and warns of) every meta model it builds
    try:
        doc = preflight(stages, cfg)
    except PreflightError as e:
        print(f"error: preflight: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=1) if as_json else table(doc), flush=True)
    return 0
