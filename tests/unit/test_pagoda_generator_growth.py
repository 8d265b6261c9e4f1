"""PaGoDA Stage 2b/3: generator initialization, omega conditioning, 2x growth."""
import dataclasses

import torch

from genmodels.pagoda.edm import EDMPrecond
from genmodels.pagoda.generator import Generator, GeneratorConfig
from genmodels.pagoda.growth import GrowthConfig, grow_2x
from genmodels.pagoda.unet import PRESETS, UNet


def _teacher(preset="tiny", seed=0):
    torch.manual_seed(seed)
    teacher = EDMPrecond(UNet(PRESETS[preset]))
    with torch.no_grad():  # zero-initialized output conv would make every comparison trivial
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher


def test_generator_at_init_is_teacher_one_step_denoiser():
    teacher = _teacher()
    gen = Generator.from_teacher(teacher)
    assert all(p.requires_grad for p in gen.parameters())
    z, label = torch.randn(2, 3, 16, 16) * 80, torch.tensor([4, -1])
    assert torch.allclose(gen(z, label=label), teacher(z, 80.0, label), atol=1e-6)
    raw = Generator(gen.net, GeneratorConfig(precond_output=False))(z, label=label)
    c_noise = torch.full((2,), torch.tensor(80.0).log() / 4)
    assert torch.allclose(raw, gen.net(z / (80**2 + 0.25) ** 0.5, c_noise, label), atol=1e-5)
    # The copy is independent of the teacher.
    with torch.no_grad():
        gen.net.out_conv.bias.add_(1.0)
    assert not torch.allclose(gen(z, label=label), teacher(z, 80.0, label))


def test_omega_conditioned_generator_starts_at_teacher_for_every_omega():
    teacher = _teacher("tiny_text")
    gen = Generator.from_teacher(teacher, GeneratorConfig(omega_cond=True))
    z, text = torch.randn(2, 3, 16, 16) * 80, torch.randn(2, 5, 32)
    want = teacher(z, 80.0, text=text)
    for omega in (0.0, 3.0, torch.tensor([1.0, 7.5])):
        assert torch.allclose(gen(z, text=text, omega=omega), want, atol=1e-6)
    # After a step on the zero-initialized omega layer, omega changes the output.
    with torch.no_grad():
        gen.map_omega[2].weight.normal_(0, 0.1)
    assert not torch.allclose(gen(z, text=text, omega=0.0), gen(z, text=text, omega=5.0))


# Default (official) rule on the tiny net (base 16, levels 16 and 8): from block 1 of the 8x8 level up.
FROZEN_PREFIXES = ("net.map_", "net.enc.", "net.mid.", "net.dec.8x8_block0.", "map_omega.")
TRAINED_PREFIXES = ("net.dec.8x8_block1.", "net.dec.16x16_", "net.dec.32x32_", "net.out_norm.", "net.out_conv.")


def test_grow_2x_copies_and_freezes_exactly():
    gen = Generator.from_teacher(_teacher(), GeneratorConfig(omega_cond=True))
    big = grow_2x(gen)
    assert big.net.cfg.grown == (32,) and big.net.cfg.out_resolution == 32
    z, label = torch.randn(2, 3, 16, 16) * 80, torch.tensor([1, 2])
    assert big(z, label=label, omega=1.0).shape == (2, 3, 32, 32)

    old = dict(gen.named_parameters())
    new = dict(big.named_parameters())
    added = {
        f"net.dec.32x32_{b}.{p}" for b in ("up", "block0", "block1")
        for p in ("norm0.weight", "norm0.bias", "conv0.weight", "conv0.bias", "affine.weight", "affine.bias",
                  "norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias")
    }
    assert set(new) - set(old) == added  # up-ResBlock + 2 ResBlocks, same width: no skip conv, no attention
    assert set(old) <= set(new)
    for name, p in old.items():  # every name/shape match copied, the output head included
        assert torch.equal(new[name], p), name

    trained = {n for n, p in new.items() if p.requires_grad}
    assert trained == {n for n in new if n.startswith(TRAINED_PREFIXES)}
    assert {n for n, p in new.items() if not p.requires_grad} == {n for n in new if n.startswith(FROZEN_PREFIXES)}
    assert "net.dec.16x16_block1.skip.weight" in trained and "net.mid.in0.attn.qkv.weight" not in trained
    assert "net.dec.8x8_block0.attn.proj.weight" not in trained and "net.dec.8x8_block1.attn.proj.weight" in trained


def test_grow_twice_and_freezing_options():
    gen = Generator.from_teacher(_teacher())
    g64 = grow_2x(grow_2x(gen), GrowthConfig(channels=16, train_from=None, trainable_levels=0))
    assert g64.net.cfg.grown == (32, 16)
    assert g64(torch.randn(1, 3, 16, 16) * 80, label=torch.tensor([0])).shape[-1] == 64
    trained = {n for n, p in g64.named_parameters() if p.requires_grad}
    assert all(n.startswith(("net.dec.64x64_", "net.out_")) for n in trained)
    assert "net.dec.64x64_up.skip.weight" in trained  # 32 -> 16 channels needs a 1x1 skip
    # Output head width changed (32 -> 16), so it is re-initialized (zero) rather than copied.
    assert (g64.net.out_conv.weight == 0).all()
    g_all = grow_2x(gen, GrowthConfig(train_from=None, trainable_levels=2, train_embeddings=True, train_encoder=True))
    assert all(p.requires_grad for p in g_all.parameters())


def test_grown_generator_matches_config_built_from_scratch():
    gen = Generator.from_teacher(_teacher())
    big = grow_2x(gen)
    cfg = dataclasses.replace(PRESETS["tiny"], grown=(32,))
    assert list(big.net.state_dict()) == list(UNet(cfg).state_dict())
