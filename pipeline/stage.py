"""A pipeline stage: declared once, as data, in its family's ``STAGES`` table.

A stage's inputs are named by role (``{"latents": "pagoda_invert"}``): the stage body reads
``inputs["latents"]`` and never an upstream stage's name, so a table can rewire a stage (a
third growth step, another encoder) without touching its code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.config import to_dict
from pipeline.store import Artifact

T = TypeVar("T")

# (inputs by role, this stage's config, output artifact) -> counts for the manifest
StageFn = Callable[[dict[str, Artifact], Any, Artifact], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    config: type
    # role -> upstream stage name; a plain sequence of names means role == name.
    inputs: Mapping[str, str] = field(default_factory=dict)
    # Bump when the code changes what the stage writes: old artifacts stop matching.
    version: int = 1
    uses_ray: bool = False
    # Resources the stage holds while running, for cost accounting: cfg -> {"CPU": n, "GPU": n}.
    resources: Callable[[Any], dict[str, float]] = field(default=lambda cfg: {"CPU": 1.0})
    # A context manager a downstream stage needs while it runs (e.g. the demo's HTTP server).
    service: Callable[[Artifact, Any], ContextManager[Any]] | None = None

    def __post_init__(self) -> None:
        roles = self.inputs if isinstance(self.inputs, Mapping) else {n: n for n in self.inputs}
        object.__setattr__(self, "inputs", dict(roles))

    @property
    def upstream(self) -> list[str]:
        """Names of the stages this one reads, in declaration order."""
        return list(dict.fromkeys(self.inputs.values()))


def cache_key(stage: Stage, cfg: Any, input_keys: dict[str, str]) -> str:
    """Hash of name, version, this stage's config section and its inputs' keys (by role).

    Changing one stage's config changes its key and, through ``input_keys``, every
    downstream key; upstream keys do not move, so upstream stays cached.
    """
    blob = json.dumps({"stage": stage.name, "version": stage.version, "config": to_dict(cfg),
                       "inputs": dict(sorted(input_keys.items()))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def no_service(art: Artifact, cfg: Any) -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ActorPoolConfig:
    """The one vocabulary of a stage that runs a model in a Ray Data actor pool.

    Configs of such stages inherit these fields, so every stage spells them the same way.
    """

    actors: int = 1
    cpus_per_actor: float = 0.5  # fractional: a pool of whole-CPU actors starves reads on 2 CPUs
    gpus_per_actor: float = 0.0
    batch_size: int = 16

    def validate_pool(self) -> None:
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError(f"{'actors' if self.actors < 1 else 'batch_size'}: must be >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError(f"{'cpus_per_actor' if self.cpus_per_actor < 0 else 'gpus_per_actor'}: must be >= 0")
        if self.cpus_per_actor == 0 and self.gpus_per_actor == 0:
            raise ValueError("cpus_per_actor: must be > 0 without GPUs")

    def validate(self) -> None:
        self.validate_pool()


def actor_resources(cfg: ActorPoolConfig) -> dict[str, float]:
    """Ray resources of one actor. GPU actors ask for no CPU, so the CPU slots of a GPU node stay
    free for the reads and transforms that feed them."""
    if cfg.gpus_per_actor > 0:
        return {"num_gpus": cfg.gpus_per_actor, "num_cpus": 0}
    return {"num_cpus": cfg.cpus_per_actor}


def pool_resources(cfg: ActorPoolConfig) -> dict[str, float]:
    """What the whole pool holds while the stage runs (``Stage.resources``, for cost accounting)."""
    if cfg.gpus_per_actor > 0:
        return {"GPU": cfg.gpus_per_actor * cfg.actors}
    return {"CPU": cfg.cpus_per_actor * cfg.actors}


def in_task(fn: Callable[..., T], *args: Any, num_cpus: float, num_gpus: float = 0, **options: Any) -> T:
    """``fn(*args)`` in one Ray task holding ``num_cpus`` / ``num_gpus`` when Ray is up, else here.

    The runner calls stages from threads of one driver (``run.parallel_stages``): work done there
    shares one interpreter with the other stage's and, in torch, the driver's threads. A task is a
    process of its own that Ray schedules like any other work (and gives one torch thread per CPU)."""
    return in_tasks(fn, [args], num_cpus=num_cpus, num_gpus=num_gpus, **options)[0]


def in_tasks(fn: Callable[..., T], calls: list[tuple], *, num_cpus: float, num_gpus: float = 0,
             progress: Callable[[int, int], None] | None = None, **options: Any) -> list[T]:
    """:func:`in_task` for every argument tuple of ``calls``, all submitted at once (Ray runs as
    many side by side as the resources allow); one after another here when Ray is not up.
    ``progress(done, total)`` is called as each call finishes. Results in the order of ``calls``."""
    import ray

    report = progress or (lambda done, total: None)
    if not ray.is_initialized():
        out = []
        for args in calls:
            out.append(fn(*args))
            report(len(out), len(calls))
        return out
    options = {"name": getattr(fn, "__name__", "stage"), **options}  # the task's name in Ray's dashboard
    remote = ray.remote(_logging).options(num_cpus=num_cpus, num_gpus=num_gpus, **options)
    refs = [remote.remote(fn, *args) for args in calls]
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # a failed call raises here, at once
        report(len(refs) - len(pending), len(refs))
    return ray.get(refs)


# The driver's log line (workflows/full_pipeline.py) and a task's: "HH:MM:SS message".
LOG_FORMAT = {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}


def _logging(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with the stage's progress lines (logger ``genmodels``, INFO) on stderr, which Ray
    forwards to the driver: a worker process starts at Python's default level, WARNING, and drops them."""
    log = logging.getLogger("genmodels")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT["format"], LOG_FORMAT["datefmt"]))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return fn(*args)
