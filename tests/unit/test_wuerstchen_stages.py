"""Würstchen stage pieces without Ray: configs, how the stages read the shard, the encoder class,
official-weights loading, seeded sampling, the family face."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from genmodels.clip import build_clip, encode_text_tokens
from genmodels.wuerstchen import SemanticCompressor, StageA, StageB, StageC, to_diffusers_state_dict
from pipeline.config import ConfigError, build
from pipeline.store import Artifact, Store, write_manifest
from tests.fakes import write_fake_shard
from workflows import shard_data
from workflows import wuerstchen as wu
from workflows.family import Generator
from workflows.fixed_batch import run_fixed
from workflows.wuerstchen import encode as enc
from workflows.wuerstchen import models as wm
from workflows.wuerstchen import official
from workflows.wuerstchen import sample as sw
from workflows.wuerstchen import stages as ws

# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("cls,data,message", [
    (ws.StageBTrainConfig, {"overrides": {"c_hiden": [8]}}, r"s\.overrides\.c_hiden: not a StageBConfig field"),
    (ws.StageBTrainConfig, {"compressor_overrides": {"x": 1}}, r"s\.compressor_overrides\.x: not a Compressor"),
    (ws.StageATrainConfig, {"resolution": 30}, r"s\.resolution: expected a multiple of 4"),
    (ws.StageATrainConfig, {"preset": "huge"}, r"s\.preset: expected one of \['tiny', 'paper'\]"),
    (ws.StageCTrainConfig, {"train": {"lr": 0}}, r"s\.train\.lr: must be > 0"),
    (enc.EncodeAConfig, {"resolution": 0}, r"s\.resolution: expected a multiple of 8"),
    (enc.EncodeAConfig, {"heldout_fraction": 0.1}, r"s\.heldout_fraction"),  # the shard stage decides the split
    (ws.StageATrainConfig, {"heldout_fraction": 0.1}, r"s\.heldout_fraction"),
    (enc.EncodeAConfig, {"actors": 0}, r"s\.actors: must be >= 1"),
    (enc.EncodeAConfig, {"text_encoder": {"name": "ViT-Nope"}}, r"s\.text_encoder\.name: unknown open_clip model"),
    (sw.SampleConfig, {"prompts": []}, r"s\.prompts: give at least one prompt"),
    (sw.SampleConfig, {"image_size": 40}, r"s\.image_size: expected a multiple of 16"),
])
def test_bad_configs_name_the_key(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        build(cls, data, "s")


def test_configs_build_from_yaml_values():
    cfg = build(ws.StageBTrainConfig, {"overrides": {"c_hidden": [16, 32]}, "train": {"batch_size": 4}}, "s")
    assert wm.model_config("stage_b", cfg.preset, cfg.overrides, c_clip=64).c_hidden == (16, 32)
    assert build(enc.EncodeSemanticConfig, {}, "s").resolution == 0  # 0: take Stage B's
    assert wm.TextEncoderConfig("ViT-bigG-14").width == 1280 and wm.TextEncoderConfig().width == 64
    for stage in wu.STAGES:  # every stage's defaults are valid
        build(stage.config, {}, stage.name)


def test_stage_table_names_inputs_by_role():
    inputs = {s.name: s.inputs for s in wu.STAGES}
    assert inputs["wuerstchen_stage_b"] == {"latents": "wuerstchen_encode_a", "stage_a": "wuerstchen_stage_a"}
    assert inputs["wuerstchen_stage_c"] == {"latents": "wuerstchen_encode_semantic"}
    assert wu.GENERATORS == {"wuerstchen": inputs["wuerstchen_sample"]} == {
        "wuerstchen": {"stage_a": "wuerstchen_stage_a", "stage_b": "wuerstchen_stage_b",
                       "stage_c": "wuerstchen_stage_c"}}
    pool = {s.name: s.resources for s in wu.STAGES}["wuerstchen_encode_a"]
    assert pool(enc.EncodeAConfig(actors=2, cpus_per_actor=0.5)) == {"CPU": 1.0}
    assert pool(enc.EncodeAConfig(actors=2, gpus_per_actor=1)) == {"GPU": 2.0}


def test_paper_presets_keep_the_paper_text_widths():
    assert wm.model_config("stage_b", "paper", c_clip=wm.TextEncoderConfig("ViT-H-14").width).c_clip == 1024
    assert wm.model_config("stage_c", "paper", c_clip=wm.TextEncoderConfig("ViT-bigG-14").width).c_clip == 1280


# ---------------------------------------------------------------------------------------------- rows


def _jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_training_rows_follow_the_split_column_and_carry_stable_row_ids():
    ids = np.array([f"s{i}" for i in range(200)], dtype=object)
    split = np.array([shard_data.HELDOUT if i % 5 == 0 else shard_data.TRAIN for i in range(200)], dtype=object)
    rows = shard_data.select({"sample_id": ids, shard_data.SPLIT_COLUMN: split, "x": np.arange(200)})
    assert len(rows["x"]) == 160 and (rows["x"] % 5 != 0).all() and shard_data.SPLIT_COLUMN not in rows
    a = rows["row_id"]
    assert a.dtype == np.int64 and len(set(a.tolist())) == 160 and (a >= 0).all()
    assert (shard_data.select({"sample_id": ids, shard_data.SPLIT_COLUMN: split})["row_id"] == a).all()  # stable
    assert (ids[rows["x"]] == rows["sample_id"]).all()  # columns stay aligned


def test_image_column_is_found_or_the_error_lists_the_columns(tmp_path):

    shard = Store(str(tmp_path)).artifact("shard", "k")
    write_fake_shard(shard, 4, resolutions=(16, 32), files=1, recaption="copy")
    names = shard_data.columns(shard)
    assert shard_data.image_column(names, 32) == "jpg_32"
    assert shard_data.image_column(names, 24) == "jpg_32"  # the smallest stored side above R, resized
    with pytest.raises(ValueError, match=r"images at \[16, 32\], none at or above 64"):
        shard_data.image_column(names, 64)
    with pytest.raises(ValueError, match=r"no column 'nope' \(columns: sample_id, .*jpg_16, jpg_32\)"):
        shard_data.read(shard, carry=["nope"])
    rows = shard_data.head(shard, ["jpg_16"], 3, split=None)
    assert len(rows["jpg_16"]) == 3 and isinstance(rows["jpg_16"][0], bytes)


def test_decode_images_range_shape_and_resize():
    x = shard_data.decode([_jpeg(0, 32), _jpeg(1, 48)], 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1


# ---------------------------------------------------------------------------------------------- encoder


def fake_trained(art: Artifact, modules: dict[str, torch.nn.Module], **extra) -> Artifact:
    """A training artifact as the harness exports it: weights/{name}.safetensors + model_config.json."""
    for name, m in modules.items():
        art.write_bytes(f"weights/{name}.safetensors", save({k: v.contiguous() for k, v in m.state_dict().items()}))
    art.write_json("model_config.json", {"modules": {n: dataclasses.asdict(m.cfg)
                                                     for n, m in modules.items()}, **extra})
    return art


def test_encoder_class_round_trip_without_ray(tmp_path):
    torch.manual_seed(0)
    stage_a, comp = StageA().eval(), SemanticCompressor().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for bn in (stage_a.to_latent[1], comp.mapper[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    store = Store(str(tmp_path))
    a_art = fake_trained(store.artifact("wuerstchen_stage_a", "k"), {"stage_a": stage_a})
    b_art = fake_trained(store.artifact("wuerstchen_stage_b", "k"), {"compressor": comp})
    batch = {"sample_id": np.array(["a", "b", "c"], dtype=object), "row_id": np.arange(3),
             "jpg_64": np.array([_jpeg(i, 64) for i in range(3)], dtype=object),
             "caption": np.array(["a red circle", "", "two shapes"], dtype=object),
             "recaption": np.array(["", "", "two shapes"], dtype=object)}  # empty: use the caption
    e = enc.WuerstchenEncoder("jpg_64", 64, wm.TextEncoderConfig(), "recaption", stage_a=a_art, compressor=b_art,
                              keep_image=True, device="cpu")
    out = e(batch)
    assert set(out) == {"sample_id", "row_id", "latent_a", "latent_sem", "text_tokens", "jpg_64"}
    assert out["latent_a"].shape == (3, 4, 16, 16) and out["latent_a"].dtype == np.float16
    assert out["latent_sem"].shape == (3, 16, 4, 4) and out["text_tokens"].shape == (3, 77, 64)
    x = torch.from_numpy(shard_data.decode(batch["jpg_64"], 64))
    with torch.no_grad():
        lat = stage_a.encode(x)
        torch.testing.assert_close(torch.from_numpy(out["latent_a"]).float(), lat, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(out["latent_sem"]).float(), comp(x), atol=2e-3, rtol=2e-3)
        # The stored (float16) latent decodes to what the float32 one does.
        torch.testing.assert_close(stage_a.decode(torch.from_numpy(out["latent_a"]).float()), stage_a.decode(lat),
                                   atol=1e-2, rtol=0)
        clip, _, tok = build_clip()
        ref = encode_text_tokens(clip, tok(list(batch["caption"])))
    torch.testing.assert_close(torch.from_numpy(out["text_tokens"]).float(), ref, atol=5e-3, rtol=5e-3)
    assert out["jpg_64"] is batch["jpg_64"]
    # Text-only use (no models): just token states.
    plain = enc.WuerstchenEncoder("jpg_64", 64, wm.TextEncoderConfig(), device="cpu")(batch)
    assert set(plain) == {"sample_id", "row_id", "text_tokens"}


def test_encoder_rows_do_not_depend_on_how_ray_data_batched_them(tmp_path):
    """Ray Data's batches follow block arrival; oneDNN picks its kernels by batch size (below 16 rows
    this machine's convolutions differ by ~1e-6). Every network call runs on ``compute_batch`` rows,
    so the rows of a short batch equal the same rows inside a full one, bit for bit, in float32."""
    torch.manual_seed(0)
    stage_a, comp = StageA().eval(), SemanticCompressor().eval()
    with torch.no_grad():  # as after training: a fresh Stage A's blocks are gated shut (identities)
        for p in stage_a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    store = Store(str(tmp_path))
    e = enc.WuerstchenEncoder("jpg_64", 64, wm.TextEncoderConfig(), device="cpu", compute_batch=20,
                              stage_a=fake_trained(store.artifact("wuerstchen_stage_a", "k"), {"stage_a": stage_a}),
                              compressor=fake_trained(store.artifact("wuerstchen_stage_b", "k"), {"compressor": comp}))
    x = torch.rand(20, 3, 64, 64) * 2 - 1
    caps = [f"a shape number {i}" for i in range(20)]
    with torch.no_grad():
        for fn, data in ((e.stage_a.encode, x), (e.compressor, x), (lambda c: e.text(c)["text"], caps)):
            fills = ("",) if data is caps else ()
            whole = run_fixed(fn, e.compute_batch, data, fills=fills)
            assert whole.shape[0] == 20
            for lo, hi in ((0, 3), (3, 17), (17, 20)):
                part = run_fixed(fn, e.compute_batch, data[lo:hi], fills=fills)
                assert torch.equal(part, whole[lo:hi]), (lo, hi)


# ---------------------------------------------------------------------------------------------- official weights


def _diffusers_config(kind: str, m) -> dict:
    c = m.cfg
    if kind == "stage_c":
        return {"c_in": c.c_in, "c": c.c, "c_cond": c.c_clip, "c_r": c.c_r, "depth": c.depth, "nhead": c.nhead,
                "dropout": c.dropout}
    if kind == "stage_b":
        return {"c_in": c.c_in, "c_out": c.c_in, "c_r": c.c_r, "patch_size": c.patch_size, "c_cond": c.c_cond,
                "c_hidden": list(c.c_hidden), "nhead": [h or -1 for h in c.nhead], "blocks": list(c.blocks),
                "level_config": list(c.level_config), "inject_effnet": list(c.inject_sem), "effnet_embd": c.c_sem,
                "clip_embd": c.c_clip, "kernel_size": c.kernel_size, "dropout": [c.dropout] * len(c.c_hidden)}
    return {"in_channels": c.c_in, "out_channels": c.c_in, "up_down_scale_factor": 2, "levels": c.levels,
            "bottleneck_blocks": c.bottleneck_blocks, "embed_dim": c.c_hidden, "latent_channels": c.c_latent,
            "num_vq_embeddings": c.codebook_size, "scale_factor": c.scale_factor}


def test_load_official_reads_diffusers_layout(tmp_path):
    torch.manual_seed(0)
    from genmodels.wuerstchen import StageBConfig, StageCConfig

    nets = {"stage_c": StageC(StageCConfig(c=32, depth=3, nhead=2, c_clip=24)),
            "stage_b": StageB(StageBConfig(c_hidden=(16, 32), c_clip=24, c_cond=16)),
            "stage_a": StageA()}
    for kind, m in nets.items():
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        folder = tmp_path / official.OFFICIAL_SUBDIR[kind]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "x", **_diffusers_config(kind, m)}))
        theirs = {k: v.contiguous() for k, v in to_diffusers_state_dict(kind, m.state_dict()).items()}
        if kind == "stage_b":  # sharded, with an index, as large checkpoints are published
            keys = sorted(theirs)
            shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
                      "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
            for f, ks in shards.items():
                save_file({k: theirs[k] for k in ks}, str(folder / f))
            index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
            (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        elif kind == "stage_a":  # pickled .bin
            torch.save(theirs, folder / "diffusion_pytorch_model.bin")
        else:
            save_file(theirs, str(folder / "diffusion_pytorch_model.safetensors"))
            fp16 = {k: v.half() for k, v in theirs.items()}  # a variant file that must not be picked
            save_file(fp16, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    for kind, m in nets.items():
        loaded = official.load_official(str(tmp_path), kind)
        assert loaded.cfg == m.cfg, kind
        ref = m.state_dict()
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, ref[k]), (kind, k)
    # The component folder itself works too.
    assert official.load_official(str(tmp_path / "prior"), "stage_c").cfg == nets["stage_c"].cfg
    with pytest.raises(FileNotFoundError):
        official.load_official(str(tmp_path / "nothing"), "stage_c")


# ---------------------------------------------------------------------------------------------- sampling


def _tiny_set() -> wm.ModelSet:
    torch.manual_seed(0)
    w = wm.TextEncoderConfig().width
    b = StageB(wm.model_config("stage_b", "tiny", c_clip=w)).eval()
    c = StageC(wm.model_config("stage_c", "tiny", c_clip=w)).eval()
    with torch.no_grad():  # untrained heads are zero: make the output depend on the noise
        b.head[1].weight.normal_(std=0.1)
        c.proj_out.weight.normal_(std=0.1)
    comp = dataclasses.asdict(wm.model_config("compressor", "tiny"))
    return wm.ModelSet(stage_a=StageA().eval(), stage_b=b, stage_c=c, text_c=wm.TextEncoderConfig(),
                       text_b=wm.TextEncoderConfig(), compressor=comp, image_size=32)


def test_generate_is_seeded_and_writes_the_sample_artifact(tmp_path):
    ms = _tiny_set()
    cfg = sw.SampleConfig(prompts=["a red circle", "a blue square"], n_per_prompt=2, steps_c=5, steps_b=3, seed=7)
    x1, times = sw.generate(ms, cfg)
    x2, _ = sw.generate(ms, cfg)
    x3, _ = sw.generate(ms, dataclasses.replace(cfg, seed=8))
    only_second, _ = sw.generate(ms, dataclasses.replace(cfg, prompts=["a blue square"], seed=8))
    assert x1.shape == (4, 3, 32, 32) and torch.equal(x1, x2) and not torch.equal(x1, x3)
    # Prompt i always draws its noise from seed + i, whatever else shares the batch (batch size only
    # changes float rounding).
    torch.testing.assert_close(only_second, x1[2:], atol=1e-3, rtol=0)
    assert set(times) == {"text", "stage_c", "stage_b", "stage_a"}
    out = Store(str(tmp_path)).artifact("wuerstchen_sample", "k")
    counts = sw.write_outputs(out, x1, list(cfg.prompts), cfg)
    assert counts == {"images": 4, "prompts": 2, "image_size": 32}
    assert out.list(".png") == ["grid.png", "samples/000_00.png", "samples/000_01.png", "samples/001_00.png",
                                "samples/001_01.png"]
    with Image.open(out.child("samples/001_01.png")) as im:
        assert im.size == (32, 32)
    assert out.read_json("prompts.json")[3] == {"file": "samples/001_01.png", "prompt": "a blue square",
                                                "prompt_index": 1, "sample": 1, "seed": 8}


# ---------------------------------------------------------------------------------------------- the family face


def _trained_set(store: Store) -> dict[str, Artifact]:
    """Stage A, B (+ compressor) and C training artifacts of the tiny set, as the stages export them."""
    ms = _tiny_set()
    text = dataclasses.asdict(wm.TextEncoderConfig())
    comp = SemanticCompressor(wm.model_config("compressor", "tiny")).eval()
    return {"stage_a": fake_trained(store.artifact("wuerstchen_stage_a", "ka"), {"stage_a": ms.stage_a}),
            "stage_b": fake_trained(store.artifact("wuerstchen_stage_b", "kb"), {"stage_b": ms.stage_b,
                                    "compressor": comp}, resolution=32, text_encoder=text),
            "stage_c": fake_trained(store.artifact("wuerstchen_stage_c", "kc"), {"stage_c": ms.stage_c},
                                    resolution=32, text_encoder=text)}


def test_load_generator_samples_as_evaluate_did(tmp_path):
    arts = _trained_set(Store(str(tmp_path)))
    g = wu.load_generator(arts)
    assert isinstance(g, Generator) and g.name == "wuerstchen" and g.resolution == 32
    assert g.nfe == 29 + 12 + 1  # Stage C steps + Stage B steps + one Stage A decode
    prompts = ["a red circle", "a blue square"]
    x = g.sample(prompts, 5)
    assert x.shape == (2, 3, 32, 32) and x.device.type == "cpu" and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, g.sample(prompts, 5)) and not torch.equal(x, g.sample(prompts, 6))
    ms = wm.load_trained_set(arts["stage_a"], arts["stage_b"], arts["stage_c"])
    ref, _ = sw.generate(ms, sw.SampleConfig(prompts=prompts, n_per_prompt=1, seed=5, device="cpu"), prompts)
    assert torch.equal(x, ref)


def test_load_generator_samples_at_the_guidance_stage_c_recorded(tmp_path):
    arts = _trained_set(Store(str(tmp_path)))
    meta = arts["stage_c"].read_json("model_config.json")
    arts["stage_c"].write_json("model_config.json", {**meta, "sampler": {"guidance_c": 2.0}})
    prompts = ["a red circle", "a blue square"]
    x = wu.load_generator(arts).sample(prompts, 5)
    ms = wm.load_trained_set(arts["stage_a"], arts["stage_b"], arts["stage_c"])
    base = sw.SampleConfig(prompts=prompts, n_per_prompt=1, seed=5, device="cpu")
    at2, _ = sw.generate(ms, dataclasses.replace(base, guidance_c=2.0), prompts)
    at4, _ = sw.generate(ms, dataclasses.replace(base, guidance_c=4.0), prompts)
    assert ms.guidance_c == 2.0 and torch.equal(sw.generate(ms, base, prompts)[0], at2)  # 0: the recorded one
    assert torch.equal(x, at2) and not torch.equal(x, at4)


def test_sample_walks_manifests_by_role(tmp_path):
    store = Store(str(tmp_path))
    arts = _trained_set(store)
    sem = store.artifact("wuerstchen_encode_semantic", "ks")

    def done(art: Artifact, **inputs: Artifact) -> None:  # as the runner writes it: {role: key}, {role: stage}
        write_manifest(art, {"inputs": {r: a.uri.rsplit("/", 1)[1] for r, a in inputs.items()},
                             "upstream": {r: a.uri.rsplit("/", 2)[1] for r, a in inputs.items()}})

    done(arts["stage_a"])
    done(arts["stage_b"], stage_a=arts["stage_a"])
    done(sem, stage_b=arts["stage_b"])
    done(arts["stage_c"], latents=sem)
    sample = store.artifact("wuerstchen_sample", "kx")
    done(sample, **arts)
    want = tuple(arts[r].uri for r in ("stage_a", "stage_b", "stage_c"))
    assert tuple(a.uri for a in sw.from_sample_artifact(sample.uri)) == want
    assert tuple(a.uri for a in sw.latest_under_root(str(tmp_path))) == want
    with pytest.raises(ValueError, match="no finished wuerstchen_stage_c"):
        sw.latest_under_root(str(tmp_path / "empty"))
