"""Progressive growing of the one-step generator, 2x at a time (PaGoDA Sec. 3.3, Fig. 3).

Each step appends one decoder level at twice the current output resolution: an upsampling
ResBlock followed by `grown_blocks` (2) plain ResBlocks, no attention and no skip connections
(the encoder still runs at the base resolution on the same base latent z). Every weight whose
name and shape match is copied from the smaller generator. The output head keeps its name and,
with the default width (that of the current top level), its shape, so it is copied as well.

Freezing (Fig. 3, starred blocks): the embeddings (time, label, text, omega), the encoder and the
middle block, and all decoder levels except the top `trainable_levels` of the smaller
generator stay frozen; those top levels, the new level and the output head are trained.
"""
import dataclasses
from dataclasses import dataclass

from torch import nn

from genmodels.pagoda.generator import Generator
from genmodels.pagoda.unet import UNet, UNetConfig


@dataclass(frozen=True)
class GrowthConfig:
    channels: int | None = None  # width of the new level; None: the current top level's width
    trainable_levels: int = 1  # top decoder levels of the smaller generator that keep training
    train_embeddings: bool = False
    train_encoder: bool = False


PRESETS = {"tiny": GrowthConfig(), "paper": GrowthConfig()}


def copy_matching(dst: nn.Module, src: nn.Module) -> list[str]:
    """Copy every parameter/buffer whose name and shape match; returns the copied names."""
    src_state, copied = src.state_dict(), []
    dst_state = dst.state_dict()
    for name, value in dst_state.items():
        if name in src_state and src_state[name].shape == value.shape:
            value.copy_(src_state[name])
            copied.append(name)
    return copied


def decoder_resolution(block_name: str) -> int:
    """'32x32_block1' -> 32."""
    return int(block_name.split("x", 1)[0])


def set_trainable(gen: Generator, cfg: GrowthConfig = GrowthConfig()) -> None:
    """Apply the Stage-3 freezing rule to a grown generator (see module docstring)."""
    net = gen.net
    top = net.cfg.out_resolution
    # The new level is `top`; the smaller generator's top levels are top/2, top/4, ...
    lowest_trained = top >> cfg.trainable_levels if cfg.trainable_levels > 0 else top
    gen.requires_grad_(False)
    for name, block in net.dec.items():
        block.requires_grad_(decoder_resolution(name) >= lowest_trained)
    net.out_norm.requires_grad_(True)
    net.out_conv.requires_grad_(True)
    if cfg.train_encoder:
        net.enc.requires_grad_(True)
        net.mid.requires_grad_(True)
    if cfg.train_embeddings:
        for module in (net.map_layer0, net.map_layer1, net.map_label, net.text_norm, net.map_text, gen.map_omega):
            if module is not None:
                module.requires_grad_(True)


def grown_config(old: UNetConfig, cfg: GrowthConfig = GrowthConfig()) -> UNetConfig:
    """The network config after one 2x growth: one more decoder level, as wide as the current top one
    unless ``cfg.channels`` says otherwise."""
    top_channels = old.grown[-1] if old.grown else old.model_channels * old.channel_mult[0]
    return dataclasses.replace(old, grown=old.grown + (cfg.channels or top_channels,))


def grow_2x(gen: Generator, cfg: GrowthConfig = GrowthConfig()) -> Generator:
    """Return a new generator with one more 2x decoder level, weights copied, freezing applied."""
    new = Generator(UNet(grown_config(gen.net.cfg, cfg)), gen.cfg).to(next(gen.parameters()).device)
    copy_matching(new, gen)
    set_trainable(new, cfg)
    return new
