"""The per-worker training loop: plain PyTorch around one DeepSpeed engine per optimizer group.

No Ray here: ``run()`` takes a data callable and a checkpoint store, so the whole loop runs
in-process in unit tests; ``ray_adapter.py`` supplies Ray Data shards and Ray Train
checkpoints. One *step* is one optimizer update of every group the step function touched:
``grad_accum`` micro-batches, each passed once to ``spec.step``.

Data resume. Every training row carries a stable id (``spec.id_column``). A checkpoint at
step N stores, per worker, the ids that worker consumed in the current epoch. On restore
the union of those ids is dropped from the rest of that epoch: the Ray adapter filters the
dataset and splits the remainder equally over the workers (``ray_adapter._remaining``), and
the loop drops them again from whatever arrives, so no row is trained on twice in an epoch
whatever order Ray Data delivers, however blocks are laid out, however many workers read.
Later epochs use Ray Train's own split. Rows trained on after the last checkpoint and
before a failure are trained on again, like the steps they belong to. An epoch ends for
all workers together when any worker cannot fill another step (a CPU all-reduce per step).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from workflows.config import to_dict
from workflows.store import Artifact
from workflows.train import export
from workflows.train.config import TrainConfig
from workflows.train.engines import Box, DeepSpeedGroup, Group, TorchGroup, import_deepspeed, rank_world

log = logging.getLogger("genmodels.train")

Batch = dict[str, np.ndarray]
# data(epoch, skip) -> this worker's numpy batches (any size) for one epoch. ``skip`` (ids already
# trained on in this epoch, or None) should be dropped before sharding so workers stay balanced;
# the loop drops them again, so a source that ignores it is still exact.
DataFn = Callable[[int, "np.ndarray | None"], Iterable[Batch]]


@dataclass(frozen=True)
class OptimGroup:
    """Modules updated by one optimizer (one DeepSpeed engine). Overrides default to TrainConfig."""

    modules: tuple[str, ...]
    lr_mult: float = 1.0
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


@dataclass
class TrainSpec:
    """What a model stage hands the adapter. All callables are plain PyTorch."""

    build_models: Callable[[TrainConfig], dict[str, nn.Module]]
    optimizers: dict[str, OptimGroup]
    # (ctx, micro-batch on device or None without data, step index) -> scalars to log.
    step: Callable[[TrainContext, dict[str, Any] | None, int], dict[str, float | Tensor]]
    # (modules with EMA weights where kept, n, generator) -> images in [-1, 1], NCHW.
    sample: Callable[[dict[str, nn.Module], int, torch.Generator], Tensor] | None = None
    ema_modules: tuple[str, ...] | None = None  # None: every module an optimizer owns
    export_modules: tuple[str, ...] | None = None  # None: every module an optimizer owns
    collate: Callable[[Batch], dict[str, Any]] | None = None  # default: numeric columns -> tensors
    id_column: str = "row_id"


class Checkpoints(Protocol):
    """Where checkpoints live: Ray Train storage, or a directory in the output artifact."""

    def restore(self) -> ContextManager[str | None]: ...

    def save(self, local_dir: str, step: int, metrics: dict[str, Any]) -> None: ...


class TrainContext:
    """What ``spec.step`` sees. ``models`` are the live modules; call them directly."""

    def __init__(self, cfg: TrainConfig, models: dict[str, nn.Module], ema: dict[str, nn.Module],
                 groups: dict[str, Group], device: torch.device, data: dict[str, Any]):
        self.cfg, self.models, self.ema, self.device, self.data = cfg, models, ema, device, data
        self.rank, self.world_size = rank_world()
        self.step = 0  # optimizer step being computed
        self.micro = 0  # micro-batch index within the step
        self._groups = groups

    def backward_step(self, group: str, loss: Tensor) -> None:
        """Backward ``loss`` into ``group``'s parameters; the optimizer steps on the last micro-batch.

        Call once per micro-batch per group. The loss must reach only this group's
        parameters: wrap losses that pass through another group's modules in ``trainable``.
        """
        if group not in self._groups:
            raise KeyError(f"backward_step: unknown optimizer group {group!r} (groups: {sorted(self._groups)})")
        with torch.autocast(self.device.type, enabled=False):
            self._groups[group].backward_step(loss)

    @contextlib.contextmanager
    def trainable(self, group: str) -> Iterator[None]:
        """Only ``group``'s parameters require grad inside (e.g. the generator loss of a GAN)."""
        frozen = [p for g, grp in self._groups.items() if g != group for p in grp.box.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)


# ----------------------------------------------------------------------------------------
# Process group, devices, RNG.



@contextlib.contextmanager
def _process_group(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """A one-process group for DeepSpeed when nobody (Ray Train, torchrun) made one."""
    if dist.is_initialized() or cfg.engine == "torch":
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the whole run: DeepSpeed reads LOCAL_RANK again in initialize()
    try:
        import_deepspeed().init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                             auto_mpi_discovery=False, verbose=False)
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed caches groups cloned from the world group; a later run in this process
        # (tests, notebooks) must not find the destroyed ones.
        groups = importlib.import_module("deepspeed.utils.groups")
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP"):
            if hasattr(groups, name):
                setattr(groups, name, None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------------------
# Data: re-batching, resume filtering, lock-step epochs.


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def drop_ids(batch: Batch, skip: np.ndarray, id_col: str) -> Batch:
    """The rows of ``batch`` whose id is not in ``skip`` (the batch itself when none is)."""
    keep = ~np.isin(batch[id_col], skip)
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def _drop_ids(batches: Iterable[Batch], skip: np.ndarray | None, id_col: str) -> Iterator[Batch]:
    for b in batches:
        if id_col not in b:
            raise KeyError(f"training data needs a stable id column {id_col!r} for exact resume "
                           f"(columns: {sorted(b)}); set TrainSpec.id_column")
        if skip is not None and len(skip):
            b = drop_ids(b, skip, id_col)
        if _rows(b):
            yield b


def _rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Exactly ``size`` rows per batch whatever the source delivers; a short tail is dropped."""
    buf: list[Batch] = []
    n = 0
    for b in batches:
        if not buf and _rows(b) == size:
            yield b
            continue
        buf.append(b)
        n += _rows(b)
        while n >= size:
            cat = buf[0] if len(buf) == 1 else {k: np.concatenate([x[k] for x in buf]) for k in buf[0]}
            yield {k: v[:size] for k, v in cat.items()}
            n -= size
            buf = [{k: v[size:] for k, v in cat.items()}] if n else []


def _control_group() -> Any:
    """CPU collectives for bookkeeping: a gloo group beside NCCL, so that agreeing on a flag
    never waits for the GPU stream (None: the default group is gloo already)."""
    if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
        return dist.new_group(backend="gloo")  # collective: every rank calls it at the same point
    return None


def _all(flag: bool, group: Any = None) -> bool:
    _, world = rank_world()
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _step_stream(data: DataFn, cfg: TrainConfig, epoch: int, skip: np.ndarray | None, id_col: str,
                 group: Any = None) -> Iterator[tuple[int, list[Batch]]]:
    """(epoch, grad_accum micro-batches) forever; ``skip`` ids are dropped from the first epoch."""
    while True:
        source = iter(data(epoch, skip))
        n = 0
        try:
            micro = _rebatch(_drop_ids(source, skip, id_col), cfg.batch_size)
            while True:
                step = list(itertools.islice(micro, cfg.grad_accum))
                if not _all(len(step) == cfg.grad_accum, group):
                    break
                n += 1
                yield epoch, step
        finally:
            close = getattr(source, "close", None)
            if close:  # an early stop must release Ray's split coordinator for the next epoch
                close()
        if n == 0 and skip is None:  # a resumed epoch may legitimately have no full step left
            raise RuntimeError(f"epoch {epoch} had no complete step: a step needs {cfg.global_batch} rows "
                               f"({cfg.batch_size} x {cfg.grad_accum} on each of {cfg.world_size} workers)")
        epoch, skip = epoch + 1, None


def _to(v: Any, device: torch.device) -> Any:
    if not isinstance(v, Tensor) or v.device == device:
        return v
    if device.type == "cuda" and v.device.type == "cpu":
        v = v.pin_memory()  # a copy from pageable memory would wait for the GPU stream
    return v.to(device, non_blocking=True)


def default_collate(batch: Batch) -> dict[str, Any]:
    """Numeric columns become tensors; others (captions, keys) stay numpy arrays."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if v.dtype.kind in "biuf":
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------
# EMA, gathering under ZeRO-3, previews.


def _gathered(module: nn.Module) -> ContextManager[Any]:
    """Full parameters of a ZeRO-3 partitioned module on every rank (a collective)."""
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_id"):
        return import_deepspeed().zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def _ema_update(ema: nn.Module, module: nn.Module, decay: float) -> None:
    with _gathered(module):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in module.parameters()], 1.0 - decay)
        for e, b in zip(ema.buffers(), module.buffers()):
            e.copy_(b)


def _state_dict(module: nn.Module) -> dict[str, Tensor]:
    with _gathered(module):
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


# ----------------------------------------------------------------------------------------
# The loop.


@dataclass
class _State:
    step: int = 0
    images: int = 0
    epoch: int = 0
    epoch_ids: list[np.ndarray] = field(default_factory=list)  # this worker's consumed ids, this epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    skip: np.ndarray | None = None  # ids consumed before the restored checkpoint (all workers)


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
    with _process_group(cfg, device):
        return _run(spec, cfg, out, checkpoints, data, extra_data or {}, model_config or {}, device)


def _build(spec: TrainSpec, cfg: TrainConfig, device: torch.device
           ) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, nn.Module], dict[str, Group]]:
    """Models (identical on every rank), module -> group, EMA copies, one engine per group."""
    _seed(cfg.seed)
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

    st = _State()
    with checkpoints.restore() as ckpt:
        if ckpt:
            _load(ckpt, st, groups, ema, rank)
    start_step, start_images = st.step, st.images
    if start_step == 0:
        _seed(cfg.seed * 1_000_003 + rank + 1)  # per-rank noise from here on
    mlog = export.MetricsLog(out, st.history, start_step) if rank == 0 else None
    ctx = TrainContext(cfg, models, ema, groups, device, extra_data)
    collate = spec.collate or default_collate
    stream = _step_stream(data, cfg, st.epoch, st.skip, spec.id_column, _control_group()) if data else None
    total = cfg.steps
    if start_step:
        log.info("resumed at step %d (%d images, epoch %d) of %d", start_step, st.images, st.epoch, total)

    t_loop = time.perf_counter()
    win_t, win_steps, win_data = t_loop, 0, 0.0
    sums: dict[str, Any] = {}
    # Closing the stream releases Ray Data's iterator while Ray is still up.
    with contextlib.closing(stream) if stream is not None else contextlib.nullcontext():
        while st.step < total:
            log_now = (st.step + 1) % cfg.log_every == 0 or st.step + 1 == total
            t0 = time.perf_counter()
            if stream is not None:
                epoch, micro = next(stream)
                if epoch != st.epoch:
                    st.epoch, st.epoch_ids = epoch, []
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
                    batch = {k: _to(v, device) for k, v in collate(mb).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    scalars = spec.step(ctx, batch, st.step)
                for k, v in scalars.items():
                    v = v.detach().float() if isinstance(v, Tensor) else float(v)
                    sums[k] = sums.get(k, 0.0) + v / len(micro)
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
            win_steps += 1

            if log_now:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                rec = {"step": st.step, "images": st.images, "epoch": st.epoch}
                rec.update(_reduce_mean({k: v / win_steps for k, v in sums.items()}, device))
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
                win_t, win_steps, win_data, sums = now, 0, 0.0, {}
            if spec.sample and cfg.preview_every and st.step % cfg.preview_every == 0 and st.step < total:
                images = _preview(spec, models, ema, cfg, device, bf16)
                if mlog:
                    mlog.preview(st.step, images)
            if (cfg.ckpt_every and st.step % cfg.ckpt_every == 0) or st.step == total:
                _save(checkpoints, st, groups, ema, rank, cfg, model_config)
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
    if rank == 0:
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


def _reduce_mean(values: dict[str, Any], device: torch.device) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device) for k in keys])
    _, world = rank_world()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return dict(zip(keys, t.tolist()))


def _save(checkpoints: Checkpoints, st: _State, groups: dict[str, Group], ema: dict[str, nn.Module], rank: int,
          cfg: TrainConfig, model_config: dict[str, Any]) -> None:
    """Every rank writes its part into its own local directory; Ray merges them in storage."""
    tmp = tempfile.mkdtemp(prefix="ckpt-")
    try:
        for g, grp in groups.items():
            grp.save(os.path.join(tmp, "engines", g), rank)
        os.makedirs(os.path.join(tmp, "workers"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "workers", f"rng_{rank}.pt"))
        ids = np.concatenate(st.epoch_ids) if st.epoch_ids else np.zeros(0, dtype=np.int64)
        if ids.dtype == object:  # string keys from Arrow: fixed-width unicode saves without pickle
            ids = ids.astype(str)
        np.save(os.path.join(tmp, "workers", f"ids_{rank}.npy"), ids, allow_pickle=False)
        meta = {"step": st.step, "images": st.images, "epoch": st.epoch}
        if rank == 0:
            torch.save({n: e.state_dict() for n, e in ema.items()}, os.path.join(tmp, "ema.pt"))
            with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in st.history)
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({**meta, "world_size": cfg.world_size, "train_config": to_dict(cfg),
                           "model_config": model_config}, f, indent=2, default=str)
        last = st.history[-1] if st.history else {}
        checkpoints.save(tmp, st.step, {**meta, **{k: v for k, v in last.items() if k.startswith("loss")}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: str, st: _State, groups: dict[str, Group], ema: dict[str, nn.Module], rank: int) -> None:
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    for g, grp in groups.items():
        grp.load(os.path.join(path, "engines", g))
    saved_ema = torch.load(os.path.join(path, "ema.pt"), map_location="cpu", weights_only=True)
    for n, e in ema.items():
        e.load_state_dict(saved_ema[n])
    rng = os.path.join(path, "workers", f"rng_{rank}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))  # our own file: numpy/python RNG tuples
    else:  # a different worker count: fresh, but deterministic, noise
        _seed(state["step"] * 7919 + rank + 1)
    workers = os.path.join(path, "workers")
    ids = [np.load(os.path.join(workers, f), allow_pickle=False) for f in sorted(os.listdir(workers))
           if f.startswith("ids_")]
    st.step, st.images, st.epoch = state["step"], state["images"], state["epoch"]
    st.skip = np.unique(np.concatenate(ids)) if ids else None
    st.epoch_ids = [st.skip] if st.skip is not None and rank == 0 else []  # carried into the next checkpoint once
    with open(os.path.join(path, "metrics.jsonl")) as f:
        st.history = [json.loads(line) for line in f if line.strip()]
