"""The public Würstchen v2 weights in diffusers layout (DIR/prior, DIR/decoder, DIR/vqgan) as a
``ModelSet``, and the v2 semantic compressor (``load_official_compressor``).

Text encoders: transformers CLIP text models encoded with the tokenizer's padding mask, as
diffusers' ``WuerstchenPriorPipeline`` / ``WuerstchenDecoderPipeline._encode_prompt`` do
(pipelines/deprecated/wuerstchen): ViT-bigG-14 for C from DIR/prior_text_encoder +
DIR/prior_tokenizer, ViT-H-14 for B from DIR/text_encoder + DIR/tokenizer (the combined
pipeline's folder names), else the LAION hub ids that diffusers' scripts/convert_wuerstchen.py
built the pipelines from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from genmodels.clip import BIGG, H14
from genmodels.wuerstchen import COMPRESSOR_PRESETS, map_diffusers_state_dict
from workflows.wuerstchen.models import ModelSet, TextEncoderConfig, build_module, model_config

OFFICIAL_SUBDIR = {"stage_c": "prior", "stage_b": "decoder", "stage_a": "vqgan"}
# (model folder, tokenizer folder, hub id used when the folders are absent)
OFFICIAL_TEXT = {"stage_c": ("prior_text_encoder", "prior_tokenizer", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
                 "stage_b": ("text_encoder", "tokenizer", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")}
# The same models through open_clip (causal mask only: padding states differ from the official ones).
OPEN_CLIP_TEXT = {"stage_c": TextEncoderConfig(*BIGG), "stage_b": TextEncoderConfig(*H14)}


def _read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """diffusers weights in a folder: an index of shards, one file, or .bin; non-variant preferred."""
    files = sorted(os.listdir(folder))
    for ext, loader in ((".safetensors", load_file),
                        (".bin", lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        index = [f for f in files if f.endswith(f"{ext}.index.json")]
        if index:
            with open(os.path.join(folder, index[0])) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        else:
            shards = [f for f in files if f.endswith(ext)]
            plain = [f for f in shards if f == f"diffusion_pytorch_model{ext}"]
            shards = plain or shards[:1]
        if shards:
            sd: dict[str, torch.Tensor] = {}
            for f in shards:
                sd.update(loader(os.path.join(folder, f)))
            return sd
    raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weights")


def official_config(kind: str, cfg: dict[str, Any]):
    """diffusers config.json (WuerstchenPrior / WuerstchenDiffNeXt / PaellaVQModel) → our config."""
    g = cfg.get
    if kind == "stage_c":
        return model_config("stage_c", "paper", {"c_in": g("c_in", 16), "c": g("c", 1536), "c_clip": g("c_cond", 1280),
                                                 "c_r": g("c_r", 64), "depth": g("depth", 32), "nhead": g("nhead", 24),
                                                 "dropout": g("dropout", 0.1)})
    if kind == "stage_b":
        drop = g("dropout", 0.1)
        return model_config("stage_b", "paper", {k: v for k, v in {
            "c_in": g("c_in"), "c_r": g("c_r"), "patch_size": g("patch_size"), "c_cond": g("c_cond"),
            "c_hidden": g("c_hidden"), "nhead": [max(h, 0) for h in g("nhead")] if g("nhead") else None,
            "blocks": g("blocks"), "level_config": g("level_config"), "inject_sem": g("inject_effnet"),
            "c_sem": g("effnet_embd"), "c_clip": g("clip_embd"), "kernel_size": g("kernel_size"),
            "dropout": drop[0] if isinstance(drop, list) else drop}.items() if v is not None})
    if kind == "stage_a":
        if g("up_down_scale_factor", 2) != 2:
            raise ValueError("stage_a: only up_down_scale_factor=2 (f4) is supported")
        return model_config("stage_a", "paper", {k: v for k, v in {
            "c_in": g("in_channels"), "levels": g("levels"), "bottleneck_blocks": g("bottleneck_blocks"),
            "c_hidden": g("embed_dim"), "c_latent": g("latent_channels"), "codebook_size": g("num_vq_embeddings"),
            "scale_factor": g("scale_factor")}.items() if v is not None})
    raise ValueError(f"unknown kind {kind!r}; expected stage_a, stage_b or stage_c")


def load_official(directory: str, kind: str) -> nn.Module:
    """One public v2 network from a local diffusers-layout directory (the pipeline root or the
    component's own folder: config.json + diffusion_pytorch_model*.safetensors|.bin)."""
    folder = os.path.join(directory, OFFICIAL_SUBDIR[kind]) if kind in OFFICIAL_SUBDIR else directory
    if not os.path.isdir(folder):
        folder = directory
    cfg_path = os.path.join(folder, "config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    # The weights first: a folder without them fails now, not after a paper-size network is initialised.
    state = map_diffusers_state_dict(kind, _read_state_dict(folder))
    module = build_module(kind, official_config(kind, cfg))
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)


def official_text(directory: str, kind: str, override: str = "") -> TextEncoderConfig:
    """Stage ``kind``'s text encoder as the official pipeline runs it (transformers + padding mask).
    ``override``: a transformers CLIP text model directory or hub id (its tokenizer beside it)."""
    model_dir, tok_dir, hub_id = OFFICIAL_TEXT[kind]
    if override:
        return TextEncoderConfig(name=override, library="transformers")
    model_path, tok_path = os.path.join(directory, model_dir), os.path.join(directory, tok_dir)
    if os.path.isdir(model_path):
        return TextEncoderConfig(name=model_path, library="transformers",
                                 tokenizer=tok_path if os.path.isdir(tok_path) else "")
    return TextEncoderConfig(name=hub_id, library="transformers")


def load_official_set(directory: str, clip_c: str = "", clip_b: str = "") -> ModelSet:
    """The three v2 networks and their text encoders (``official_text``); ``clip_c`` / ``clip_b``
    replace the text encoders' location (e.g. a local copy on an offline machine)."""
    return ModelSet(stage_a=load_official(directory, "stage_a"), stage_b=load_official(directory, "stage_b"),
                    stage_c=load_official(directory, "stage_c"), text_c=official_text(directory, "stage_c", clip_c),
                    text_b=official_text(directory, "stage_b", clip_b),
                    compressor=dataclasses.asdict(COMPRESSOR_PRESETS["paper"]), image_size=1024)


def load_official_compressor(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The v2 semantic compressor from its state dict (``effnet_state_dict`` of the v2 Stage B
    checkpoint, as diffusers' examples/research_projects/wuerstchen loads it into its
    ``EfficientNetEncoder``). Its names are ours (``backbone.*``, ``mapper.0``, ``mapper.1``); its
    final BatchNorm has a learned scale/shift (``mapper.1.weight`` / ``.bias``), which v3's
    compressor dropped (affine=False), so ``bn_affine`` follows the weights."""
    sd = state_dict.get("effnet_state_dict", state_dict)
    cfg = dataclasses.replace(COMPRESSOR_PRESETS["paper"], pretrained=False, bn_affine="mapper.1.weight" in sd)
    module = build_module("compressor", cfg)
    module.load_state_dict(sd, strict=True)
    return module.eval().requires_grad_(False)
