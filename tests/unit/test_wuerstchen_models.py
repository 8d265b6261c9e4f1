"""Würstchen networks: tiny forward shapes, paper sizes on the meta device, output forms."""
import dataclasses
import math

import pytest
import torch

from genmodels.wuerstchen import (
    COMPRESSOR_PRESETS,
    STAGE_A_PRESETS,
    STAGE_B_PRESETS,
    STAGE_C_PRESETS,
    SemanticCompressor,
    StageA,
    StageB,
    StageC,
    from_prior_space,
    to_prior_space,
)
from genmodels.wuerstchen.common import r_embedding


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_tiny_pipeline_shapes():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    a, comp = StageA(), SemanticCompressor()
    b, c = StageB(), StageC()
    lat = a.encode(img)
    assert lat.shape == (2, 4, 16, 16)
    assert a.decode(lat).shape == img.shape
    assert a.decode(lat, quantize=True).shape == img.shape
    recon, vq = a(img)
    assert recon.shape == img.shape and vq.dim() == 0
    z = comp(img)
    assert z.shape == (2, 16, 4, 4) and comp.latent_size((64, 64)) == (4, 4)
    text = torch.randn(2, 5, b.cfg.c_clip)
    r = torch.rand(2)
    assert b(lat, r, z, text).shape == lat.shape
    assert c(to_prior_space(z, c.cfg), r, text).shape == z.shape


def test_prior_space_round_trip():
    z = torch.randn(3, 16, 2, 2)
    cfg = STAGE_C_PRESETS["paper"]
    torch.testing.assert_close(to_prior_space(z, cfg), (z + 1) / 42)
    torch.testing.assert_close(from_prior_space(to_prior_space(z, cfg), cfg), z)


@pytest.mark.parametrize(
    "name,build,expected",
    [
        ("stage_a", lambda: StageA(STAGE_A_PRESETS["paper"]), 18.4e6),
        ("stage_b", lambda: StageB(STAGE_B_PRESETS["paper"]), 1.055e9),
        ("stage_c", lambda: StageC(STAGE_C_PRESETS["paper"]), 993.6e6),
        ("compressor", lambda: SemanticCompressor(dataclasses.replace(COMPRESSOR_PRESETS["paper"], pretrained=False)),
         20.2e6),
    ],
)
def test_paper_param_counts(name, build, expected):
    with torch.device("meta"):
        m = build()
    assert abs(n_params(m) - expected) / expected < 0.03, (name, n_params(m))


def test_paper_shapes_on_meta():
    with torch.device("meta"):
        a = StageA(STAGE_A_PRESETS["paper"])
        comp = SemanticCompressor(dataclasses.replace(COMPRESSOR_PRESETS["paper"], pretrained=False))
        b = StageB(STAGE_B_PRESETS["paper"])
        c = StageC(STAGE_C_PRESETS["paper"])
        img = torch.empty(1, 3, 1024, 1024)
        lat = a.encode(img)
        assert lat.shape == (1, 4, 256, 256)
        assert a.decode(lat).shape == img.shape
        assert comp(img).shape == (1, 16, 24, 24)  # 1024 -> 768 px -> 24x24: the 42x compression
        z = torch.empty(1, 16, 24, 24)
        assert c(z, torch.empty(1), torch.empty(1, 77, 1280)).shape == z.shape  # CLIP-bigG tokens
        assert b(lat, torch.empty(1), z, torch.empty(1, 77, 1024)).shape == lat.shape  # CLIP-H tokens


def test_stage_c_output_form():
    """With a constant head, eps = (x - a) / (|1 - b| + 1e-5)."""
    c = StageC()
    with torch.no_grad():
        c.proj_out.weight.zero_()
        c.proj_out.bias.copy_(torch.tensor([0.3] * 16 + [1.5] * 16))
    x = torch.randn(2, 16, 4, 4)
    out = c(x, torch.rand(2), torch.randn(2, 3, c.cfg.c_clip))
    torch.testing.assert_close(out, (x - 0.3) / (0.5 + 1e-5))


def test_stage_b_output_form_and_conditioning():
    torch.manual_seed(0)
    b = StageB()
    with torch.no_grad():
        b.head[1].weight.zero_()
        b.head[1].bias.copy_(torch.cat([torch.full((16,), 0.2), torch.full((16,), 0.7)]))
    x = torch.randn(2, 4, 8, 8)
    sem, text, r = torch.randn(2, 16, 2, 2), torch.randn(2, 3, 32), torch.rand(2)
    bb = torch.sigmoid(torch.tensor(0.7)) * (1 - 2e-3) + 1e-3
    torch.testing.assert_close(b(x, r, sem, text), (x - 0.2) / bb)
    with torch.no_grad():
        b.head[1].weight.normal_(0, 0.5)
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave zero-init gates so every input matters
    y = b(x, r, sem, text)
    assert not torch.allclose(y, b(x, r, sem * 0, text))
    assert not torch.allclose(y, b(x, r, sem, text * 2))
    assert not torch.allclose(y, b(x, 1 - r, sem, text))


def test_r_embedding_closed_form():
    r = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)  # fp64: r * 1e4 keeps its phase
    e = r_embedding(r, 64)
    half, k = 32, 7
    f = math.exp(-math.log(10000) / (half - 1) * k)
    assert e.shape == (3, 64)
    for i, v in enumerate(r.tolist()):
        assert abs(e[i, k].item() - math.sin(v * 10000 * f)) < 1e-4  # fp32 frequencies
        assert abs(e[i, half + k].item() - math.cos(v * 10000 * f)) < 1e-4  # fp32 frequencies
    assert r_embedding(r.float(), 65).shape == (3, 65) and r_embedding(r.float(), 65)[:, -1].eq(0).all()
