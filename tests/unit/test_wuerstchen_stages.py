"""Würstchen stage pieces without Ray: configs, row helpers, the encoder class, official-weights loading,
seeded sampling."""

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
from workflows import sample_wuerstchen as sw
from workflows import wuerstchen_encode as enc
from workflows import wuerstchen_stages as ws
from workflows.config import ConfigError, build
from workflows.store import Artifact, Store

# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("cls,data,message", [
    (ws.StageBTrainConfig, {"overrides": {"c_hiden": [8]}}, r"s\.overrides\.c_hiden: not a StageBConfig field"),
    (ws.StageBTrainConfig, {"compressor_overrides": {"x": 1}}, r"s\.compressor_overrides\.x: not a Compressor"),
    (ws.StageATrainConfig, {"resolution": 30}, r"s\.resolution: expected a multiple of 4"),
    (ws.StageATrainConfig, {"preset": "huge"}, r"s\.preset: expected one of \['tiny', 'paper'\]"),
    (ws.StageCTrainConfig, {"train": {"lr": 0}}, r"s\.train\.lr: must be > 0"),
    (enc.EncodeAConfig, {"resolution": 0}, r"s\.resolution: expected a multiple of 8"),
    (enc.EncodeAConfig, {"heldout_fraction": 1.0}, r"s\.heldout_fraction"),
    (enc.EncodeAConfig, {"text_encoder": {"name": "ViT-Nope"}}, r"s\.text_encoder\.name: unknown open_clip model"),
    (ws.SampleConfig, {"prompts": []}, r"s\.prompts: give at least one prompt"),
    (ws.SampleConfig, {"image_size": 40}, r"s\.image_size: expected a multiple of 16"),
])
def test_bad_configs_name_the_key(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        build(cls, data, "s")


def test_configs_build_from_yaml_values():
    cfg = build(ws.StageBTrainConfig, {"overrides": {"c_hidden": [16, 32]}, "train": {"batch_size": 4}}, "s")
    assert ws.model_config("stage_b", cfg.preset, cfg.overrides, c_clip=64).c_hidden == (16, 32)
    assert build(enc.EncodeSemanticConfig, {}, "s").resolution == 0  # 0: take Stage B's
    assert enc.TextEncoderConfig("ViT-bigG-14").width == 1280 and enc.TextEncoderConfig().width == 64
    for stage in ws.STAGES:  # every stage's defaults are valid
        build(stage.config, {}, stage.name)


def test_paper_presets_keep_the_paper_text_widths():
    assert ws.model_config("stage_b", "paper", c_clip=enc.TextEncoderConfig("ViT-H-14").width).c_clip == 1024
    assert ws.model_config("stage_c", "paper", c_clip=enc.TextEncoderConfig("ViT-bigG-14").width).c_clip == 1280


# ---------------------------------------------------------------------------------------------- rows


def _jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_row_ids_are_stable_and_heldout_rows_are_dropped():
    ids = np.array([f"s{i}" for i in range(200)], dtype=object)
    a, b = enc.row_ids(ids), enc.row_ids(list(ids))
    assert a.dtype == np.int64 and (a == b).all() and len(set(a.tolist())) == 200 and (a >= 0).all()
    rows = enc.training_rows({"sample_id": ids, "x": np.arange(200)}, 0.2)
    assert 120 < len(rows["x"]) < 200 and (rows["row_id"] == enc.row_ids(rows["sample_id"])).all()
    assert (ids[rows["x"]] == rows["sample_id"]).all()  # columns stay aligned


def test_image_column_is_found_or_the_error_lists_the_columns(tmp_path):
    from tests.e2e.test_wuerstchen_stages import make_fake_shard

    shard = Store(str(tmp_path)).artifact("shard", "k")
    make_fake_shard(shard, 4, resolutions=(16, 32), files=1)
    assert enc.image_column(shard, 32, ("recaption",)) == "jpg_32"
    with pytest.raises(ValueError, match=r"no column 'jpg_64' \(columns: sample_id, key, caption.*jpg_16, jpg_32\)"):
        enc.image_column(shard, 64)
    with pytest.raises(ValueError, match="no column 'nope'"):
        enc.image_column(shard, 16, ("nope",))
    rows = enc.head_rows(shard, ["jpg_16"], 3, heldout_fraction=0.0)
    assert len(rows["jpg_16"]) == 3 and isinstance(rows["jpg_16"][0], bytes)


def test_decode_images_range_shape_and_resize():
    x = enc.decode_images([_jpeg(0, 32), _jpeg(1, 48)], 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1


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
    e = enc.WuerstchenEncoder("jpg_64", "recaption", enc.TextEncoderConfig(), stage_a=a_art, compressor=b_art,
                              keep_image=True, device="cpu")
    out = e(batch)
    assert set(out) == {"sample_id", "row_id", "latent_a", "latent_sem", "text_tokens", "jpg_64"}
    assert out["latent_a"].shape == (3, 4, 16, 16) and out["latent_a"].dtype == np.float16
    assert out["latent_sem"].shape == (3, 16, 4, 4) and out["text_tokens"].shape == (3, 77, 64)
    x = torch.from_numpy(enc.decode_images(batch["jpg_64"], 64))
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
    plain = enc.WuerstchenEncoder("jpg_64", "caption", enc.TextEncoderConfig(), device="cpu")(batch)
    assert set(plain) == {"sample_id", "row_id", "text_tokens"}


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
        folder = tmp_path / sw.OFFICIAL_SUBDIR[kind]
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
        loaded = sw.load_official(str(tmp_path), kind)
        assert loaded.cfg == m.cfg, kind
        ref = m.state_dict()
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, ref[k]), (kind, k)
    # The component folder itself works too.
    assert sw.load_official(str(tmp_path / "prior"), "stage_c").cfg == nets["stage_c"].cfg
    with pytest.raises(FileNotFoundError):
        sw.load_official(str(tmp_path / "nothing"), "stage_c")


# ---------------------------------------------------------------------------------------------- sampling


def _tiny_set() -> sw.ModelSet:
    torch.manual_seed(0)
    w = enc.TextEncoderConfig().width
    b = StageB(ws.model_config("stage_b", "tiny", c_clip=w)).eval()
    c = StageC(ws.model_config("stage_c", "tiny", c_clip=w)).eval()
    with torch.no_grad():  # untrained heads are zero: make the output depend on the noise
        b.head[1].weight.normal_(std=0.1)
        c.proj_out.weight.normal_(std=0.1)
    comp = dataclasses.asdict(ws.model_config("compressor", "tiny"))
    return sw.ModelSet(stage_a=StageA().eval(), stage_b=b, stage_c=c, text_c=enc.TextEncoderConfig(),
                       text_b=enc.TextEncoderConfig(), compressor=comp, image_size=32)


def test_generate_is_seeded_and_writes_the_sample_artifact(tmp_path):
    ms = _tiny_set()
    cfg = ws.SampleConfig(prompts=["a red circle", "a blue square"], n_per_prompt=2, steps_c=5, steps_b=3, seed=7)
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
