"""CLIP through open_clip: one place that builds it and reads token states out of it.

Würstchen conditions Stage C on CLIP-bigG/14 and Stage B on CLIP-H/14 *token states*
(77×width, not pooled; Würstchen §3, wuerstchen.md); the data filter and the CLIP score use
the pooled, projected embeddings. ``tiny-clip`` is a random 2-layer model registered here so
that every path runs offline; paper names load real weights with a pretrained tag.

``TextEncoder.from_hf`` wraps a transformers ``CLIPTextModel(WithProjection)`` and its tokenizer
instead (the public Würstchen v2 weights were trained and are sampled with those): it encodes
exactly as diffusers' Würstchen pipelines do, padding mask included (see the method).
"""

from __future__ import annotations

import functools
from importlib import resources

import torch
import torch.nn.functional as F

TINY = "tiny-clip"


@functools.cache
def open_clip_lib():
    """open_clip, imported on first use with ``tiny-clip`` registered. Importing it (torchvision and
    transformers come with it) costs ~5 s of CPU, which every process that only imports a stage
    module would pay: the CLI, Ray Train's controller, workers that never build a CLIP."""
    import open_clip

    open_clip.add_model_config(resources.files("genmodels") / "configs" / f"{TINY}.json")
    return open_clip


# Paper encoders (pretrained tags as published by open_clip / LAION).
BIGG = ("ViT-bigG-14", "laion2b_s39b_b160k")  # Würstchen Stage C
H14 = ("ViT-H-14", "laion2b_s32b_b79k")  # Würstchen Stage B
B32 = ("ViT-B-32", "laion2b_s34b_b79k")  # data filter (LAION's CLIP ≥ 0.28 threshold is for B/32)


def build_clip(name: str = TINY, pretrained: str | None = None, seed: int = 0):
    """(model, preprocess, tokenizer). ``pretrained`` is an open_clip tag or a local checkpoint path;
    ``None`` gives random weights (seeded, so tiny models are the same on every worker)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, _, preprocess = open_clip_lib().create_model_and_transforms(name, pretrained=pretrained)
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip_lib().get_tokenizer(name)


def text_width(model) -> int:
    return model.ln_final.normalized_shape[0]


def embed_dim(model) -> int:
    proj = model.text_projection
    return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]


def image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


@torch.no_grad()
def encode_text_tokens(model, tokens: torch.Tensor) -> torch.Tensor:
    """Last-layer token states after ``ln_final``, shape (B, L, width): encode_text without pooling."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@torch.no_grad()
def encode_text_pooled(model, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return model.encode_text(tokens, normalize=normalize)


@torch.no_grad()
def encode_image(model, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Images already preprocessed (CLIP mean/std, model resolution)."""
    return model.encode_image(images, normalize=normalize)


# open_clip's OPENAI_DATASET_MEAN / _STD, the normalisation every CLIP here was trained with.
_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def preprocess_tensor(model, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] NCHW (as generators output them) to CLIP's input: resize + normalise."""
    size = image_size(model)
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = ((x.clamp(-1, 1) + 1) / 2 - _MEAN.to(x.device)) / _STD.to(x.device)
    return x


class TextEncoder(torch.nn.Module):
    """Captions -> CLIP token states, the one text encoder of both families.

    Returns ``text`` (B, L, width) last-layer token states (Würstchen §3: Stages B/C attend to
    the unpooled states), ``text_mask`` (B, L) true on real tokens, and ``text_embed`` (B, D)
    the pooled, projected embedding (PaGoDA's CLIP term). The text transformer is causal, so the
    first L states of a full encoding equal an encoding of L tokens; ``tokens=0`` keeps the
    whole context (77 for CLIP). ``pooled=False`` skips ``text_embed`` (a second text pass),
    for callers that only condition on the token states (Würstchen). ``pooled_token=True`` makes
    ``text`` the pooled, projected embedding as one token (B, 1, D), for a network that only adds a
    pooled text vector to its time embedding (PaGoDA's micro teacher): CLIP's contrastive objective
    shapes that embedding (Radford et al. 2021, Sec. 2.3), while the mean of the token states is
    dominated by what every caption shares (template words, positions).
    """

    def __init__(self, name: str = TINY, pretrained: str = "", tokens: int = 0, pooled: bool = True,
                 pooled_token: bool = False):
        super().__init__()
        self.tokens, self.pooled, self.pooled_token = tokens, pooled, pooled_token
        self.hf = False
        if name:  # from_hf passes "" and sets clip / tokenizer itself
            self.clip, _, self.tokenizer = build_clip(name, pretrained or None)

    @classmethod
    def from_hf(cls, model: torch.nn.Module, tokenizer, tokens: int = 0, pooled: bool = False) -> TextEncoder:
        """Wrap a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and its tokenizer.

        Encodes as diffusers' ``WuerstchenPriorPipeline._encode_prompt`` and
        ``WuerstchenDecoderPipeline._encode_prompt`` (pipelines/deprecated/wuerstchen): pad to the
        tokenizer's ``model_max_length`` (77), truncate, and pass the tokenizer's
        ``attention_mask`` with the ids, so the padding positions attend only to the real tokens
        (causal mask AND padding mask); ``text`` is ``last_hidden_state`` (after the final
        LayerNorm, not pooled). The open_clip path applies the causal mask only, which leaves the
        real tokens' states equal but changes every padding state, and Stages B/C attend to all 77.
        ``text_embed`` is the projected EOS state (``text_embeds``), L2-normalised like open_clip's.
        """
        enc = cls("", tokens=tokens, pooled=pooled)
        enc.clip, enc.tokenizer, enc.hf = model.eval().requires_grad_(False), tokenizer, True
        return enc

    @property
    def width(self) -> int:
        return self.clip.config.hidden_size if self.hf else text_width(self.clip)

    def _forward_hf(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        out = self.clip(ids, attention_mask=mask)
        keep = self.tokens or ids.shape[1]
        res = {"text": out.last_hidden_state[:, :keep].float(), "text_mask": mask[:, :keep].bool()}
        if self.pooled:
            embed = getattr(out, "text_embeds", None)
            if embed is None:
                raise ValueError("pooled=True needs a CLIPTextModelWithProjection (text_embeds)")
            res["text_embed"] = F.normalize(embed.float(), dim=-1)
        return res

    @torch.no_grad()
    def forward(self, captions) -> dict[str, torch.Tensor]:
        device = next(self.clip.parameters()).device
        if self.hf:
            return self._forward_hf([str(c) for c in captions], device)
        tok = self.tokenizer([str(c) for c in captions]).to(device)
        keep = self.tokens or tok.shape[1]
        if self.pooled_token:
            embed = encode_text_pooled(self.clip, tok).float()
            return {"text": embed[:, None], "text_mask": torch.ones(len(tok), 1, dtype=torch.bool, device=device),
                    "text_embed": embed}
        out = {"text": encode_text_tokens(self.clip, tok)[:, :keep].float(), "text_mask": tok[:, :keep] != 0}
        if self.pooled:
            out["text_embed"] = encode_text_pooled(self.clip, tok).float()
        return out


def text_dims(name: str) -> tuple[int, int]:
    """(token width, pooled width) of an open_clip model config, without building the model."""
    cfg = open_clip_lib().get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}")
    return int(cfg["text_cfg"]["width"]), int(cfg["embed_dim"])


def contrastive_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): cross-entropy of the scaled cosine
    similarities over images per caption and over captions per image, on L2-normalised embeddings.

    ``tokens`` (B, L): rows with the same caption are each other's positives (the target spreads
    evenly over them), as small datasets repeat captions within a batch; None: the diagonal only.
    """
    logits = logit_scale.exp() * image_embed @ text_embed.T
    if tokens is None:
        target = torch.eye(len(logits), device=logits.device)
    else:
        target = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
        target = target / target.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
