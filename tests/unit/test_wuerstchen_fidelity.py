"""Würstchen against the official code (issue 12, items 1-5): the text path with the padding mask,
synchronised compressor BatchNorm and v2's affine BN, decoding outside the step, v1's semantic
noise space, Stage A's optional GAN term and the re-estimated latent scale."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from genmodels.wuerstchen import (
    PatchDiscriminator,
    SemanticCompressor,
    StageA,
    StageALossConfig,
    StageBLossConfig,
    SyncBatchNorm2d,
    convert_sync_batchnorm,
    estimate_latent_scale,
    stage_a_disc_loss,
    stage_a_loss,
)
from genmodels.wuerstchen.diffusion import alpha_bar
from genmodels.wuerstchen.stage_a import hinge_d_loss
from genmodels.wuerstchen.steps import perturb_semantic
from tests.unit.wuerstchen_bn_worker import bn_worker, images
from workflows import shard_data
from workflows.wuerstchen import models as wm
from workflows.wuerstchen import official
from workflows.wuerstchen import stages as ws

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---------------------------------------------------------------------------------------------- 1. text path


def _tiny_hf_clip(folder: str) -> None:
    """A random 2-layer CLIPTextModelWithProjection and a CLIPTokenizer with CLIP's real BPE (open_clip
    ships it), saved as a diffusers pipeline saves its text_encoder / tokenizer folders."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    st = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip -> HF names
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({special.get(k, k): v for k, v in st.encoder.items()}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in sorted(st.bpe_ranks, key=st.bpe_ranks.get)))
    # pad "!" (id 0) as LAION's CLIP tokenizers
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!",
                        model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=len(st.encoder), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=16, hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


PROMPTS = ["a red circle on a white background", "", "tiny " * 120]  # short, empty (CFG), truncated


def test_hf_text_path_matches_diffusers_encode_prompt(tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = str(tmp_path / "text_encoder")
    _tiny_hf_clip(folder)
    text = wm.TextEncoderConfig(name=folder, library="transformers")
    text.validate()
    assert text.width == 32
    enc = text.build()
    ours = enc(PROMPTS)

    # diffusers WuerstchenPriorPipeline._encode_prompt, step by step
    tokenizer, model = AutoTokenizer.from_pretrained(folder), CLIPTextModelWithProjection.from_pretrained(folder)
    t = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt")
    with torch.no_grad():
        ref = model(t.input_ids, attention_mask=t.attention_mask).last_hidden_state
        causal_only = model(t.input_ids).last_hidden_state  # what a causal-mask-only encoder gives
    assert ours["text"].shape == ref.shape == (3, 77, 32)
    assert (ours["text"] - ref).abs().max().item() <= 1e-5
    assert torch.equal(ours["text_mask"], t.attention_mask.bool())
    assert t.attention_mask.sum(1).tolist() == [9, 2, 77]
    # The padding mask matters: without it every padding state differs (the "up to ~3").
    assert (causal_only - ref)[0, 9:].abs().max() > 0.5 and (causal_only - ref)[0, :9].abs().max() < 1e-5
    assert (ours["text"] - causal_only).abs().max() > 0.5


def test_official_set_uses_the_pipelines_text_folders(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    b = official.official_text(str(tmp_path), "stage_b")
    assert (b.library, b.name, b.tokenizer) == ("transformers", str(tmp_path / "text_encoder"),
                                                str(tmp_path / "tokenizer"))
    c = official.official_text(str(tmp_path), "stage_c")  # no prior_text_encoder folder: the hub id
    assert (c.library, c.name) == ("transformers", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
    assert official.official_text(str(tmp_path), "stage_c", "/x").name == "/x"
    with pytest.raises(ValueError, match="pretrained: open_clip only"):
        wm.TextEncoderConfig(name="/x", pretrained="laion", library="transformers").validate()


# ---------------------------------------------------------------------------------------------- 2. BatchNorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_compressor_batchnorm_is_synchronised_over_two_workers(tmp_path):
    mp.spawn(bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    stats = [k for k in r0["state"] if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 5  # four backbone BNs + the mapper's
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # bit-identical on both workers

    # ... and equal to one process with nn.BatchNorm2d on the concatenated (global) batch.
    torch.manual_seed(0)
    ref = SemanticCompressor().train()
    ref(torch.cat([images(0), images(1)]))
    for k in stats:
        torch.testing.assert_close(r0["state"][k], ref.state_dict()[k], atol=1e-5, rtol=1e-5)
    # Without synchronisation the two workers' statistics differ (what the test guards against).
    torch.manual_seed(0)
    solo = SemanticCompressor().train()
    solo(images(0))
    assert (solo.state_dict()["mapper.1.running_mean"] - r0["state"]["mapper.1.running_mean"]).abs().max() > 1e-3


def test_sync_bn_is_plain_batchnorm_without_a_group_and_converts_in_place():
    torch.manual_seed(0)
    comp = SemanticCompressor().train()
    plain = SemanticCompressor().train()
    plain.load_state_dict(comp.state_dict())
    convert_sync_batchnorm(comp)
    assert sum(isinstance(m, SyncBatchNorm2d) for m in comp.modules()) == 5
    assert comp.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(comp(x), plain(x), atol=0, rtol=0)


def test_v2_compressor_with_affine_batchnorm_loads(tmp_path):
    torch.manual_seed(0)
    cfg = wm.model_config("compressor", "paper", {"pretrained": False, "bn_affine": True})
    v2 = SemanticCompressor(cfg).eval()
    with torch.no_grad():  # a learned scale/shift and statistics, as in the v2 checkpoint
        v2.mapper[1].weight.uniform_(0.5, 2.0)
        v2.mapper[1].bias.uniform_(-1.0, 1.0)
        v2.mapper[1].running_var.uniform_(0.5, 2.0)
    loaded = official.load_official_compressor({"effnet_state_dict": v2.state_dict()})
    assert loaded.cfg.bn_affine and loaded.mapper[1].affine
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), v2(x), atol=0, rtol=0)
        raw = v2.mapper[0](v2.backbone(((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                                      / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)))
    bn = v2.mapper[1]
    want = (raw - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    want = want * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # v3's non-affine BN cannot take them
        SemanticCompressor(wm.model_config("compressor", "paper", {"pretrained": False})).load_state_dict(
            v2.state_dict())


# ---------------------------------------------------------------------------------------------- 3. decoding


def test_stage_b_images_are_decoded_by_the_dataset_not_the_step():
    from tests.unit.test_wuerstchen_stages import _jpeg

    batch = {"row_id": np.arange(3), "jpg_64": np.array([_jpeg(i, 64) for i in range(2)] + [_jpeg(2, 96)],
                                                       dtype=object)}
    mapped = ws.decode_images(batch, "jpg_64", 64)
    assert "jpg_64" not in mapped and mapped["image"].dtype == np.uint8 and mapped["image"].shape == (3, 3, 64, 64)
    collated = ws._collate(mapped, ())
    assert collated["image"].dtype == torch.uint8  # the step converts on its device
    want = torch.from_numpy(shard_data.decode(batch["jpg_64"], 64))
    assert torch.equal(ws.image_float(collated["image"]), want)  # exactly the old in-step decode


# ---------------------------------------------------------------------------------------------- 4. semantic noise


def test_semantic_noise_in_v1_prior_space():
    z = torch.randn(8, 16, 3, 3)
    cfg = StageBLossConfig(p_sem_zero=0.0, p_sem_noise=1.0, sem_per_batch=False)
    assert cfg.sem_noise_space == "prior" and StageBLossConfig().sem_per_batch  # v1 by default
    torch.manual_seed(5)
    out = perturb_semantic(z, cfg)
    torch.manual_seed(5)  # replay the draws: (zero, noise) uniforms, t, eps
    torch.rand(2, 8)
    t = torch.rand(8) * 0.5
    eps = torch.randn_like(z)
    ab = alpha_bar(t).view(-1, 1, 1, 1)
    want = (ab.sqrt() * (z + 1) / 42 + (1 - ab).sqrt() * eps) * 42 - 1  # noised in (z + 1) / 42, mapped back
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    std = perturb_semantic(z, StageBLossConfig(p_sem_zero=0.0, p_sem_noise=1.0, sem_per_batch=False,
                                               sem_noise_space="standardized"))
    torch.testing.assert_close(std, ab.sqrt() * z + (1 - ab).sqrt() * eps, atol=1e-5, rtol=1e-5)
    # 42x the noise: at the same t the prior-space version leaves far less of z.
    ratio = (out - ab.sqrt() * (z + 1) + 1).std() / (std - ab.sqrt() * z).std()
    assert abs(ratio.item() - 42) < 1e-3


def test_semantic_augmentation_is_drawn_per_batch_as_v1():
    z = torch.randn(16, 16, 2, 2)
    torch.manual_seed(0)
    per_batch = [perturb_semantic(z, StageBLossConfig(p_sem_zero=0.5, p_sem_noise=0.0)) for _ in range(200)]
    zeroed = [(o == 0).flatten(1).all(1) for o in per_batch]
    assert all(m.all() or not m.any() for m in zeroed)  # the whole batch or none of it
    assert 0.35 < np.mean([m.all().item() for m in zeroed]) < 0.65
    torch.manual_seed(0)
    mixed = perturb_semantic(torch.randn(256, 4), StageBLossConfig(p_sem_zero=0.5, p_sem_noise=0.0,
                                                                  sem_per_batch=False))
    assert 0.35 < (mixed == 0).all(1).float().mean() < 0.65
    # v1: noise only when not zeroed, from a second draw: P(noise) = (1 - p_zero) * p_noise
    torch.manual_seed(1)
    cfg = StageBLossConfig(p_sem_zero=0.5, p_sem_noise=0.5, sem_per_batch=False)
    out = perturb_semantic(torch.ones(4000, 1), cfg)
    assert 0.22 < ((out != 0) & (out != 1)).float().mean() < 0.28


# ---------------------------------------------------------------------------------------------- 5. Stage A


def test_stage_a_adversarial_term_and_discriminator_step():
    torch.manual_seed(0)
    models = {"stage_a": StageA(), "discriminator": PatchDiscriminator((8, 16))}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    base = StageALossConfig()
    assert base.adversarial_weight == 0  # off by default
    torch.manual_seed(1)
    l0, logs0 = stage_a_loss(models, {"image": x}, base)
    assert "g_adv" not in logs0
    torch.manual_seed(1)
    l1, logs1, recon = stage_a_loss(models, {"image": x}, StageALossConfig(adversarial_weight=0.5), return_recon=True)
    g = -models["discriminator"](recon).mean()
    torch.testing.assert_close(l1 - l0, 0.5 * g, atol=1e-6, rtol=0)
    assert logs1["g_adv"] == pytest.approx(g.item(), abs=1e-5)  # spectral norm's power step per call
    d_loss, d_logs = stage_a_disc_loss(models, {"image": x}, recon)
    d_loss.backward()
    assert models["stage_a"].out_block[0].weight.grad is None  # D's loss never reaches the generator
    assert all(p.grad is not None for p in models["discriminator"].parameters())
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_d_loss(torch.zeros(3), torch.zeros(3)).item() == 1.0


def test_latent_scale_estimate_gives_unit_variance_latents():
    torch.manual_seed(0)
    a = StageA().eval()
    with torch.no_grad():
        a.to_latent[1].running_var.fill_(0.2)  # a latent std far from 1 / 0.3764
    xs = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
    est = estimate_latent_scale(a, xs)
    with torch.no_grad():
        raw = torch.cat([a._encode_raw(x) for x in xs])
    assert est["std"] == pytest.approx(raw.double().std().item(), rel=1e-9)
    assert est["elements"] == raw.numel()
    rescaled = StageA(wm.model_config("stage_a", "tiny", {"scale_factor": est["std"]})).eval()
    rescaled.load_state_dict(a.state_dict())
    with torch.no_grad():
        lat = torch.cat([rescaled.encode(x) for x in xs])
    assert lat.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(torch.cat([a.encode(x) for x in xs]).std().item() - 1.0) > 0.3  # 0.3764 would not give it


def test_stage_a_config_defaults():
    cfg = ws.StageATrainConfig()
    assert cfg.latent_scale == "estimate" and cfg.loss.adversarial_weight == 0
    assert ws.StageBTrainConfig().sync_bn
    assert isinstance(PatchDiscriminator()(torch.zeros(1, 3, 32, 32)), torch.Tensor)
    assert isinstance(convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))[0], SyncBatchNorm2d)
