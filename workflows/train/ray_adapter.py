"""Ray Train glue: ``fit()`` runs ``loop.run`` on every worker of a TorchTrainer.

Storage is the output artifact itself (``{out}/ray_train/``, local or S3), so resuming is
re-running the same command: a TorchTrainer built again with the same RunConfig name and
storage path finds its checkpoint snapshot there and ``ray.train.get_checkpoint()`` returns
the latest checkpoint (Train V2 has no ``resume_from_checkpoint``). ``max_failures``
restarts the worker group from the same place within one run.

Exact resume needs the same rows in the same order on every worker in every run: the train
dataset is ingested with ``preserve_order`` (``cfg.deterministic_data``), which also makes
Ray Data's split over the workers deterministic (it then ignores locality), and the local
shuffle buffer is seeded per epoch and worker. A resumed worker reads its epoch again and the
loop drops the rows it already trained on (``data.py``). A dataset materialized before ``fit``
keeps the block order of its materialization: materialize it with ``preserve_order`` as well,
or a rerun of the command (which materializes again) may read another order (the loop warns).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from pipeline.stage import in_task
from pipeline.store import Artifact
from workflows.train import loop
from workflows.train.checkpoint import DirCheckpoints
from workflows.train.config import TrainConfig
from workflows.train.data import drop_ids
from workflows.train.spec import TrainSpec

log = logging.getLogger("genmodels.train")

RUN_NAME = "ray_train"  # {out}/ray_train/: Ray Train's run directory inside the artifact


class RayCheckpoints:
    """Every rank reports its own part of a checkpoint; Ray merges them in storage."""

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield path

    def save(self, local_dir: str, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def _ingest_options(cfg: TrainConfig) -> Any:
    """Ray Data options for reading the ``train`` dataset: this process's (Ray Train's default),
    in a reproducible order when ``cfg.deterministic_data``."""
    import ray.data

    opts = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    opts.preserve_order = opts.preserve_order or cfg.deterministic_data
    return opts


def _local_shard(ds: Any, cfg: TrainConfig) -> Any:
    """Local mode hands the worker the dataset itself: read it with a worker's options (one worker's
    split is the whole dataset, in the same order) on a copy, so that the caller's keeps its own."""
    import ray.data

    ds = ray.data.Dataset.copy(ds, _deep_copy=True)  # with a copy of its DataContext
    ds.context.execution_options = _ingest_options(cfg)
    return ds


def _remaining(ds: Any, skip: Any, id_col: str, rank: int, world: int) -> Any:
    """A resumed epoch that cannot be replayed (another worker count, ``deterministic_data=False``):
    the rows of ``ds`` not yet trained on, split equally over the workers.

    Ray Train's own split cannot be filtered per epoch, and filtering each worker's shard
    afterwards would leave workers unbalanced (one may have consumed its whole shard), so
    rank 0 splits the remainder once and hands the iterators out (a collective).
    """
    ds = ds() if callable(ds) else ds  # Ray Train accepts dataset factories too
    rest = ds.map_batches(drop_ids, fn_kwargs={"skip": skip, "id_col": id_col}, batch_format="numpy")
    if world == 1:
        return rest
    box = [rest.streaming_split(world, equal=True) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0][rank]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    cfg: TrainConfig = config["cfg"]
    out: Artifact = config["out"]
    local = cfg.num_workers == 0
    rank = ray.train.get_context().get_world_rank()
    shards = {name: ray.train.get_dataset_shard(name) for name in config["dataset_names"]}
    train = shards.pop("train", None)
    if local and train is not None:
        train = _local_shard(train, cfg)

    def data(epoch: int, skip):
        source = train if skip is None else _remaining(config["train_dataset"], skip, spec.id_column, rank,
                                                      cfg.world_size)
        shuffle = {}
        if cfg.shuffle_buffer:
            shuffle = {"local_shuffle_buffer_size": cfg.shuffle_buffer,
                       "local_shuffle_seed": cfg.seed + 1000 * epoch + rank}
        return source.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", **shuffle)

    device = _device(cfg, local)
    checkpoints = DirCheckpoints(out, cfg.ckpt_keep, RUN_NAME) if local else RayCheckpoints()
    nodes = [ray.get_runtime_context().get_node_id()] * cfg.world_size
    if cfg.world_size > 1:  # Ray Train has set up the default (gloo or NCCL) group for the workers
        dist.all_gather_object(nodes, nodes[0])
    summary = loop.run(spec, cfg, out, checkpoints=checkpoints, data=data if train is not None else None,
                       extra_data=shards, model_config=config["model_config"], device=device)
    return summary if summary is None else {**summary, "nodes": len(set(nodes))}


def _device(cfg: TrainConfig, local: bool) -> torch.device:
    """This worker's device: its GPU when the stage asked for GPUs and CUDA works here, else the CPU.

    A node may declare a ``GPU`` resource that CUDA cannot see (a misdeclared node, a CPU-only test
    cluster): the worker then trains on the CPU and says so, instead of failing in its first CUDA
    call. With several workers the group's backend decides for all (``_torch_config``: gloo when any
    worker lacks CUDA), so that no worker puts CUDA tensors into a CPU group.
    """
    cpu = torch.device("cpu")
    if not cfg.use_gpu:
        return cpu
    if not torch.cuda.is_available():
        import ray

        log.warning("train: use_gpu is set and Ray gave this worker GPU %s, but torch.cuda.is_available() "
                    "is False: training on the CPU", "-" if local else ray.get_gpu_ids())
        return cpu
    if not local and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        log.warning("train: GPUs requested and this worker sees CUDA, but another worker does not "
                    "(process group on gloo): training on the CPU")
        return cpu
    if local:
        return torch.device("cuda", 0)
    import ray.train.torch

    return ray.train.torch.get_device()


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _torch_config() -> Any:
    """Ray Train's TorchConfig with the backend chosen on the workers themselves: NCCL when GPUs are
    requested and every worker sees CUDA, gloo otherwise. Ray's own rule
    (``_TorchBackend.on_start`` in ray/train/torch/config.py) picks NCCL from the request alone,
    and ProcessGroupNCCL fails ("no GPUs found") on a node whose declared GPU CUDA cannot see."""
    import dataclasses

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _Backend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            # Ray Train has filled in "nccl" from the GPU request by now (None on older versions).
            if backend_config.backend in (None, "nccl") and worker_group.get_resources_per_worker().get("GPU", 0) > 0:
                cuda = worker_group.execute(_cuda_available)
                if not all(cuda):
                    log.warning("train: GPUs requested but %d of %d workers see no CUDA device: gloo process "
                                "group, training on the CPU", cuda.count(False), len(cuda))
                    backend_config = dataclasses.replace(backend_config, backend="gloo")
            super().on_start(worker_group, backend_config)

    class _TorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return _TorchConfig()


def train_resources(stage_cfg: Any) -> dict[str, float]:
    """What a training stage holds (``Stage.resources``): all of its Ray Train workers."""
    t = stage_cfg.train
    return {k: v * t.world_size for k, v in t.worker_resources.items()}


def fit(spec: TrainSpec, cfg: TrainConfig, out: Artifact, datasets: dict[str, Any] | None = None,
        model_cfg_json: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``spec`` on ``datasets["train"]`` (others reach ``ctx.data``) and export into ``out``.

    Returns the counts for the stage manifest (steps, images, final_loss, wall_s, images_per_s, ...).
    """
    datasets = dict(datasets or {})
    if datasets and "train" not in datasets:
        raise ValueError(f"datasets: expected a 'train' entry, got {sorted(datasets)}")
    if cfg.num_workers == 0:
        # Local mode trains in the calling process: with Ray up, make that a task holding one worker's
        # resources. In the driver, two stages' threads share one interpreter (3.6x slower, measured); a
        # one-worker group starts 7 actor processes one after another (controller, placement-group
        # cleaner, synchroniser, worker, dataset manager, split coordinator, preemption watcher). On 2
        # cores, Stage A for 20 steps: 15-18 s in a task against 31-32 s, the same final loss to the digit.
        res = cfg.worker_resources
        return in_task(_fit, spec, cfg, out, datasets, model_cfg_json, num_cpus=res.get("CPU", 0),
                       num_gpus=res.get("GPU", 0), name="local_fit", max_retries=0)
    return _fit(spec, cfg, out, datasets, model_cfg_json)


def _fit(spec: TrainSpec, cfg: TrainConfig, out: Artifact, datasets: dict[str, Any],
         model_cfg_json: dict[str, Any] | None) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    run_config = ray.train.RunConfig(
        name=RUN_NAME, storage_path=out.path, storage_filesystem=out.fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ckpt_keep))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "cfg": cfg, "out": out, "model_config": model_cfg_json or {},
                           "dataset_names": sorted(datasets), "train_dataset": datasets.get("train")},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=cfg.worker_resources,
                                               placement_strategy=cfg.placement_strategy),
        torch_config=_torch_config(), run_config=run_config, datasets=datasets or None,
        dataset_config=ray.train.DataConfig(execution_options={"train": _ingest_options(cfg)}))
    result = trainer.fit()
    summary = result.return_value
    if summary is None:  # rank 0 always returns the summary; read it back if Ray lost it
        summary = out.read_json("metrics.json")
    return summary

