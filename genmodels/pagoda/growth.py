"""Progressive growing of the one-step generator, 2x at a time (PaGoDA Sec. 3.3, Fig. 3).

Each step appends one decoder level at twice the current output resolution: an upsampling
ResBlock followed by `grown_blocks` (2) plain ResBlocks, no attention and no skip connections
(the encoder still runs at the base resolution on the same base latent z). Every weight whose
name and shape match is copied from the smaller generator. The output head keeps its name and,
with the default width (that of the current top level), its shape, so it is copied as well.

Freezing (Fig. 3, starred blocks). The default is the official rule (sony/pagoda
commands/res64to{128,256,512}.sh pass `--activate_from=9`; train.py then freezes
`output_blocks[:9]` and every parameter outside `output_blocks` and `out`): the embeddings, the
encoder, the middle block and the decoder below block 1 of the base/2 level stay frozen; every
decoder block from there upward trains, each earlier grown level included, and the output head.
On the ADM-64 decoder (4 levels x 4 blocks, each level's up-sampler inside its last block),
output block 9 is block 1 of the 32x32 level, i.e. `train_from=(2, 1)` here. In our names a
level's up-sampler is its own `{r}x{r}_up` block ahead of the level, so `32x32_up` (inside ADM's
block 7) is frozen and `64x64_up` (inside block 11) trains, as there.

`train_from=None` gives our earlier, cheaper rule: only the top `trainable_levels` levels of the
smaller generator, the new level and the head train.
"""
import dataclasses
from dataclasses import dataclass

from torch import nn

from genmodels.pagoda.generator import Generator
from genmodels.pagoda.unet import UNet, UNetConfig


@dataclass(frozen=True)
class GrowthConfig:
    channels: int | None = None  # width of the new level; None: the current top level's width
    # First trained decoder block as (divisor of the base resolution, block index): (2, 1) is block 1
    # of the base/2 level, the official --activate_from=9 (see the module docstring).
    train_from: tuple[int, int] | None = (2, 1)
    trainable_levels: int = 1  # train_from=None: top decoder levels of the smaller generator that train
    train_embeddings: bool = False
    train_encoder: bool = False


PRESETS = {"tiny": GrowthConfig(), "paper": GrowthConfig(), "top_level": GrowthConfig(train_from=None)}


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


def first_trained_block(cfg: UNetConfig, growth: GrowthConfig) -> str:
    """Name of the first decoder block that trains under ``growth`` (every later block trains too)."""
    if growth.train_from is None:
        lowest = cfg.out_resolution >> growth.trainable_levels if growth.trainable_levels > 0 else cfg.out_resolution
        names = [n for n in UNet.decoder_names(cfg) if decoder_resolution(n) >= lowest]
        return names[0] if names else "out"
    div, block = growth.train_from
    r = cfg.img_resolution // div
    name = f"{r}x{r}_block{block}"
    if name not in UNet.decoder_names(cfg):
        raise ValueError(f"train_from={growth.train_from}: the decoder has no block {name!r} (base "
                         f"{cfg.img_resolution}, {len(cfg.channel_mult)} levels, {cfg.num_blocks + 1} blocks each)")
    return name


def set_trainable(gen: Generator, cfg: GrowthConfig = GrowthConfig()) -> None:
    """Apply the Stage-3 freezing rule to a grown generator (see module docstring)."""
    net = gen.net
    gen.requires_grad_(False)
    first = first_trained_block(net.cfg, cfg)
    names = list(net.dec)
    start = names.index(first) if first in names else len(names)
    for name in names[start:]:
        net.dec[name].requires_grad_(True)
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
