"""PaGoDA's family face for evaluation: the teacher as a multi-step generator (its NFE counted, not
assumed), and ``load_generator(..., initial=True)``: each model exactly as its stage built it before
the first step (the stage's own builder under the stage's seed), distinct from the trained model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from genmodels.clip import TextEncoder
from genmodels.pagoda import Generator, GeneratorConfig, UNet, sample_latents
from pipeline.store import Artifact, Store
from tests.unit.test_pagoda_stages import tiny_generator_artifact, tiny_teacher_artifact
from workflows import evaluate, pagoda, wuerstchen
from workflows.pagoda import stages as stages_mod
from workflows.pagoda.models import initial_model, load_one_step, load_teacher
from workflows.pagoda.sample import decode
from workflows.pagoda.stages import DistillConfig, GrowConfig, TeacherConfig, run_distill, run_grow, run_teacher
from workflows.train import export
from workflows.train.checkpoint import seed_all
from workflows.train.config import TrainConfig

PROMPTS = ["a red circle", "a blue square", ""]


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "root"))


def _perturbed(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A 'trained' state dict: the model's weights moved by a seeded step."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def _export(art: Artifact, name: str, sd: dict, meta: dict, seed: int) -> None:
    export.write(art, weights={name: sd}, ema_weights={name: sd}, model_config=meta,
                 train_config={"seed": seed}, history=[], summary={"steps": 1}, preview=None)


def _capture(monkeypatch, target: str) -> dict:
    """Replace a stage's trainer entry by one that records its arguments."""
    seen: dict = {}
    monkeypatch.setattr(stages_mod, target, lambda *a: seen.update(args=a) or {})
    return seen


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------
# The table: the teacher is a model of the family, every model resolves to one family


def test_teacher_is_a_generator_and_every_model_resolves_to_one_family():
    assert pagoda.GENERATORS["pagoda_teacher"] == {"teacher": "pagoda_teacher"}
    assert list(pagoda.GENERATORS)[0] == "pagoda_teacher"
    inputs = evaluate.generator_inputs()
    assert inputs["pagoda_teacher.teacher"] == "pagoda_teacher"
    models = evaluate.models_in(inputs)
    assert list(models) == [*wuerstchen.GENERATORS, *pagoda.GENERATORS]
    assert models["pagoda_teacher"][0] is pagoda and set(models["pagoda_teacher"][1]) == {"teacher"}
    # A config-driven table (grown to 128) names the teacher too; roles alone still pick one family.
    rows = pagoda.table_for({"pagoda_grow_128": {"resolution": 128}})
    gens = pagoda.generators(rows)
    assert gens["pagoda_teacher"] == {"teacher": "pagoda_teacher"} and "pagoda_128" in gens
    assert evaluate.models_in({"pagoda_teacher.teacher": "t", "pagoda_128.generator": "g"})["pagoda_128"][0] is pagoda
    # The sample stage samples one-step generators only.
    sample = next(s for s in rows if s.name == "pagoda_sample")
    assert "pagoda_teacher" not in sample.inputs and sample.inputs["pagoda_128"] == "pagoda_grow_128"
    with pytest.raises(ValueError, match="expected the role 'generator' or 'teacher'"):
        pagoda.load_generator({"stage_a": None})


# ------------------------------------------------------------------------------------------
# The teacher's multi-step sampler


def _teacher_art(store: Artifact, omega: float, points: int, key: str = "k") -> Artifact:
    art = store.artifact("pagoda_teacher", key)
    tiny_teacher_artifact(art)
    meta = art.read_json("model_config.json") | {"sampler": {"points": points, "omega": omega}}
    art.write_json("model_config.json", meta)
    return art


class _Rows:
    """Counts the rows every UNet forward pass sees (network evaluations x batch)."""

    def __enter__(self):
        self.rows = 0
        self.handle = nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, args, out):
        if isinstance(module, UNet):
            self.rows += args[0].shape[0]

    def __exit__(self, *exc):
        self.handle.remove()

    def map_batches(self, *a, **k):  # stands in for the teacher stage's dataset
        return self


@pytest.mark.parametrize(("omega", "points", "nfe"), [(1.5, 5, 18), (0.0, 6, 11)])
def test_teacher_face_samples_with_its_sampler_and_counts_real_nfe(store, omega, points, nfe):
    art = _teacher_art(store, omega, points)
    face = pagoda.load_generator({"teacher": art})
    assert (face.name, face.resolution, face.nfe) == ("pagoda_teacher", 16, nfe)
    with _Rows() as count:
        x = face.sample(PROMPTS, 3)
    assert count.rows == nfe * len(PROMPTS)  # the NFE it reports is the passes it makes
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert torch.equal(x, face.sample(PROMPTS, 3)) and not torch.equal(x, face.sample(PROMPTS, 4))


def test_teacher_face_guidance_changes_samples_and_old_artifacts_fall_back(store):
    guided = pagoda.load_generator({"teacher": _teacher_art(store, 2.0, 4, "a")}).sample(PROMPTS, 0)
    plain = pagoda.load_generator({"teacher": _teacher_art(store, 0.0, 4, "b")}).sample(PROMPTS, 0)
    assert (guided - plain).abs().mean() > 1e-3
    old = store.artifact("pagoda_teacher", "old")
    tiny_teacher_artifact(old)  # model_config without "sampler": TeacherConfig's points, no guidance
    assert pagoda.load_generator({"teacher": old}).nfe == 2 * TeacherConfig.sample_points - 1


def test_teacher_stage_records_the_sampler_and_guides_only_with_dropout(store, monkeypatch):
    monkeypatch.setattr(stages_mod.shard_data, "read", lambda *a, **k: _Rows())  # any object with map_batches
    seen = _capture(monkeypatch, "fit")
    for text, drop, want in ((True, 0.1, 2.5), (True, 0.0, 0.0), (False, 0.1, 0.0)):
        cfg = TeacherConfig(preset="micro", text=text, cond_drop=drop, sample_points=9, sample_omega=2.5)
        run_teacher({"shard": None}, cfg, store.artifact("t", "k"))
        assert seen["args"][4]["sampler"] == {"points": 9, "omega": want}


def test_pooled_text_teacher_conditions_on_one_token_of_clips_embedding_width(store, monkeypatch):
    monkeypatch.setattr(stages_mod.shard_data, "read", lambda *a, **k: _Rows())
    seen = _capture(monkeypatch, "fit")
    run_teacher({"shard": None}, TeacherConfig(preset="micro", text_pooled=True), store.artifact("t", "k"))
    meta = seen["args"][4]
    assert meta["text"]["pooled_token"] is True and meta["unet"]["text_dim"] == 64  # tiny-clip embed_dim
    run_teacher({"shard": None}, TeacherConfig(preset="micro"), store.artifact("t", "k2"))
    assert "pooled_token" not in seen["args"][4]["text"]


def test_cfg_generator_face_samples_at_its_recorded_omega(store):
    """A G(z, c, omega) (Sec. 4.2) is sampled at model_config's ``sampler`` omega, not at 0."""
    tart = _teacher_art(store, 1.0, 4)
    teacher, tmeta = load_teacher(tart)
    gen = Generator.from_teacher(teacher, GeneratorConfig(omega_cond=True))
    meta = {"kind": "pagoda_generator", "unet": dataclasses.asdict(gen.net.cfg),
            "generator": dataclasses.asdict(gen.cfg), "text": tmeta["text"], "teacher": tart.uri,
            "resolution": 16, "base_resolution": 16}
    faces = {}
    for omega in (0.0, 2.0):
        art = store.artifact("pagoda_distill", f"w{omega}")
        _export(art, "generator", _perturbed(gen, 1), meta | {"sampler": {"omega": omega}}, seed=0)
        faces[omega] = pagoda.load_generator({"generator": art}).sample(PROMPTS, 5)
    g, _ = load_one_step(art)
    cond = TextEncoder(**tmeta["text"])(PROMPTS)
    z = sample_latents((3, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(faces[2.0], decode(g, z, cond, omega=2.0), atol=1e-6)
    assert (faces[2.0] - faces[0.0]).abs().mean() > 1e-4


# ------------------------------------------------------------------------------------------
# initial=True: each model as its stage built it


def test_initial_teacher_is_the_stage_init_under_its_seed(store, monkeypatch):
    monkeypatch.setattr(stages_mod.shard_data, "read", lambda *a, **k: None)
    seen = _capture(monkeypatch, "fit")
    cfg = TeacherConfig(preset="micro", text=False, train=TrainConfig(seed=11))
    run_teacher({"shard": None}, cfg, store.artifact("t", "k"))
    spec, tc, _, _, meta = seen["args"]
    seed_all(tc.seed)
    init = spec.build_models(tc)["teacher"]  # what fit() builds (workflows/train/loop.py _build)
    art = store.artifact("pagoda_teacher", "k")
    _export(art, "teacher", _perturbed(init, 0), meta, tc.seed)
    assert _same(initial_model(art), init) and not _same(load_teacher(art)[0], init)
    seed_all(12)
    assert not _same(spec.build_models(tc)["teacher"], init)  # the seed decides the init
    trained, first = (pagoda.load_generator({"teacher": art}, initial=i) for i in (False, True))
    x0 = first.sample(PROMPTS, 5)
    assert torch.equal(x0, pagoda.load_generator({"teacher": art}, initial=True).sample(PROMPTS, 5))
    assert (x0 - trained.sample(PROMPTS, 5)).abs().mean() > 1e-3 and first.nfe == trained.nfe


def test_initial_distilled_and_grown_generators_are_the_stage_inits(store, monkeypatch):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart)
    seen = _capture(monkeypatch, "_fit_generator")
    # Distillation: G = the teacher copy (with an omega embedding, which draws from the RNG).
    dcfg = DistillConfig(omega_cond=True, train=TrainConfig(seed=3))
    run_distill({"teacher": tart, "pairs": None}, dcfg, store.artifact("d", "k"))
    _, _, res, dmeta, build, _ = seen["args"]
    seed_all(3)
    g0 = build()
    dart = store.artifact("pagoda_distill", "k")
    _export(dart, "generator", _perturbed(g0, 1), dmeta, 3)
    assert res == 16 and _same(initial_model(dart), g0) and not _same(load_one_step(dart)[0], g0)

    # Growth: the parent's EMA generator plus the new level, fresh weights from the stage's seed.
    gcfg = GrowConfig(resolution=32, train=TrainConfig(seed=7))
    run_grow({"generator": dart, "pairs": None}, gcfg, store.artifact("g", "k"))
    _, _, res, gmeta, build, _ = seen["args"]
    assert gmeta["parent"] == dart.uri
    seed_all(7)
    g1 = build()
    gart = store.artifact("pagoda_grow_32", "k")
    _export(gart, "generator", _perturbed(g1, 2), gmeta, 7)
    init = initial_model(gart)
    assert res == 32 and _same(init, g1) and not _same(load_one_step(gart)[0], g1)
    parent = load_one_step(dart)[0].state_dict()  # the trained parent, not its own init, is copied
    assert all(torch.equal(v, parent[k]) for k, v in init.state_dict().items()
               if k in parent and parent[k].shape == v.shape)
    assert any(k not in parent for k in init.state_dict())  # the new level
    seed_all(8)
    assert not _same(build(), g1)  # its fresh weights come from the seed

    face0, face1 = (pagoda.load_generator({"generator": gart}, initial=i) for i in (True, False))
    assert (face0.name, face0.resolution, face0.nfe) == ("pagoda_32", 32, 1)
    x0 = face0.sample(PROMPTS, 2)
    assert x0.shape == (3, 3, 32, 32) and torch.equal(x0, face0.sample(PROMPTS, 2))
    assert (x0 - face1.sample(PROMPTS, 2)).abs().mean() > 1e-3


def test_initial_growth_without_a_recorded_parent_says_so(store):
    tart = store.artifact("pagoda_teacher", "k")
    tiny_teacher_artifact(tart, text=False)
    gart = store.artifact("pagoda_grow_32", "k")
    tiny_generator_artifact(gart, tart, grow=1)
    meta = gart.read_json("model_config.json")
    gart.write_json("model_config.json", meta | {"growth": dataclasses.asdict(stages_mod.growth_config(GrowConfig()))})
    with pytest.raises(ValueError, match="names no parent generator"):
        pagoda.load_generator({"generator": gart}, initial=True)
