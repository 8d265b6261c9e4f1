"""PaGoDA (arXiv 2405.14822): a low-resolution teacher, its PF-ODE inversion, a one-step generator
distilled from the pairs, then grown 2x at a time. The family's rows of the stage table:

    pagoda_teacher   shard: shard, clip: clip              EDM teacher on x_B (Sec. 3.1; stages.py)
    pagoda_invert    shard: shard, teacher: pagoda_teacher z = inv(x_B), inv(flip(x_B)) per id (Sec. 3.2; invert.py)
    pagoda_distill   pairs: pagoda_invert, teacher         G = teacher copy; L_rec + w_adv*lambda*L_adv (Sec. 3.2)
    pagoda_grow_R    pairs: pagoda_invert, generator: G    one new 2x decoder level at R, same base z (Sec. 3.3)
    pagoda_sample    shard, one role per generator         one-step grids per R + SWD vs. G at init (sample.py)

The growth rows come from the config (``table_for``): the base B is ``pagoda_teacher.resolution``, the
target the largest ``pagoda_grow_<R>`` section, and there is one row per doubling in between (the paper:
64 -> 128 -> 256 -> 512). Each growth section sets its ``resolution`` to its R. The sample stage's
inputs and the generators follow from the rows; the teacher is a model too (``pagoda_teacher``, role
``teacher``: its multi-step Heun sampler with CFG), sampled by evaluate but not by ``pagoda_sample``.
``STAGES`` / ``GENERATORS`` are the default table
(B 16, grown to 64: the demo's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from genmodels.pagoda import sample_latents
from pipeline.stage import Stage, pool_resources
from pipeline.store import Artifact
from workflows.family import Generator
from workflows.pagoda.invert import InvertConfig, run_invert
from workflows.pagoda.models import initial_model, load_one_step, load_teacher
from workflows.pagoda.sample import SampleConfig, decode, device, run_sample, teacher_sample
from workflows.pagoda.stages import DistillConfig, GrowConfig, TeacherConfig, run_distill, run_grow, run_teacher
from workflows.text_clip import encoder
from workflows.train import train_resources

__all__ = ["STAGES", "GENERATORS", "GROWTH", "load_generator", "grow_stage", "growth", "family_table", "generators",
           "table_for", "base_resolution", "check_growth"]

# The base resolution B the table's model names assume: pagoda_teacher.resolution (the paper: 64).
BASE = TeacherConfig.resolution

TEACHER = Stage("pagoda_teacher", run_teacher, TeacherConfig, inputs={"shard": "shard", "clip": "clip"}, uses_ray=True,
                resources=train_resources)
# version 2: the teacher always sees batch_size rows (workflows.fixed_batch).
INVERT = Stage("pagoda_invert", run_invert, InvertConfig, inputs={"shard": "shard", "teacher": "pagoda_teacher"},
               version=2, uses_ray=True, resources=pool_resources)
DISTILL = Stage("pagoda_distill", run_distill, DistillConfig,
                inputs={"pairs": "pagoda_invert", "teacher": "pagoda_teacher"}, uses_ray=True,
                resources=train_resources)


def grow_stage(resolution: int, after: str) -> Stage:
    """A 2x growth of the generator stage ``after`` to ``resolution`` (its config section sets
    ``resolution`` to the same value)."""
    return Stage(f"pagoda_grow_{resolution}", run_grow, GrowConfig,
                 inputs={"pairs": "pagoda_invert", "generator": after}, uses_ray=True, resources=train_resources)


TEACHER_MODEL = "pagoda_teacher"  # the teacher as a multi-step generator (family face)


def generators(stages: list[Stage], base: int = BASE) -> dict[str, dict[str, str]]:
    """{model: {role: stage}}: the teacher row as ``pagoda_teacher`` ({"teacher": stage}, its multi-step
    sampler), then ``pagoda_<R>`` ({"generator": stage}) of the generator rows: distillation at ``base``,
    each growth at twice its input generator's R (checked against the growth row's name)."""
    teachers = [st.name for st in stages if st.fn is run_teacher]
    out = {TEACHER_MODEL: {"teacher": teachers[0]}} if teachers else {}
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
    return out | {f"pagoda_{r}": {"generator": name} for name, r in res.items()}


def family_table(growth: list[Stage], base: int = BASE) -> list[Stage]:
    """Teacher, inversion, distillation, the ``growth`` rows, and a sample stage that reads every generator."""
    rows = [TEACHER, INVERT, DISTILL, *growth]
    sample_inputs = {"shard": "shard", **{model: g["generator"] for model, g in generators(rows, base).items()
                                          if "generator" in g}}  # one-step generators only
    return [*rows, Stage("pagoda_sample", run_sample, SampleConfig, inputs=sample_inputs, uses_ray=True,
                         resources=pool_resources)]


GROW = "pagoda_grow_"


def growth(base: int, target: int) -> list[Stage]:
    """One 2x growth row per doubling from ``base`` to ``target`` (Sec. 3.3: 64 -> 128 -> 256 -> 512)."""
    ratio = target // base if base > 0 and target % base == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f"{GROW}{target}: {target} px is not the base {base} px (pagoda_teacher.resolution) "
                         "times a power of two")
    rows: list[Stage] = []
    while (res := base * 2 ** (len(rows) + 1)) <= target:
        rows.append(grow_stage(res, after=rows[-1].name if rows else "pagoda_distill"))
    return rows


def base_resolution(sections: Mapping[str, Any]) -> int:
    """B of a config's raw ``stages`` sections: ``pagoda_teacher.resolution`` (a bad value is left to the
    loader to report)."""
    teacher = sections.get("pagoda_teacher")
    base = teacher.get("resolution", BASE) if isinstance(teacher, Mapping) else BASE
    return base if isinstance(base, int) and not isinstance(base, bool) and base > 0 else BASE


def table_for(sections: Mapping[str, Any]) -> list[Stage]:
    """The family's rows for a config's ``stages`` sections (raw YAML, overrides merged): B is
    ``pagoda_teacher.resolution``, the target the largest ``pagoda_grow_<R>`` section (none: 4B, two
    growth steps as in the default table)."""
    base = base_resolution(sections)
    grown = [int(k[len(GROW):]) for k in sections if k.startswith(GROW) and k[len(GROW):].isdigit()]
    return family_table(growth(base, max(grown, default=4 * base)), base)


def check_growth(stages: list[Stage], configs: Mapping[str, Any]) -> None:
    """Each growth row's section must say the resolution its row makes (GrowConfig's default is 32)."""
    for st in stages:
        if st.fn is run_grow and configs[st.name].resolution != (res := int(st.name[len(GROW):])):
            raise ValueError(f"stages.{st.name}.resolution: the row grows to {res} px, got "
                             f"{configs[st.name].resolution} (set resolution: {res})")


# The default table: B = TeacherConfig.resolution (16), grown to 64 (the demo's two rows).
GROWTH = growth(BASE, 4 * BASE)

STAGES = family_table(GROWTH)
GENERATORS = generators(STAGES)


def load_generator(artifacts: dict[str, Artifact], initial: bool = False) -> Generator:
    """The family face (workflows.family) of a model's artifacts.

    ``{"generator": art}`` (distillation or growth): one forward pass per prompt from z ~ N(0, 80² I) at
    the base resolution (PaGoDA Sec. 3.2); a CFG-conditioned G at its model_config ``sampler`` omega.
    ``{"teacher": art}``: the teacher's multi-step sampler at the base resolution, Heun on the EDM grid
    with the CFG scale it was trained for (model_config ``sampler``; Sec. 3.1), nfe = its network passes
    per image. ``initial=True``: the same sampler on the model as its stage built it before the first
    step (models.initial_model), each model's floor.
    """
    if set(artifacts) == {"teacher"}:
        return _teacher_face(artifacts["teacher"], initial)
    if set(artifacts) != {"generator"}:
        raise ValueError(f"pagoda.load_generator: expected the role 'generator' or 'teacher', got {sorted(artifacts)}")
    art = artifacts["generator"]
    gen, meta = (initial_model(art), art.read_json("model_config.json")) if initial else load_one_step(art)
    gen = gen.to(device())  # images come back on the CPU (decode)
    text = encoder(**meta["text"]) if meta.get("text") else None
    base = int(meta["base_resolution"])
    omega = float(meta.get("sampler", {}).get("omega", 0.0))

    def sample(prompts: list[str], seed: int) -> torch.Tensor:
        cond = text(prompts) if text is not None else {}
        z = sample_latents((len(prompts), 3, base, base), generator=torch.Generator().manual_seed(seed))
        return decode(gen, z, cond, omega=omega)

    res = int(meta["resolution"])
    return Generator(name=f"pagoda_{res}", resolution=res, sample=sample, nfe=1)


def _teacher_face(art: Artifact, initial: bool) -> Generator:
    teacher, meta = (initial_model(art), art.read_json("model_config.json")) if initial else load_teacher(art)
    teacher = teacher.to(device())  # 2 * points - 1 evaluations per image: on the GPU where there is one
    sampler = {"points": TeacherConfig.sample_points, "omega": 0.0, **meta.get("sampler", {})}
    points, omega = int(sampler["points"]), float(sampler["omega"]) if meta.get("text") else 0.0
    text = encoder(**meta["text"]) if meta.get("text") else None
    res = int(meta["resolution"])

    def sample(prompts: list[str], seed: int) -> torch.Tensor:
        cond = text(prompts) if text is not None else {}
        z = sample_latents((len(prompts), 3, res, res), generator=torch.Generator().manual_seed(seed))
        return teacher_sample(teacher, z, cond, points, omega)

    # Heun: 2 evaluations per step, an Euler step to sigma = 0 (EDM Alg. 1); CFG doubles each evaluation.
    nfe = (2 * points - 1) * (2 if omega != 0 else 1)
    return Generator(name=TEACHER_MODEL, resolution=res, sample=sample, nfe=nfe)
