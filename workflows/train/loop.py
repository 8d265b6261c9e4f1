"""The per-worker training loop: plain PyTorch around one engine per optimizer group.

No Ray here: ``run()`` takes a data callable and a checkpoint store, so the whole loop runs
in-process in unit tests; ``ray_adapter.py`` supplies Ray Data shards and Ray Train
checkpoints. One *step* is one optimizer update of every group the step function touched:
``grad_accum`` micro-batches, each passed once to ``spec.step``. Data resume: ``data.py``;
what a checkpoint holds: ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import to_dict
from pipeline.store import Artifact
from workflows.train import checkpoint, export
from workflows.train.checkpoint import Checkpoints, State, seed_all
from workflows.train.config import TrainConfig
from workflows.train.data import DataFn, default_collate, step_stream, to_device
from workflows.train.distributed import control_group, gathered, process_group, rank_world, reduce_mean
from workflows.train.engines import Box, DeepSpeedGroup, TorchGroup
from workflows.train.spec import Group, TrainContext, TrainSpec

log = logging.getLogger("genmodels.train")

# Distinct row ids recorded per stage in trained_rows.json: an audit that no held-out row was
# trained on, bounded so that a billion-row run writes kilobytes, not gigabytes.
AUDIT_ROWS = 65_536


@torch.no_grad()
def _ema_update(ema: nn.Module, module: nn.Module, decay: float) -> None:
    with gathered(module):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in module.parameters()], 1.0 - decay)
        for e, b in zip(ema.buffers(), module.buffers()):
            e.copy_(b)


def _state_dict(module: nn.Module) -> dict[str, Tensor]:
    with gathered(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def _preview(spec: TrainSpec, models: dict[str, nn.Module], ema: dict[str, nn.Module], cfg: TrainConfig,
             device: torch.device, bf16: bool) -> Tensor:
    """Every rank samples (ZeRO-3 modules gather collectively); the same noise every time."""
    views = {n: ema.get(n, m) for n, m in models.items()}
    was_training = {n: m.training for n, m in views.items()}
    for m in views.values():
        m.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            images = spec.sample(views, cfg.preview_images, gen)
    finally:
        for n, m in views.items():
            m.train(was_training[n])
    return images.detach().float().clamp(-1, 1).cpu()


def run(spec: TrainSpec, cfg: TrainConfig, out: Artifact, *, checkpoints: Checkpoints,
        data: DataFn | None = None, extra_data: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Train to ``cfg.steps`` (resuming from the latest checkpoint), export into ``out``.

    ``data`` is a ``DataFn`` (None: ``spec.step`` gets ``batch=None``). Returns the summary
    that also goes to ``metrics.json``.
    """
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    with process_group(cfg, device):
        return _run(spec, cfg, out, checkpoints, data, extra_data or {}, model_config or {}, device)


def _build(spec: TrainSpec, cfg: TrainConfig, device: torch.device
           ) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, nn.Module], dict[str, Group]]:
    """Models (identical on every rank), module -> group, EMA copies, one engine per group."""
    seed_all(cfg.seed)
    models = spec.build_models(cfg)
    owner = {m: g for g, og in spec.optimizers.items() for m in og.modules}
    for g, og in spec.optimizers.items():
        for m in og.modules:
            if m not in models:
                raise KeyError(f"optimizer group {g!r} names module {m!r}; build_models made {sorted(models)}")
    if sum(len(og.modules) for og in spec.optimizers.values()) != len(owner):
        raise ValueError("a module belongs to more than one optimizer group")
    for name, m in models.items():
        m.to(device)
        if name not in owner:
            m.requires_grad_(False).eval()  # frozen helpers (text encoders, decoders)
        else:
            m.train()
    ema_names = tuple(owner) if spec.ema_modules is None else spec.ema_modules
    ema = {n: copy.deepcopy(models[n]).requires_grad_(False).eval() for n in ema_names}  # before ZeRO-3 partitions
    groups: dict[str, Group] = {}
    for g, og in spec.optimizers.items():
        box = Box({m: models[m] for m in og.modules})
        groups[g] = (DeepSpeedGroup(box, cfg, og, device.type == "cuda") if cfg.engine == "deepspeed"
                     else TorchGroup(box, cfg, og))
    return models, owner, ema, groups


def _run(spec: TrainSpec, cfg: TrainConfig, out: Artifact, checkpoints: Checkpoints,
         data: DataFn | None, extra_data: dict[str, Any], model_config: dict[str, Any],
         device: torch.device) -> dict[str, Any]:
    t_start = time.time()
    rank, world = rank_world()
    if world != cfg.world_size:
        raise RuntimeError(f"running on {world} workers but train.num_workers={cfg.num_workers}")
    bf16 = cfg.bf16(device.type == "cuda")

    models, owner, ema, groups = _build(spec, cfg, device)
    n_params = {n: sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for n, m in models.items()}

    st = State(replay=cfg.deterministic_data)
    with checkpoints.restore() as ckpt:
        if ckpt:
            checkpoint.load(ckpt, st, groups, ema, rank, cfg, device)
    start_step, start_images = st.step, st.images
    if start_step == 0:
        seed_all(cfg.seed * 1_000_003 + rank + 1)  # per-rank noise from here on
    mlog = export.MetricsLog(out, st.history, start_step) if rank == 0 else None
    ctx = TrainContext(cfg, models, ema, groups, device, extra_data)
    collate = spec.collate or default_collate
    stream = step_stream(data, cfg, st.epoch, st.skip, spec.id_column, control_group(), st.replay) if data else None
    total = cfg.steps
    if start_step:
        log.info("resumed at step %d (%d images, epoch %d) of %d", start_step, st.images, st.epoch, total)

    t_loop = time.perf_counter()
    win_t, win_steps, win_data = t_loop, 0, 0.0  # timing since the last log line
    audit: set[int] = set()
    # Closing the stream releases Ray Data's iterator while Ray is still up.
    with contextlib.closing(stream) if stream is not None else contextlib.nullcontext():
        while st.step < total:
            log_now = (st.step + 1) % cfg.log_every == 0 or st.step + 1 == total
            t0 = time.perf_counter()
            if stream is not None:
                epoch, micro = next(stream)
                if epoch != st.epoch:  # a new epoch starts from its beginning: replayable again
                    st.epoch, st.epoch_ids, st.replay = epoch, [], cfg.deterministic_data
            else:
                micro = [None] * cfg.grad_accum
            win_data += time.perf_counter() - t0
            ctx.step = st.step
            for grp in groups.values():
                grp.calls = 0
                grp.want_norm = log_now
            for i, mb in enumerate(micro):
                ctx.micro = i
                batch = None
                if mb is not None:
                    batch = {k: to_device(v, device) for k, v in collate(mb).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    scalars = spec.step(ctx, batch, st.step)
                for k, v in scalars.items():
                    v = v.detach().float() if isinstance(v, Tensor) else float(v)
                    st.log_sums[k] = st.log_sums.get(k, 0.0) + v / len(micro)
            for g, grp in groups.items():
                if grp.calls not in (0, cfg.grad_accum):
                    raise RuntimeError(f"group {g!r}: backward_step called {grp.calls} times in step {st.step}; "
                                       f"expected once per micro-batch ({cfg.grad_accum}) or not at all")
            for n, e in ema.items():
                _ema_update(e, models[n], cfg.ema_decay if st.step >= cfg.ema_start else 0.0)
            st.step += 1
            st.images += cfg.global_batch
            if micro[0] is not None:
                st.epoch_ids.append(np.concatenate([mb[spec.id_column] for mb in micro]))
                if len(audit) < AUDIT_ROWS:
                    audit.update(int(i) for i in st.epoch_ids[-1][: AUDIT_ROWS - len(audit)])
            win_steps += 1
            st.log_steps += 1

            if log_now:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                rec = {"step": st.step, "images": st.images, "epoch": st.epoch}
                rec.update(reduce_mean({k: v / st.log_steps for k, v in st.log_sums.items()}, device))
                for g, grp in groups.items():
                    rec[f"lr/{g}"] = grp.lr()
                    if grp.norm is not None:
                        rec[f"grad_norm/{g}"] = float(grp.norm)
                step_s = (now - win_t) / win_steps
                rec.update(step_s=step_s, data_s=win_data / win_steps, images_per_s=cfg.global_batch / step_s)
                if device.type == "cuda":
                    rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if mlog:
                    mlog.write(rec)
                win_t, win_steps, win_data = now, 0, 0.0
                st.log_sums, st.log_steps = {}, 0
            if spec.sample and cfg.preview_every and st.step % cfg.preview_every == 0 and st.step < total:
                images = _preview(spec, models, ema, cfg, device, bf16)
                if mlog:
                    mlog.preview(st.step, images)
            if (cfg.ckpt_every and st.step % cfg.ckpt_every == 0) or st.step == total:
                checkpoint.save(checkpoints, st, groups, ema, rank, cfg, model_config, device)
                if mlog:
                    mlog.sync()
    loop_s = time.perf_counter() - t_loop
    if start_step >= total:
        log.info("restored step %d >= total_steps %d: exporting only", st.step, total)

    # Export: gathers are collective, files come from rank 0.
    export_names = tuple(owner) if spec.export_modules is None else spec.export_modules
    raw = {n: _state_dict(models[n]) for n in export_names}
    ema_sd = {n: _state_dict(ema[n]) for n in export_names if n in ema}
    preview = _preview(spec, models, ema, cfg, device, bf16) if spec.sample else None
    trained = st.images - start_images
    summary = {
        "steps": st.step, "images": st.images, "epoch": st.epoch, "resumed_from_step": start_step,
        "final_loss": _last(st.history, "loss"), "wall_s": round(time.time() - t_start, 3),
        "train_s": round(loop_s, 3), "images_per_s": round(trained / loop_s, 3) if trained else None,
        "world_size": world, "engine": cfg.engine, "zero_stage": cfg.zero_stage,
        "precision": "bf16" if bf16 else "fp32", "params": n_params,
    }
    if device.type == "cuda":
        summary["gpu_max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    audits = [None] * world if world > 1 else [audit]
    if world > 1:
        dist.all_gather_object(audits, audit, group=control_group())  # CPU objects: gloo
    if rank == 0:
        if data is not None:
            ids = sorted(set().union(*audits))[:AUDIT_ROWS]
            out.write_json("trained_rows.json", {"row_ids": ids, "complete": len(ids) < AUDIT_ROWS,
                                                 "resumed_from_step": start_step})
        export.write(out, weights=raw, ema_weights=ema_sd, model_config=model_config, train_config=to_dict(cfg),
                     history=st.history, summary=summary, preview=preview)
        mlog.close()
    if world > 1:
        dist.barrier()
    return summary


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for rec in reversed(history):
        if key in rec:
            return rec[key]
    return None


