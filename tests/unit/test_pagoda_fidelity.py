"""PaGoDA against the official code (sony/pagoda): growth freezing, lambda, dropout, the 512 recon D."""
import dataclasses

import pytest
import torch

from genmodels.pagoda.discriminator import PRESETS as D_PRESETS
from genmodels.pagoda.discriminator import ProjectedDiscriminator
from genmodels.pagoda.edm import EDMPrecond
from genmodels.pagoda.generator import Generator
from genmodels.pagoda.growth import GrowthConfig, grow_2x
from genmodels.pagoda.losses import TinyFeatures, g_hinge_loss, rec_loss
from genmodels.pagoda.steps import (
    PRESETS,
    PagodaConfig,
    discriminator_loss,
    generator_loss,
    rec_discriminator_loss,
)
from genmodels.pagoda.unet import PRESETS as NET_PRESETS
from genmodels.pagoda.unet import UNet
from workflows.pagoda.stages import GrowConfig, growth_config

ACTIVATE_FROM = 9  # commands/res64to{128,256,512}.sh: --activate_from=9


def adm_output_block(name: str, cfg) -> int:
    """Index in ADM's `output_blocks` (cm/unet.py) of our decoder block ``name``.

    ADM: each base level (lowest first) has num_blocks + 1 blocks and its up-sampler sits inside the
    level's last block; each grown level is one up-ResBlock followed by num_res_blocks_high blocks.
    """
    per_level = cfg.num_blocks + 1
    levels = [cfg.img_resolution >> lv for lv in reversed(range(len(cfg.channel_mult)))]
    res, kind = name.split("_")
    r = int(res.split("x")[0])
    if r in levels:
        j = levels.index(r)
        return (j - 1) * per_level + per_level - 1 if kind == "up" else j * per_level + int(kind[len("block"):])
    g = (r // cfg.img_resolution).bit_length() - 2  # 0 for the first grown level
    start = len(levels) * per_level + g * (cfg.grown_blocks + 1)
    return start if kind == "up" else start + 1 + int(kind[len("block"):])


def official_trainable(gen: Generator) -> set[str]:
    """train.py's rule: output_blocks[i] trains iff i >= activate_from, `out` trains, nothing else."""
    cfg = gen.net.cfg
    def trains(parts: list[str]) -> bool:
        if parts[1] == "dec":
            return adm_output_block(parts[2], cfg) >= ACTIVATE_FROM
        return parts[1] in ("out_norm", "out_conv")

    return {name for name, _ in gen.named_parameters() if trains(name.split("."))}


def fraction(gen: Generator, names: set[str]) -> float:
    params = dict(gen.named_parameters())
    return sum(params[n].numel() for n in names) / sum(p.numel() for p in params.values())


def test_adm_index_map_matches_the_adm64_layout():
    cfg = NET_PRESETS["paper64"]
    assert [adm_output_block(n, cfg) for n in ("8x8_block0", "16x16_up", "32x32_block0", "64x64_up", "64x64_block3")] \
        == [0, 3, 8, 11, 15]
    grown = dataclasses.replace(cfg, grown=(192, 192))
    assert [adm_output_block(n, grown) for n in ("128x128_up", "128x128_block1", "256x256_up")] == [16, 18, 19]
    for c in (NET_PRESETS["tiny"], dataclasses.replace(NET_PRESETS["tiny"], grown=(32, 16))):
        assert UNet.decoder_names(c) == list(UNet(c).dec)


def test_growth_trains_exactly_the_official_blocks_at_128_256_512():
    with torch.device("meta"):
        gen = Generator(UNet(NET_PRESETS["paper64"]))
        fractions, ours = [], []
        for res in (128, 256, 512):
            gen = grow_2x(gen)
            assert gen.net.cfg.out_resolution == res
            trained = {n for n, p in gen.named_parameters() if p.requires_grad}
            want = official_trainable(gen)
            assert trained == want, res
            fractions.append(fraction(gen, want))
            # The previous rule (top level of the smaller G + new level) trains strictly less.
            prev = grow_2x(Generator(UNet(dataclasses.replace(gen.net.cfg, grown=gen.net.cfg.grown[:-1]))),
                           GrowthConfig(train_from=None))
            ours.append(fraction(prev, {n for n, p in prev.named_parameters() if p.requires_grad}))
    # Every earlier grown level keeps training: at 512 the 128 and 256 levels are in the set.
    assert any(n.startswith("net.dec.128x128_") for n in want) and any(n.startswith("net.dec.256x256_") for n in want)
    assert "net.dec.32x32_block0.conv0.weight" not in want and "net.dec.32x32_block1.conv0.weight" in want
    assert all(o < f for o, f in zip(ours, fractions)), (ours, fractions)
    print("official trainable fraction 128/256/512:", [f"{f:.3%}" for f in fractions],
          "previous rule:", [f"{f:.3%}" for f in ours])


def test_stage_config_picks_the_rule():
    assert growth_config(GrowConfig()).train_from == (2, 1)
    assert growth_config(GrowConfig(freeze="top_levels", trainable_levels=2)) == GrowthConfig(
        train_from=None, trainable_levels=2)
    with pytest.raises(ValueError, match="no block '4x4_block1'"):
        grow_2x(Generator(UNet(NET_PRESETS["tiny"])), GrowthConfig(train_from=(4, 1)))


def test_generator_drops_the_teacher_dropout():
    with torch.device("meta"):
        teacher = EDMPrecond(UNet(NET_PRESETS["paper64"]))
        gen = Generator.from_teacher(teacher)
    drops = [m.p for m in gen.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and set(drops) == {0.0} and gen.net.cfg.dropout == 0.0
    assert {m.p for m in teacher.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # teacher untouched
    assert grow_2x(gen).net.cfg.dropout == 0.0


def _setup(seed=0, grow=True):
    torch.manual_seed(seed)
    teacher = EDMPrecond(UNet(NET_PRESETS["tiny"]))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    gen = Generator.from_teacher(teacher)
    if grow:
        gen = grow_2x(gen)
    d_cfg = dataclasses.replace(D_PRESETS["tiny"], augment=())
    models = {"generator": gen, "discriminator": ProjectedDiscriminator.tiny(d_cfg).eval(),
              "perceptual": [TinyFeatures(size=32)]}
    res = 32 if grow else 16
    batch = {"image": torch.rand(2, 3, res, res) * 2 - 1, "latent": torch.randn(2, 3, 16, 16) * 80,
             "noise": torch.randn(2, 3, 16, 16) * 80, "label": torch.tensor([1, 3])}
    return models, batch


def test_lambda_is_one_at_256_and_above_by_default():
    assert PagodaConfig(resolution=128).adaptive_adv and not PagodaConfig(resolution=256).adaptive_adv
    assert not PRESETS["paper256"].adaptive_adv and not PRESETS["paper512"].adaptive_adv
    assert PRESETS["paper"].adaptive_adv and PRESETS["paper128"].adaptive_adv
    models, batch = _setup()
    for res, sep in ((256, False), (256, True), (512, True)):
        cfg = PagodaConfig(resolution=res, w_adv=1.0, separate_updates=sep)
        _, logs = generator_loss(models, batch, cfg, step=1)
        assert logs["lambda_adv"].item() == 1.0, res
    _, logs = generator_loss(models, batch, PagodaConfig(resolution=128, w_adv=1.0))
    assert logs["lambda_adv"].item() != 1.0  # adaptive below 256


def _grad_norm(loss, w):
    return torch.autograd.grad(loss, w, retain_graph=True)[0].norm()


@pytest.mark.parametrize("layer", ["last_block", "head"])
def test_adaptive_lambda_at_the_configured_layer(layer):
    models, batch = _setup()
    gen, disc = models["generator"], models["discriminator"]
    w = gen.net.dec["32x32_block1"].conv1.weight if layer == "last_block" else gen.net.out_conv.weight
    assert gen.adaptive_layer(layer) is w
    cfg = PagodaConfig(resolution=32, w_adv=1.0, lambda_layer=layer)
    _, logs = generator_loss(models, batch, cfg)
    l_rec = rec_loss(models["perceptual"], gen(batch["latent"], label=batch["label"]), batch["image"])
    l_adv = g_hinge_loss(disc(gen(batch["noise"], label=batch["label"]), label=batch["label"]))
    want = (_grad_norm(l_rec, w) / (_grad_norm(l_adv, w) + 1e-4)).clamp(0.01, 10)
    assert torch.allclose(logs["lambda_adv"], want, rtol=1e-4)
    # Separate updates take ||grad_W L_rec|| with only the graph above W and get the same lambda.
    _, sep = generator_loss(models, batch, dataclasses.replace(cfg, separate_updates=True), step=1)
    assert torch.allclose(sep["lambda_adv"], want, rtol=1e-4)


def test_separate_reconstruction_discriminator():
    models, batch = _setup()
    d_cfg = dataclasses.replace(D_PRESETS["tiny"], augment=())
    models["rec_discriminator"] = ProjectedDiscriminator.tiny(d_cfg).eval()
    with torch.no_grad():
        for p in models["rec_discriminator"].heads.parameters():
            p.add_(0.5 * torch.randn_like(p))
    cfg = dataclasses.replace(PRESETS["tiny_grow"], rec_discriminator=True)
    _, logs = generator_loss(models, batch, cfg, step=0)
    x_rec = models["generator"](batch["latent"], label=batch["label"])
    with torch.no_grad():
        want = g_hinge_loss(models["rec_discriminator"](x_rec, label=batch["label"]))
        main = g_hinge_loss(models["discriminator"](x_rec, label=batch["label"]))
    assert torch.allclose(logs["l_rec_adv"], want) and not torch.allclose(logs["l_rec_adv"], main)
    _, d_logs = discriminator_loss(models, batch, cfg)
    assert "d_rec" not in d_logs  # the main D no longer sees reconstructions
    loss, r_logs = rec_discriminator_loss(models, batch, cfg)
    loss.backward()
    assert all(p.grad is not None for p in models["rec_discriminator"].heads.parameters())
    assert all(p.grad is None for p in models["discriminator"].parameters())
    assert all(p.grad is None for p in models["generator"].parameters())  # reconstructions are detached
    assert {"d_rec", "d_rec_real"} <= set(r_logs)
