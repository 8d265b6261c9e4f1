"""PaGoDA losses (perceptual L_rec, hinge, adaptive lambda, CLIP reg) and the projected discriminator."""
import pytest
import torch

from genmodels.pagoda.discriminator import PRESETS, ProjectedDiscriminator, diff_augment, rand_cutout, rand_translation
from genmodels.pagoda.losses import (
    TinyFeatures,
    adaptive_weight,
    build_timm_features,
    clip_loss,
    d_hinge_loss,
    g_hinge_loss,
    perceptual_distance,
)


def test_hinge_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert d_hinge_loss(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert g_hinge_loss(fake).item() == pytest.approx(1 / 3)
    assert d_hinge_loss(torch.full((2, 5), 3.0), torch.full((2, 5), -3.0)).item() == 0  # per-token logits


def test_adaptive_weight_known_gradient_norms():
    w = torch.nn.Parameter(torch.ones(2, 2))  # grad of a * sum(W) has norm 2|a|
    lam = adaptive_weight(3 * w.sum(), 0.5 * w.sum(), w)
    assert lam.item() == pytest.approx(6 / (1 + 1e-4))
    assert not lam.requires_grad
    assert adaptive_weight(3 * w.sum(), 1000 * w.sum(), w).item() == pytest.approx(0.01)  # clipped below
    assert adaptive_weight(3 * w.sum(), 1e-3 * w.sum(), w).item() == pytest.approx(10.0)  # clipped above
    lam2 = adaptive_weight(None, 0.5 * w.sum(), w, rec_grad_norm=torch.tensor(6.0))
    assert lam2.item() == pytest.approx(lam.item())


def test_perceptual_distance_channel_normalized():
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def feats(img):
        return [img]

    nx, ny = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    want = (nx - ny).pow(2).sum(1).mean((1, 2))
    assert torch.allclose(perceptual_distance(feats, x, y), want, atol=1e-5)
    assert torch.allclose(perceptual_distance(lambda i: [5 * i], x, y), want, atol=1e-5)  # feature scale invariant
    assert torch.allclose(perceptual_distance([feats, feats], x, y), 2 * want, atol=1e-5)  # several nets add up
    tiny = TinyFeatures(size=32)
    assert perceptual_distance(tiny, x, x).abs().max() < 1e-6
    # Inputs are resized to the configured size: any resolution works, gradients reach x only.
    xg = torch.randn(2, 3, 64, 64, requires_grad=True)
    perceptual_distance(tiny, xg, torch.randn(2, 3, 16, 16)).sum().backward()
    assert xg.grad is not None and all(p.grad is None for p in tiny.parameters())


def test_timm_feature_builder_offline():
    feats = build_timm_features("tf_efficientnet_lite0", (1, 2, 3, 4), size=64, pretrained=False)
    maps = feats(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert [m.shape[1] for m in maps] == [24, 40, 112, 320] and not any(p.requires_grad for p in feats.parameters())
    feats.train()
    assert not feats.backbone.training


def test_clip_regularizer():
    def embed(x):
        return x.mean((2, 3))

    img = torch.ones(2, 3, 4, 4)
    assert clip_loss(embed, img, torch.ones(2, 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert clip_loss(embed, img, -torch.ones(2, 3)).item() == pytest.approx(2.0)


def test_diff_augment():
    torch.manual_seed(0)
    x = torch.ones(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None
    t = rand_translation(torch.ones(8, 3, 16, 16), 0.125)
    assert set(t.unique().tolist()) <= {0.0, 1.0} and (t.flatten(1).sum(1) >= 3 * 14 * 14).all()
    c = rand_cutout(torch.ones(8, 3, 16, 16), 0.5)
    zeros = (c[:, 0] == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 64)).all()


def test_projected_discriminator_tiny():
    torch.manual_seed(0)
    d = ProjectedDiscriminator.tiny(PRESETS["tiny"])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = d(x, label=torch.tensor([1, 2]))
    assert logits.shape == (2, 16 * 16 + 8 * 8)  # one logit per token of each feature map
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in d.features.parameters())
    assert all(p.grad is not None for p in d.heads.parameters() if p.requires_grad)
    d.eval()
    with torch.no_grad():
        a = d(x, label=torch.tensor([1, 1]), augment=False)
        b = d(x, label=torch.tensor([3, 3]), augment=False)
    assert not torch.allclose(a, b)  # class projection
    text_d = ProjectedDiscriminator.tiny(PRESETS["tiny_text"])
    out = text_d(torch.randn(2, 3, 32, 32), text_embed=torch.randn(2, 32), omega=torch.tensor([0.0, 3.0]))
    assert out.shape == (2, 320)


def test_projected_discriminator_dino_builder_offline():
    d = ProjectedDiscriminator.build(PRESETS["paper"], pretrained=False)
    assert type(d.features.backbone).__name__ == "VisionTransformer"
    with torch.no_grad():
        out = d(torch.rand(1, 3, 64, 64) * 2 - 1, label=torch.tensor([7]))
    assert out.shape == (1, 4 * 14 * 14)  # 4 ViT-S/16 blocks, 14x14 tokens at 224^2
