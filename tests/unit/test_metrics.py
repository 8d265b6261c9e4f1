"""Metrics on closed-form cases: identical sets, known Gaussians, permutations, monotonicity."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from genmodels.metrics import (
    FeatureStats,
    clip_score,
    clip_score_from_encoders,
    dinov2_features,
    frechet_distance,
    frechet_distance_from_features,
    inception_features,
    inception_score,
    knn_radii,
    laplacian_pyramid,
    prdc,
    sliced_wasserstein_distance,
    swd,
    swd_descriptors,
    tiny_features,
)
from genmodels.metrics.swd import wasserstein_1d

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with spatial structure: upsampled low-resolution noise, in [-1, 1]."""
    x = torch.randn(n, 3, size // 4, size // 4, generator=gen(seed))
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# Fréchet distance ------------------------------------------------------------------------


def test_fd_identity_covariances_is_squared_mean_distance():
    mu1, mu2 = torch.randn(16, generator=gen(0), dtype=f64), torch.randn(16, generator=gen(1), dtype=f64)
    eye = torch.eye(16, dtype=f64)
    assert frechet_distance(mu1, eye, mu2, eye) == pytest.approx((mu1 - mu2).square().sum().item(), rel=1e-10)


def test_fd_diagonal_covariances_closed_form():
    mu1, mu2 = torch.randn(8, generator=gen(0), dtype=f64), torch.randn(8, generator=gen(1), dtype=f64)
    s1, s2 = torch.rand(8, generator=gen(2), dtype=f64) + 0.1, torch.rand(8, generator=gen(3), dtype=f64) + 0.1
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()  # |μ1−μ2|² + Σ (σ1 − σ2)²
    got = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(expected.item(), rel=1e-10)


def test_fd_full_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = torch.randn(6, 6, generator=gen(0), dtype=f64), torch.randn(6, 6, generator=gen(1), dtype=f64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(6, dtype=f64), b @ b.T
    mu1, mu2 = torch.zeros(6, dtype=f64), torch.ones(6, dtype=f64)
    cross = linalg.sqrtm((s1 @ s2).numpy()).real.trace()
    expected = 6.0 + s1.trace().item() + s2.trace().item() - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_from_features_identical_sets_is_zero_and_permutation_invariant():
    x, y = torch.randn(64, 32, generator=gen(0)), torch.randn(64, 32, generator=gen(1)) + 0.5
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)  # rank-deficient Σ too
    perm = torch.randperm(64, generator=gen(2))
    assert frechet_distance_from_features(x, y[perm]) == pytest.approx(frechet_distance_from_features(x, y), rel=1e-10)


def test_fd_of_samples_approaches_closed_form():
    n, mu = 20000, torch.full((4,), 1.0, dtype=f64)
    x = torch.randn(n, 4, generator=gen(0), dtype=f64)
    y = torch.randn(n, 4, generator=gen(1), dtype=f64) * 2 + mu
    # |μ|² + Σ (1 − 2)² = 4 + 4
    assert frechet_distance_from_features(x, y) == pytest.approx(8.0, rel=0.03)


def test_feature_stats_batches_and_merge_match_full_batch():
    x = torch.randn(100, 8, generator=gen(0), dtype=f64) * 3 + 1e4  # large offset: no cancellation
    stats = FeatureStats(8)
    for chunk in x.split([1, 30, 0, 69]):
        stats.update(chunk)
    left, right = FeatureStats(8).update(x[:37]), FeatureStats(8).update(x[37:])
    merged = left.merge(right)
    for s in (stats, merged):
        assert s.n == 100
        torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(s.cov, torch.cov(x.T), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        _ = FeatureStats(8).update(x[:1]).cov


# Sliced Wasserstein distance ------------------------------------------------------------


def test_laplacian_pyramid_levels_and_constant_image():
    levels = laplacian_pyramid(torch.full((2, 3, 64, 64), 0.3), 3)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    for band in levels[:-1]:  # a constant image has no band-pass content
        assert band.abs().max() < 1e-6
    torch.testing.assert_close(levels[-1], torch.full((2, 3, 16, 16), 0.3))


def test_swd_descriptors_shapes():
    desc = swd_descriptors(smooth_images(4, 64), patches_per_image=10)
    assert [d.shape for d in desc] == [(40, 147)] * 3
    dense = swd_descriptors(smooth_images(2, 16), patches_per_image=None)
    assert [d.shape for d in dense] == [(2 * 10 * 10, 147)]


def test_swd_identical_sets_is_zero():
    a = smooth_images(8)
    per_level, mean = swd(a, a, patches_per_image=None, num_projections=64)
    assert len(per_level) == 2 and mean == 0.0
    # With sampled patches only sampling noise remains: well below the distance to other images.
    assert swd(a, a, patches_per_image=64)[1] < 0.8 * swd(a, smooth_images(8, seed=1), patches_per_image=64)[1]


def test_swd_is_deterministic_given_generator():
    a, b = smooth_images(4), smooth_images(4, seed=1)
    first = swd(a, b, patches_per_image=32, num_projections=64, generator=gen(7))
    assert swd(a, b, patches_per_image=32, num_projections=64, generator=gen(7)) == first
    assert swd(a, b, patches_per_image=32, num_projections=64, generator=gen(8)) != first


def test_swd_permutation_invariant():
    a, b = smooth_images(8), smooth_images(6, seed=1)
    base = swd(a, b, patches_per_image=None, num_projections=64)
    permuted = swd(a[torch.randperm(8, generator=gen(2))], b.flip(0), patches_per_image=None, num_projections=64)
    assert permuted[1] == pytest.approx(base[1], rel=1e-9)


def test_swd_increases_with_noise_level():
    a = smooth_images(8)
    noise = torch.randn(a.shape, generator=gen(1))
    results = [swd(a, a + s * noise, patches_per_image=None, num_projections=64) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    for level in range(2):
        values = [r[0][level] for r in results]
        assert all(lo < hi for lo, hi in itertools.pairwise(values)), values


def test_swd_ignores_global_channel_offset_and_gain():
    # By design (per-set channel normalisation, Karras et al. 2018 App. D).
    a = smooth_images(4)
    assert swd(a, 0.5 * a + 0.3, patches_per_image=None, num_projections=64)[1] < 1e-2


def test_wasserstein_1d_unequal_sizes_matches_equal_sizes():
    a, b = torch.randn(50, 3, generator=gen(0), dtype=f64), torch.randn(50, 3, generator=gen(1), dtype=f64) + 1
    # Repeating a sample set leaves its empirical distribution unchanged.
    torch.testing.assert_close(wasserstein_1d(a, b.repeat(3, 1)), wasserstein_1d(a, b))
    shifted = wasserstein_1d(a[:20], a[:20].repeat(2, 1) + 0.7)  # pure shift: W1 = shift
    torch.testing.assert_close(shifted, torch.full((3,), 0.7, dtype=f64))
    desc = torch.randn(40, 12, generator=gen(2))
    assert sliced_wasserstein_distance(desc, desc.repeat(2, 1), channels=3, num_projections=16) < 1e-12


def test_wasserstein_1d_is_the_integral_of_the_cdf_difference():
    """The quantile form against ∫ |F_a − F_b| dx over the merged support, sizes coprime."""
    a, b = torch.randn(37, 5, generator=gen(3), dtype=f64), 2 * torch.randn(23, 5, generator=gen(4), dtype=f64)
    x = torch.cat([a, b]).sort(dim=0).values.T.contiguous()  # (P, N + M)
    cdf_a = torch.searchsorted(a.sort(dim=0).values.T.contiguous(), x[:, :-1].contiguous(), right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort(dim=0).values.T.contiguous(), x[:, :-1].contiguous(), right=True) / len(b)
    torch.testing.assert_close(wasserstein_1d(a, b), ((cdf_a - cdf_b).abs() * x.diff(dim=1)).sum(1))


# Precision / recall / density / coverage ------------------------------------------------


def test_prdc_identical_sets_is_one():
    x = torch.randn(50, 8, generator=gen(0))
    r = prdc(x, x, k=3)
    assert r["precision"] == r["recall"] == r["coverage"] == 1.0
    assert r["density"] >= 1.0  # each sample lies at least in its own copy's ball


def test_prdc_disjoint_far_sets_is_zero():
    x = torch.randn(40, 8, generator=gen(0))
    y = torch.randn(30, 8, generator=gen(1)) + 100
    assert prdc(x, y, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_permutation_invariant_and_chunking():
    x, y = torch.randn(60, 8, generator=gen(0)), torch.randn(45, 8, generator=gen(1)) * 1.5
    base = prdc(x, y, k=3)
    assert prdc(x[torch.randperm(60, generator=gen(2))], y.flip(0), k=3, chunk_size=7) == base
    assert 0.0 < base["precision"] < 1.0 and 0.0 < base["recall"] <= 1.0


def test_prdc_mode_collapse_has_precision_without_recall():
    x = torch.randn(200, 2, generator=gen(0), dtype=f64)
    collapsed = x[x[:, 0] > 1.0]  # generated samples cover only one tail of the real data
    r = prdc(x, collapsed, k=3)
    assert r["precision"] == 1.0 and r["recall"] < 0.5 and r["coverage"] < 0.5


def test_knn_radii_on_a_line():
    x = torch.arange(6, dtype=f64)[:, None]  # 0..5: 3rd neighbour of 0 is at 3, of 2 is at 5 (dist 3)
    torch.testing.assert_close(knn_radii(x, k=3), torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0, 3.0], dtype=f64))


# Inception score -------------------------------------------------------------------------


def confident_logits(labels: torch.Tensor, classes: int = 1000) -> torch.Tensor:
    return F.one_hot(labels, classes).to(f64) * 100


def test_inception_score_uniform_over_k_confident_classes_is_k():
    k = 5
    mean, std = inception_score(confident_logits(torch.arange(50) % k), splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_identical_predictions_is_one():
    logits = torch.randn(1, 1000, generator=gen(0)).expand(40, -1)
    assert inception_score(logits, splits=4)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_permutation_invariant_with_one_split():
    logits = torch.randn(64, 10, generator=gen(0)) * 3
    base = inception_score(logits, splits=1)[0]
    assert 1.0 < base < 10.0
    assert inception_score(logits[torch.randperm(64, generator=gen(1))], splits=1)[0] == pytest.approx(base, rel=1e-12)


# CLIP score ------------------------------------------------------------------------------


def test_clip_score_identical_embeddings_is_max_and_negatives_clip_to_zero():
    e = torch.randn(4, 16, generator=gen(0))
    torch.testing.assert_close(clip_score(e, 3 * e), torch.full((4,), 2.5, dtype=f64))
    torch.testing.assert_close(clip_score(e, -e, w=100), torch.zeros(4, dtype=f64))
    ortho = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(clip_score(ortho, ortho.flip(0)), torch.zeros(2, dtype=f64))


def test_clip_score_pair_permutation_invariant_mean_and_encoders():
    img, txt = torch.randn(8, 16, generator=gen(0)), torch.randn(8, 16, generator=gen(1))
    perm = torch.randperm(8, generator=gen(2))
    assert clip_score(img[perm], txt[perm]).mean().item() == pytest.approx(clip_score(img, txt).mean().item())
    scores = clip_score_from_encoders(img, txt, lambda x: x * 2, lambda t: t + 0, w=100)
    torch.testing.assert_close(scores, 100 * F.cosine_similarity(img.to(f64), txt.to(f64), dim=-1).clamp_min(0))


# Feature extractors ----------------------------------------------------------------------


def test_tiny_features_deterministic_from_seed_and_frozen():
    images = smooth_images(3, 64)
    state = torch.random.get_rng_state()
    f1, f2, f3 = tiny_features(16, seed=0), tiny_features(16, seed=0), tiny_features(16, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    out = f1(images)
    assert out.shape == (3, 16) and not out.requires_grad
    assert torch.equal(out, f2(images)) and not torch.allclose(out, f3(images))
    assert f1(smooth_images(2, 32)).shape == (2, 16)  # any input size is resized
    assert frechet_distance_from_features(out, out) == pytest.approx(0.0, abs=1e-8)


def test_inception_features_shapes_without_weights():
    pool, logits = inception_features(pretrained=False)(smooth_images(2, 32))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1000)


def test_dinov2_features_shapes_without_weights():
    feats = dinov2_features(pretrained=False)(smooth_images(2, 32))
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()


def test_end_to_end_tiny_metrics_rank_noisier_images_worse():
    extract = tiny_features(32)
    real = smooth_images(64, seed=0)
    close, far = (
        smooth_images(64, seed=1),
        smooth_images(64, seed=2) + 0.5 * torch.randn(64, 3, 32, 32, generator=gen(3)),
    )
    fr, fc, ff = extract(real), extract(close), extract(far)
    assert frechet_distance_from_features(fr, fc) < frechet_distance_from_features(fr, ff)
    assert prdc(fr, fc)["precision"] > prdc(fr, ff)["precision"]
    assert math.isfinite(swd(real, far)[1])
