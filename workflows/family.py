"""The face every model family shows the pipeline, so that ``evaluate`` and the report never
branch on a family's name.

A family package (``workflows/wuerstchen``, ``workflows/pagoda``) exports:

- ``STAGES``: its rows of the stage table, inputs named by role;
- ``GENERATORS``: {model name: {role: stage name}}, the trained artifacts each of its
  samplers needs (e.g. ``{"pagoda_64": {"generator": "pagoda_grow_64"}}``), derived from
  ``STAGES`` so that a new stage row adds its model everywhere;
- ``load_generator(artifacts, initial=False) -> Generator``: ``artifacts`` keyed by those roles;
  ``initial`` gives the model as its stage built it before training (the floor evaluation shows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Generator:
    """A trained text-to-image sampler.

    ``sample(prompts, seed)`` returns one image per prompt, float (N, 3, R, R) in [-1, 1] on the
    CPU, deterministic for a seed; ``nfe`` is its network evaluations per image.
    """

    name: str
    resolution: int
    sample: Callable[[list[str], int], torch.Tensor]
    nfe: int = 1
