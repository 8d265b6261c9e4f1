"""A pipeline stage: declared once, as data, next to the table of contents in full_pipeline.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from workflows.config import to_dict
from workflows.store import Artifact

# (inputs by stage name, this stage's config, output artifact) -> counts for the manifest
StageFn = Callable[[dict[str, Artifact], Any, Artifact], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    config: type
    inputs: tuple[str, ...] = ()
    # Bump when the code changes what the stage writes: old artifacts stop matching.
    version: int = 1
    uses_ray: bool = False
    # Resources the stage holds while running, for cost accounting: cfg -> {"CPU": n, "GPU": n}.
    resources: Callable[[Any], dict[str, float]] = field(default=lambda cfg: {"CPU": 1.0})
    # A context manager a downstream stage needs while it runs (e.g. the demo's HTTP server).
    service: Callable[[Artifact, Any], ContextManager[Any]] | None = None


def cache_key(stage: Stage, cfg: Any, input_keys: dict[str, str]) -> str:
    """Hash of name, version, this stage's config section and its inputs' keys.

    Changing one stage's config changes its key and, through ``input_keys``, every
    downstream key; upstream keys do not move, so upstream stays cached.
    """
    blob = json.dumps({"stage": stage.name, "version": stage.version, "config": to_dict(cfg),
                       "inputs": dict(sorted(input_keys.items()))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def no_service(art: Artifact, cfg: Any) -> ContextManager[None]:
    return contextlib.nullcontext()
