"""Callable classes for Ray Data ``map_batches``: each loads its model once, in ``__init__``.

* :class:`ClipScorer` — open_clip image + text embeddings, CLIP similarity (cosine of the
  normalised embeddings, LAION's filter score), and any configured :class:`EmbeddingHead`
  (aesthetic, watermark, NSFW) on the image embedding.
* :class:`LlavaCaptioner` — LLaVA via transformers ``LlavaForConditionalGeneration`` (+ its
  processor), greedy ``generate`` on a batch of images with one prompt.

Each picks CUDA when the actor was given a GPU (``num_gpus`` in ``map_batches``), bf16 there,
fp32 on CPU. Pretrained weights load through each library's normal call (an open_clip
``pretrained`` tag, ``from_pretrained(model_id)``); the tiny offline models go through the
exact same calls.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from data_prep import tiny_llava
from data_prep.images import clean_caption
from data_prep.partitions import arrow_column
from pipeline.store import filesystem

# open_clip (and genmodels.clip, which imports it) and transformers are imported inside the
# functions that use them: each takes seconds to import, and a CLIP worker never needs
# transformers nor a captioner worker open_clip.


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def clip_transform(name: str, pretrained: str | None = None):
    """open_clip's own validation transform for ``name``/``pretrained``, built from configs only.

    CPU preprocessing tasks use it so that they need not build (or download) the model.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # lazy: see the top

    from genmodels.clip import open_clip_lib

    open_clip = open_clip_lib()  # with tiny-clip registered
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        known = ", ".join(open_clip.list_models()[:8])
        raise ValueError(f"clip model {name!r}: unknown to open_clip (known: {known}, ...)")
    pp = merge_preprocess_dict(dataclasses.asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    pp["size"] = model_cfg["vision_cfg"].get("image_size", pp["size"])
    if pretrained and not os.path.exists(pretrained):
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(name, pretrained) or {})
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


# ---------------------------------------------------------------------------------------------
# Heads on CLIP image embeddings
# ---------------------------------------------------------------------------------------------


def _head_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a head file, local or on object storage (``s3://``: a
    cluster's nodes share the heads there, as ``cluster.yaml`` has them)."""
    if "://" in path:
        fs, inner = filesystem(path)
        with fs.open_input_file(inner) as f:
            data = f.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    if path.endswith(".safetensors"):
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the format's JSON header
        return load_safetensors(data), header.get("__metadata__") or {}
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state, {}


class EmbeddingHead:
    """A small MLP on L2-normalised CLIP image embeddings, loaded from a state dict.

    Accepted layouts (``.safetensors`` or a torch ``.pt``/``.pth`` state dict):

    * ``weight``/``bias`` — one linear layer (LAION's ``sa_0_4_vit_l_14_linear.pth`` aesthetic head);
    * ``layers.<i>.weight``/``layers.<i>.bias`` — linear layers applied in index order (LAION's
      improved aesthetic predictor; its Dropouts are identity at inference and it has no
      activations). A safetensors file may set metadata ``hidden_activation`` to ``relu``/``gelu``.

    ``kind="score"`` returns the raw output (aesthetic, 1-10); ``kind="probability"`` returns a
    sigmoid of one logit or the softmax of the last of two (watermark, NSFW).
    """

    def __init__(self, path: str, kind: str = "score"):
        state, meta = _head_file(path)
        if "weight" in state:
            pairs = [(state["weight"], state.get("bias"))]
        else:
            idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
            if not idx:
                raise ValueError(f"{path}: not a linear head (keys: {', '.join(list(state)[:6])})")
            pairs = [(state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")) for i in idx]
        for (w, _), (w2, _) in itertools.pairwise(pairs):
            if w.shape[0] != w2.shape[1]:
                raise ValueError(f"{path}: layer shapes do not chain ({tuple(w.shape)} then {tuple(w2.shape)})")
        self.weights = [(w.float(), None if b is None else b.float()) for w, b in pairs]
        self.in_dim = int(pairs[0][0].shape[1])
        self.out_dim = int(pairs[-1][0].shape[0])
        self.activation = meta.get("hidden_activation", "none")
        if self.activation not in ("none", "relu", "gelu"):
            raise ValueError(f"{path}: hidden_activation {self.activation!r} (none, relu, gelu)")
        if kind not in ("score", "probability"):
            raise ValueError(f"kind: {kind!r} (score, probability)")
        if kind == "probability" and self.out_dim not in (1, 2):
            raise ValueError(f"{path}: a probability head needs 1 or 2 outputs, has {self.out_dim}")
        self.kind = kind

    def to(self, device: str) -> EmbeddingHead:
        self.weights = [(w.to(device), None if b is None else b.to(device)) for w, b in self.weights]
        return self

    def __call__(self, emb) -> np.ndarray:
        x = F.normalize(emb.float(), dim=-1)
        for i, (w, b) in enumerate(self.weights):
            x = F.linear(x, w, b)
            if i < len(self.weights) - 1 and self.activation != "none":
                x = F.relu(x) if self.activation == "relu" else F.gelu(x)
        if self.kind == "probability":
            x = torch.sigmoid(x[:, 0]) if self.out_dim == 1 else torch.softmax(x, dim=-1)[:, -1]
        else:
            x = x[:, 0]
        return x.cpu().numpy().astype(np.float32)


def save_head(path: str, layers: list[tuple[Any, Any]], hidden_activation: str = "none") -> str:
    """Write a head in the ``layers.<i>`` safetensors layout (used to make test heads)."""
    state = {}
    for i, (w, b) in enumerate(layers):
        state[f"layers.{i}.weight"] = w.contiguous()
        state[f"layers.{i}.bias"] = b.contiguous()
    save_file(state, path, metadata={"hidden_activation": hidden_activation})
    return path


# ---------------------------------------------------------------------------------------------
# CLIP scorer
# ---------------------------------------------------------------------------------------------

HEADS = {"aesthetic": "score", "pwatermark": "probability", "punsafe": "probability"}


class ClipScorer:
    """Batch in: ``pixels`` (N, 3, S, S, already CLIP-preprocessed) and ``caption``; batch out:
    every other input column plus ``clip_sim``, ``embedding`` (normalised, float16) and one
    column per head in :data:`HEADS` (null where that head is not configured).

    ``heads`` maps a head name to a weights path (or ``None``: skipped).
    """

    def __init__(self, model: str, pretrained: str | None, heads: dict[str, str | None]):
        from genmodels.clip import build_clip, embed_dim  # lazy: see the note at the top

        self.device = _device()
        self.model, _, self.tokenizer = build_clip(model, pretrained)
        self.model = self.model.to(self.device)
        dim = embed_dim(self.model)
        self.heads = {}
        for name, path in heads.items():
            if not path:
                continue
            head = EmbeddingHead(path, HEADS[name])
            if head.in_dim != dim:
                raise ValueError(f"{name} head {path}: expects {head.in_dim}-d embeddings, {model} gives {dim}")
            self.heads[name] = head.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        with torch.inference_mode():  # scoped: a global switch would leak into the caller's process
            return self._score(batch)

    def _score(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from genmodels.clip import encode_image, encode_text_pooled  # lazy: see the note at the top

        n = len(batch["caption"])
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device, torch.float32)
        tokens = self.tokenizer([str(c) for c in batch["caption"]]).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            img = encode_image(self.model, pixels).float()
            txt = encode_text_pooled(self.model, tokens).float()
        sim = (img * txt).sum(-1).cpu().numpy().astype(np.float32)
        emb = img.cpu().numpy().astype(np.float16)
        cols = {k: v for k, v in batch.items() if k != "pixels"}
        table = pa.table({k: arrow_column(v) for k, v in cols.items()})
        table = table.append_column("clip_sim", pa.array(sim))
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        table = table.append_column("embedding", embedding)
        for name in HEADS:
            values = pa.array(self.heads[name](img)) if name in self.heads else pa.nulls(n, pa.float32())
            table = table.append_column(name, values)
        return table


# ---------------------------------------------------------------------------------------------
# LLaVA captioner
# ---------------------------------------------------------------------------------------------


class LlavaCaptioner:
    """Batch in: ``image`` (N, S, S, 3 uint8) + any columns; out: the columns + ``recaption``.

    ``model`` is a hub id (``llava-hf/llava-1.5-7b-hf``), a local ``save_pretrained`` dir, or
    ``tiny`` (:func:`data_prep.tiny_llava.resolve`);
    ``prompt`` must contain the processor's image token (``<image>``). Greedy decoding, so a
    rerun writes the same captions.
    """

    def __init__(self, model: str, prompt: str, max_new_tokens: int):
        from transformers import AutoProcessor, LlavaForConditionalGeneration  # lazy: see the note at the top

        self.clean = clean_caption
        self.device = _device()
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        model = tiny_llava.resolve(model)
        self.processor = AutoProcessor.from_pretrained(model)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        token = getattr(self.processor, "image_token", "<image>")
        if token not in prompt:
            raise ValueError(f"recaption.prompt: must contain the image token {token!r}, got {prompt!r}")
        self.model = LlavaForConditionalGeneration.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return self._caption(batch)

    def _caption(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {k: v for k, v in batch.items() if k != "image"}
        if len(batch["image"]) == 0:
            return result | {"recaption": np.array([], dtype=object)}
        images = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in batch["image"]]
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        result["recaption"] = np.array([self.clean(t) for t in texts], dtype=object)
        return result

