"""Fréchet distance between Gaussians fitted to features (FID, FD_DINOv2).

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Eq. (6): d² = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).
FID is this distance on Inception pool3 features; FD_DINOv2 (Stein et al. 2023) on DINOv2
features. Which extractor produced the features is the caller's choice (see `features.py`).
"""

import torch
from torch import Tensor


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    eigvals, eigvecs = torch.linalg.eigh(a)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance² between N(mu1, sigma1) and N(mu2, sigma2) (Eq. 6).

    Tr((Σ1 Σ2)^{1/2}) is computed as Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})): that matrix is similar
    to Σ1 Σ2 but symmetric PSD, so `eigh` applies and no complex parts appear, even for the
    rank-deficient covariances of fewer samples than dimensions. Computed in float64.
    """
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    sqrt1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return d2.clamp_min(0).item()


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated batch by batch in float64.

    Batches are combined with the pairwise update of Chan, Golub & LeVeque (1979), which keeps
    the centred second moment (no catastrophic cancellation of E[xxᵀ] − μμᵀ). `merge` combines
    the stats of shards, e.g. one per data-parallel rank.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # Σ (x − μ)(x − μ)ᵀ

    def _combine(self, n: int, mean: Tensor, m2: Tensor) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + torch.outer(delta, delta) * (self.n * n / total)
        self.n = total

    @torch.no_grad()
    def update(self, features: Tensor) -> "FeatureStats":
        """Adds a batch of features of shape (B, dim)."""
        x = features.detach().reshape(features.shape[0], self.mean.shape[0]).to(self.mean)
        if x.shape[0] > 0:
            mean = x.mean(0)
            centred = x - mean
            self._combine(x.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds the samples summarised by `other` (same dim)."""
        if other.n > 0:
            self._combine(other.n, other.mean.to(self.mean), other.m2.to(self.mean))
        return self

    @property
    def cov(self) -> Tensor:
        """Unbiased sample covariance (divides by n − 1, as numpy.cov)."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mean, covariance), ready for `frechet_distance`."""
        return self.mean, self.cov


def frechet_distance_from_features(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets of shape (N, dim)."""
    s1 = FeatureStats(features1.shape[1], features1.device).update(features1)
    s2 = FeatureStats(features2.shape[1], features2.device).update(features2)
    return frechet_distance(*s1.stats(), *s2.stats())
