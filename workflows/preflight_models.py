"""What one training image costs each model stage, counted on the ``meta`` device (no weights, no GPU).

For every training stage the networks are built exactly as the stage builds them (presets, overrides,
text widths from the configured encoders, growth chains) and one image goes through forward and
backward under ``torch.utils.flop_counter``'s per-op formulas; the tensors autograd saves for backward
are summed by a ``saved_tensors_hooks`` pair: that is the activation estimate per image (fp32; bf16
autocast roughly halves it). Networks are built without activation checkpointing, so recomputation is
never counted (MFU is on model FLOPs); what checkpointing saves is modelled in ``measure``. Every op's
result metadata and every built network is cached for the process, so a preflight of the whole paper
table takes seconds. Frozen networks (Stage A beside B, the discriminator's backbone, the
perceptual nets) count in total parameters, not in trainable ones.

The same builders serve the encode / inversion stages (forward only) and ``benchmarks/bench_wuerstchen.py
--flops-only``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from genmodels.clip import open_clip_lib, text_dims
from genmodels.pagoda import EDMPrecond, Generator, GeneratorConfig, GrowthConfig, UNet, UNetConfig, grow_2x
from genmodels.wuerstchen import SemanticCompressor, StageA, StageB, StageC
from genmodels.wuerstchen.diffusion import eps_loss
from workflows.pagoda.models import teacher_unet
from workflows.pagoda.stages import build_discriminator, build_perceptual, growth_config
from workflows.train.config import TrainConfig
from workflows.wuerstchen.models import model_config, sem_latent_size

META = torch.device("meta")
TOKENS = 77  # CLIP context: Würstchen's B and C attend to all 77 token states


@dataclass(frozen=True)
class Footprint:
    """One training image through a stage's networks (forward + backward)."""

    params: int  # every network the stage holds on a GPU
    trainable: int
    flops: float  # per image, forward + backward
    activation_bytes: float  # saved for backward, per image, fp32


def _n(mods: Iterable[nn.Module], trainable: bool = False) -> int:
    seen: set[int] = set()
    out = 0
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable):
                seen.add(id(p))
                out += p.numel()
    return out


# Output metadata and FLOPs of every op seen, by the shapes, strides and dtypes of its arguments. On meta
# tensors most ops run a Python meta kernel (decompositions into torch._refs and prims, each prim a custom
# op with a fake impl): ~0.3 ms an op, 24k ops for Stage B's forward and backward, and as many again for
# spectral norm's power iterations when the discriminator is built. A model repeats the same few shapes
# block after block and stage after stage (the growth rows share G's trunk, D and the perceptual nets),
# so after the first occurrence an op costs a dict look-up and an empty_strided.
_OPS: dict[tuple, tuple[Any, int]] = {}
_KIND: dict[Any, str] = {}


def _kind(func: Any) -> str:
    """"pure": returns fresh tensors only, a function of the arguments' metadata (rebuilt empty on a hit);
    "inplace": writes its first argument and returns it, metadata unchanged (returned as is on a hit);
    "": anything else (views, out=, metadata-changing in-place ops) always runs."""
    kind = _KIND.get(func)
    if kind is None:
        s = func._schema
        writes = [a for a in s.arguments if a.alias_info is not None and a.alias_info.is_write]
        if not s.is_mutable and all(r.alias_info is None and str(r.type) in ("Tensor", "Optional[Tensor]")
                                    for r in s.returns):
            kind = "pure"
        elif (len(writes) == 1 and writes[0] is s.arguments[0] and str(writes[0].type) == "Tensor"
              and len(s.returns) == 1 and s.returns[0].alias_info is not None
              and s.returns[0].alias_info.before_set == writes[0].alias_info.before_set
              and torch.Tag.inplace_view not in func.tags):
            kind = "inplace"
        else:
            kind = ""
        _KIND[func] = kind
    return kind


def _sig(a: Any) -> Any:
    if isinstance(a, Tensor):
        return a.shape, a.stride(), a.dtype, a.device
    if isinstance(a, (list, tuple)):
        return tuple(_sig(x) for x in a)
    return type(a), a  # 1 and 1.0 promote differently


def _spec(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.shape, out.stride(), out.dtype, out.device
    return out if out is None else tuple(_spec(o) for o in out)


def _on_meta(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.device.type == "meta"
    return out is None or all(_on_meta(o) for o in out)


def _rebuild(spec: Any) -> Any:
    if spec is None:
        return None
    if isinstance(spec[0], torch.Size):
        return torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=spec[3])
    return tuple(_rebuild(s) for s in spec)


class FlopCounter(TorchDispatchMode):
    """FlopCounterMode's count (its ``flop_registry`` of per-op formulas) without its module tracker,
    which costs more than the ops themselves on meta tensors (measured 2x on Stage C), and with the
    metadata cache above."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind, key = _kind(func), None
        if kind:
            key = func, _sig(args), _sig(tuple(sorted(kwargs.items())))
            hit = _OPS.get(key)
            if hit is not None:
                self.total += hit[1]
                return _rebuild(hit[0]) if kind == "pure" else args[0]
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        self.total += flops
        if key is not None and _on_meta(out):  # values on another device may be read: never rebuilt empty
            _OPS[key] = (_spec(out) if kind == "pure" else None), flops
        return out


def measure(held: list[nn.Module], trained: list[nn.Module], loss: Callable[[], Tensor],
            checkpointed: Iterable[nn.Module] = ()) -> Footprint:
    """FLOPs and saved activations of ``loss().backward()`` for one image, on meta tensors.

    The networks are built without activation checkpointing: MFU is defined on model FLOPs, so the
    forward that checkpointing recomputes in backward must not be counted (it is time the GPU spends, not
    work the projection credits), and not running it halves the count's cost. ``checkpointed`` are the
    modules the stage wraps in ``torch.utils.checkpoint`` when it trains: checkpointing keeps their inputs,
    and what they save is recomputed in backward one module at a time, so the estimate is what the rest
    saves, plus their inputs, plus the largest of them (the recompute peak)."""
    inside: dict[int, int] = {}
    kept: dict[int, Tensor] = {}  # the checkpointed modules' inputs, each tensor once (referenced: ids stay unique)
    current: list[int] = []
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        n = t.numel() * t.element_size()
        if current:
            inside[current[-1]] = inside.get(current[-1], 0) + n
        else:
            saved[0] += n
        return t

    def enter(mod: nn.Module, args: Any) -> None:
        current.append(id(mod))
        kept.update({id(a): a for a in args if isinstance(a, Tensor)})

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays
        current.pop()

    hooks = [h for m in checkpointed for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with FlopCounter() as fc:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = loss()
            out.backward()
    finally:
        for h in hooks:
            h.remove()
    return Footprint(params=_n(held), trainable=_n(trained, trainable=True), flops=float(fc.total),
                     activation_bytes=float(saved[0] + sum(t.numel() * t.element_size() for t in kept.values())
                                            + max(inside.values(), default=0)))


def forward_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one forward call (inference stages)."""
    with FlopCounter() as fc, torch.no_grad():
        fn()
    return float(fc.total)


@contextmanager
def _meta() -> Iterator[None]:
    """Build on the meta device through the op cache: construction repeats shapes too (weight init, and
    spectral norm's power iterations on every discriminator layer, costlier than D's forward)."""
    with META, FlopCounter():
        yield


_NETS: dict[Any, nn.Module] = {}


def _net(key: Any, build: Callable[[], nn.Module]) -> nn.Module:
    """One meta network per key for the whole preflight (stages share the teacher, G's growth chain, D
    and the perceptual nets). Measuring does not change a network: backward only fills meta ``.grad``."""
    if key not in _NETS:
        with _meta():
            _NETS[key] = build()
    return _NETS[key]


def _key(x: Any) -> Any:
    """A hashable stand-in for a stage config: a footprint is per image, so of the training settings
    only activation checkpointing (which modules keep their activations) enters it."""
    if isinstance(x, TrainConfig):
        return "train", x.activation_checkpointing
    if dataclasses.is_dataclass(x):
        return type(x).__name__, tuple((f.name, _key(getattr(x, f.name))) for f in dataclasses.fields(x))
    if isinstance(x, dict):
        return tuple(sorted((k, _key(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_key(v) for v in x)
    return x


_MEMO: dict[Any, Any] = {}
R = TypeVar("R")


def memo(fn: Callable[..., R]) -> Callable[..., R]:
    """Cache ``fn``'s result by its arguments' ``_key``: the same networks at the same sizes are measured
    once per process (several --stages runs, the tests' presets, a refusal after a pass)."""
    @functools.wraps(fn)
    def cached(*args: Any) -> R:
        k = fn.__name__, _key(args)
        if k not in _MEMO:
            _MEMO[k] = fn(*args)
        return _MEMO[k]
    return cached


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, device=META)


# ------------------------------------------------------------------------------------------
# Würstchen (arXiv 2306.00637): the three networks as workflows/wuerstchen/stages.py builds them


@memo
def wuerstchen_stage_a(cfg: Any) -> Footprint:
    with _meta():
        a = StageA(model_config("stage_a", cfg.preset, cfg.overrides))
    r = cfg.resolution

    def loss() -> Tensor:
        x = _x(1, 3, r, r)
        recon, vq = a(x)
        return (recon - x).pow(2).mean() + vq

    return measure([a], [a], loss)


def stage_b_nets(cfg: Any, a_cfg: Any, text_width: int) -> dict[str, nn.Module]:
    comp_cfg = model_config("compressor", cfg.compressor_preset, cfg.compressor_overrides, pretrained=False)
    a_net = model_config("stage_a", a_cfg.preset, a_cfg.overrides)
    with _meta():
        return {"stage_a": StageA(a_net), "compressor": SemanticCompressor(comp_cfg),
                "stage_b": StageB(model_config("stage_b", cfg.preset, cfg.overrides, c_in=a_net.c_latent,
                                               c_clip=text_width, c_sem=comp_cfg.c_latent))}


@memo
def wuerstchen_stage_b(cfg: Any, a_cfg: Any, resolution: int, text_width: int) -> Footprint:
    """Stage B jointly with the semantic compressor on precomputed Stage A latents (A frozen, held for previews)."""
    m = stage_b_nets(cfg, a_cfg, text_width)
    lat, c = resolution // 4, m["stage_b"].cfg.c_in

    def loss() -> Tensor:
        sem = m["compressor"](_x(1, 3, resolution, resolution))
        return eps_loss(m["stage_b"], _x(1, c, lat, lat), {"sem": sem, "text": _x(1, TOKENS, text_width)})[0]

    b = m["stage_b"]
    levels = [*b.down, *b.up] if cfg.train.activation_checkpointing else ()  # what StageB._run checkpoints
    return measure(list(m.values()), [b, m["compressor"]], loss, levels)


@memo
def semantic_size(b_cfg: Any, resolution: int) -> tuple[int, int]:
    comp_cfg = model_config("compressor", b_cfg.compressor_preset, b_cfg.compressor_overrides)
    return sem_latent_size(comp_cfg, resolution)


@memo
def wuerstchen_stage_c(cfg: Any, sem_hw: tuple[int, int], text_width: int, c_sem: int = 16) -> Footprint:
    with _meta():
        c = StageC(model_config("stage_c", cfg.preset, cfg.overrides, c_in=c_sem, c_clip=text_width))
    blocks = c.blocks if cfg.train.activation_checkpointing else ()  # what StageC.forward checkpoints
    return measure([c], [c], lambda: eps_loss(c, _x(1, c_sem, *sem_hw), {"text": _x(1, TOKENS, text_width)})[0],
                   blocks)


def wuerstchen_flops(preset: str, resolution: int, text_c: str, text_b: str) -> dict[str, float]:
    """Training FLOPs per image of Stage C and of Stage B + compressor at a preset (the benchmark's
    ``--flops-only``)."""
    from workflows.wuerstchen.stages import StageATrainConfig, StageBTrainConfig, StageCTrainConfig

    b = StageBTrainConfig(preset=preset, compressor_preset=preset)
    a = StageATrainConfig(preset=preset)
    sem = semantic_size(b, resolution)
    return {"stage_c": wuerstchen_stage_c(StageCTrainConfig(preset=preset), sem, text_dims(text_c)[0]).flops,
            "stage_b+compressor": wuerstchen_stage_b(b, a, resolution, text_dims(text_b)[0]).flops}


@memo
def encode_flops(stage_a: Any | None, b_cfg: Any | None, resolution: int) -> float:
    """Forward FLOPs per image of an encode stage's image network (Stage A encoder or the compressor)."""
    if stage_a is not None:
        with _meta():
            a = StageA(model_config("stage_a", stage_a.preset, stage_a.overrides))
        return forward_flops(lambda: a.encode(_x(1, 3, resolution, resolution)))
    comp_cfg = model_config("compressor", b_cfg.compressor_preset, b_cfg.compressor_overrides, pretrained=False)
    with _meta():
        comp = SemanticCompressor(comp_cfg)
    return forward_flops(lambda: comp(_x(1, 3, resolution, resolution)))


@memo
def text_flops(name: str) -> float:
    """Forward FLOPs of one caption through an open_clip text tower (77 tokens)."""
    open_clip = open_clip_lib()  # with tiny-clip registered

    with _meta():
        model = open_clip.create_model(name, pretrained=None, device=META)
    tokens = torch.zeros(1, TOKENS, dtype=torch.long, device=META)
    return forward_flops(lambda: model.encode_text(tokens))


@memo
def clip_params_flops(name: str, size: int = 224) -> tuple[int, float]:
    """(parameters, forward FLOPs of one image and one caption) of an open_clip model (the filter)."""
    open_clip = open_clip_lib()  # with tiny-clip registered

    with _meta():
        model = open_clip.create_model(name, pretrained=None, device=META)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    f = forward_flops(lambda: model.encode_image(_x(1, 3, size, size)))
    return _n([model]), f + text_flops(name)


# ------------------------------------------------------------------------------------------
# PaGoDA (arXiv 2405.14822): the teacher, the one-step generator and its growth chain


def _text(t: Any, unet: UNetConfig) -> dict[str, Tensor]:
    return {"text": _x(1, 1 if t.text_pooled else t.text_tokens, unet.text_dim)} if t.text else {}


def _teacher(unet: UNetConfig) -> nn.Module:
    return _net(("teacher", unet), lambda: EDMPrecond(UNet(unet)))


@memo
def pagoda_teacher(t: Any) -> Footprint:
    """EDM teacher at B (Sec. 3.1): one denoising loss evaluation per image."""
    unet = teacher_unet(t)
    net, r = _teacher(unet), t.resolution
    return measure([net], [net], lambda: net(_x(1, 3, r, r), 1.0, **_text(t, unet)).pow(2).mean())


@memo
def teacher_forward_flops(t: Any) -> float:
    unet = teacher_unet(t)
    net = _teacher(unet)
    return forward_flops(lambda: net(_x(1, 3, t.resolution, t.resolution), 1.0, **_text(t, unet)))


def _generator(unet: UNetConfig, omega_cond: bool, grows: tuple[GrowthConfig, ...]) -> nn.Module:
    """G grown by ``grows``, each growth from the cached G one row below (grow_2x builds a new network and
    leaves its input as it was), so the chain 64 -> 512 builds four U-Nets, not ten."""
    if not grows:
        return _net(("G", unet, omega_cond), lambda: Generator(UNet(unet), GeneratorConfig(omega_cond=omega_cond)))
    return _net(("G", unet, omega_cond, grows),
                lambda: grow_2x(_generator(unet, omega_cond, grows[:-1]), grows[-1]))


@memo
def pagoda_generator(t: Any, d: Any, grows: list[Any]) -> Footprint:
    """G (a teacher copy, Sec. 3.2) grown by ``grows`` (Sec. 3.3), with the stage's D and L_rec nets.

    One image: G(z) -> L_rec against x through the perceptual nets, G(eps) -> D (generator step), then
    D on a real and a fake (discriminator step)."""
    cfg = grows[-1] if grows else d
    cfg = dataclasses.replace(cfg, disc_pretrained=False, perceptual_pretrained=False)  # meta: no downloads
    unet = teacher_unet(t)
    gen = _generator(unet, d.omega_cond, tuple(growth_config(g) for g in grows))
    res = unet.img_resolution * 2 ** len(grows)
    embed = text_dims(t.clip)[1] if t.text else 0
    # Every row's D and feature nets are the same networks unless "tiny" (sized by the resolution): the
    # arguments workflows/pagoda/stages.py's build_discriminator / build_perceptual read.
    disc = _net(("D", cfg.disc, cfg.omega_cond, embed, res if cfg.disc == "tiny" else 0),
                lambda: build_discriminator(cfg, res, embed))
    perc = _net(("L_rec", *cfg.perceptual, res if "tiny" in cfg.perceptual else 0),
                lambda: build_perceptual(cfg, res))
    cond = _text(t, unet)
    d_cond = {"text_embed": _x(1, embed)} if embed else {}
    b = unet.img_resolution

    def feats(x: Tensor) -> Tensor:
        return sum(f.float().pow(2).mean() for net in perc for f in net(x))

    def loss() -> Tensor:
        fake = gen(_x(1, 3, b, b), **cond)
        g_loss = feats(fake) + feats(_x(1, 3, res, res)).detach() - disc(gen(_x(1, 3, b, b), **cond), **d_cond).mean()
        d_loss = disc(_x(1, 3, res, res), **d_cond).mean() + disc(fake.detach(), **d_cond).mean()
        return g_loss + d_loss

    return measure([gen, disc, perc], [gen, disc], loss)
