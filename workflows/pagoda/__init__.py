"""PaGoDA (arXiv 2405.14822): a low-resolution teacher, its PF-ODE inversion, a one-step generator
distilled from the pairs, then grown 2x at a time. The family's rows of the stage table:

    pagoda_teacher   shard: shard                          EDM teacher on x_B (Sec. 3.1; stages.py)
    pagoda_invert    shard: shard, teacher: pagoda_teacher z = inv(x_B), inv(flip(x_B)) per id (Sec. 3.2; invert.py)
    pagoda_distill   pairs: pagoda_invert, teacher         G = teacher copy; L_rec + w_adv*lambda*L_adv (Sec. 3.2)
    pagoda_grow_R    pairs: pagoda_invert, generator: G    one new 2x decoder level at R, same base z (Sec. 3.3)
    pagoda_sample    shard, one role per generator         one-step grids per R + SWD vs. G at init (sample.py)

Growing further is one row in ``GROWTH`` plus its config section (``pagoda_grow_128: {resolution:
128}``): the sample stage's inputs and ``GENERATORS`` follow from the rows.
"""

from __future__ import annotations

import torch

from genmodels.clip import TextEncoder
from genmodels.pagoda import sample_latents
from pipeline.stage import Stage, pool_resources
from pipeline.store import Artifact
from workflows.family import Generator
from workflows.pagoda.invert import InvertConfig, run_invert
from workflows.pagoda.models import load_one_step
from workflows.pagoda.sample import SampleConfig, decode, run_sample
from workflows.pagoda.stages import DistillConfig, GrowConfig, TeacherConfig, run_distill, run_grow, run_teacher
from workflows.train import train_resources

__all__ = ["STAGES", "GENERATORS", "GROWTH", "load_generator", "grow_stage", "family_table", "generators"]

# The base resolution B the table's model names assume: pagoda_teacher.resolution (the paper: 64).
BASE = TeacherConfig.resolution

TEACHER = Stage("pagoda_teacher", run_teacher, TeacherConfig, inputs={"shard": "shard"}, uses_ray=True,
                resources=train_resources)
INVERT = Stage("pagoda_invert", run_invert, InvertConfig, inputs={"shard": "shard", "teacher": "pagoda_teacher"},
               uses_ray=True, resources=pool_resources)
DISTILL = Stage("pagoda_distill", run_distill, DistillConfig,
                inputs={"pairs": "pagoda_invert", "teacher": "pagoda_teacher"}, uses_ray=True,
                resources=train_resources)


def grow_stage(resolution: int, after: str) -> Stage:
    """A 2x growth of the generator stage ``after`` to ``resolution`` (its config section sets
    ``resolution`` to the same value)."""
    return Stage(f"pagoda_grow_{resolution}", run_grow, GrowConfig,
                 inputs={"pairs": "pagoda_invert", "generator": after}, uses_ray=True, resources=train_resources)


def generators(stages: list[Stage], base: int = BASE) -> dict[str, dict[str, str]]:
    """{``pagoda_<R>``: {"generator": stage}} of the generator rows: distillation at ``base``, each
    growth at twice its input generator's R (checked against the growth row's name)."""
    res: dict[str, int] = {}
    for st in stages:
        if st.fn is run_distill:
            res[st.name] = base
        elif st.fn is run_grow:
            parent = st.inputs["generator"]
            if parent not in res:
                raise ValueError(f"{st.name}: its generator {parent!r} is not a generator row declared before it")
            res[st.name] = 2 * res[parent]
            if st.name != f"pagoda_grow_{res[st.name]}":
                raise ValueError(f"{st.name}: grows {parent!r} ({res[parent]} px) to {res[st.name]} px")
    return {f"pagoda_{r}": {"generator": name} for name, r in res.items()}


def family_table(growth: list[Stage]) -> list[Stage]:
    """Teacher, inversion, distillation, the ``growth`` rows, and a sample stage that reads every generator."""
    rows = [TEACHER, INVERT, DISTILL, *growth]
    sample_inputs = {"shard": "shard", **{model: g["generator"] for model, g in generators(rows).items()}}
    return [*rows, Stage("pagoda_sample", run_sample, SampleConfig, inputs=sample_inputs, uses_ray=True,
                         resources=pool_resources)]


# To grow further, add grow_stage(128, after="pagoda_grow_64") here and `pagoda_grow_128: {resolution: 128}`
# to the config.
GROWTH = [grow_stage(32, after="pagoda_distill"), grow_stage(64, after="pagoda_grow_32")]

STAGES = family_table(GROWTH)
GENERATORS = generators(STAGES)


def load_generator(artifacts: dict[str, Artifact]) -> Generator:
    """The family face (workflows.family) of a distillation or growth artifact (``artifacts["generator"]``):
    one forward pass per prompt from z ~ N(0, 80² I) at the base resolution (PaGoDA Sec. 3.2)."""
    gen, meta = load_one_step(artifacts["generator"])
    text = TextEncoder(**meta["text"]) if meta.get("text") else None
    base = int(meta["base_resolution"])

    def sample(prompts: list[str], seed: int) -> torch.Tensor:
        cond = text(prompts) if text is not None else {}
        z = sample_latents((len(prompts), 3, base, base), generator=torch.Generator().manual_seed(seed))
        return decode(gen, z, cond)

    res = int(meta["resolution"])
    return Generator(name=f"pagoda_{res}", resolution=res, sample=sample, nfe=1)
