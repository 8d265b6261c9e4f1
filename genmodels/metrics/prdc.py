"""k-NN precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Each sample φ spans a closed ball whose radius is the distance to its k-th nearest neighbour
within its own set; a set's manifold is the union of its balls (Kynkäänniemi et al. 2019,
"Improved Precision and Recall Metric for Assessing Generative Models", §2, Eq. 1–2):
  precision = fraction of generated samples inside the real manifold,
  recall    = fraction of real samples inside the generated manifold.
Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models", Eq. 3–4:
  density  = (1 / kM) Σ_j #{real balls containing generated sample j}   (can exceed 1),
  coverage = fraction of real balls that contain at least one generated sample.
Distances are Euclidean, computed in float64 in row chunks to bound memory.
"""

import torch
from torch import Tensor


def _distances(x: Tensor, y: Tensor, chunk_size: int):
    """Yields (row slice, float64 distances of those rows of x to all of y)."""
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        yield rows, torch.cdist(x[rows], y)


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (self excluded)."""
    x = features.to(torch.float64)
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples, got {x.shape[0]}")
    radii = x.new_empty(x.shape[0])
    for rows, d in _distances(x, x, chunk_size):
        # The k+1 smallest include the sample itself at distance 0.
        radii[rows] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


@torch.no_grad()
def prdc(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` (M, D) against `real` (N, D).

    k=3 follows Kynkäänniemi et al.; Naeem et al. recommend k=5 for density/coverage.
    """
    real, fake = real.reshape(real.shape[0], -1).to(torch.float64), fake.reshape(fake.shape[0], -1).to(torch.float64)
    radii_real, radii_fake = knn_radii(real, k, chunk_size), knn_radii(fake, k, chunk_size)

    in_real_balls = torch.zeros(fake.shape[0], dtype=torch.long, device=fake.device)
    for rows, d in _distances(fake, real, chunk_size):  # d[j, i] = |fake_j − real_i|
        in_real_balls[rows] = (d <= radii_real).sum(1)

    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for rows, d in _distances(real, fake, chunk_size):  # d[i, j] = |real_i − fake_j|
        recalled[rows] = (d <= radii_fake).any(1)
        covered[rows] = d.amin(1) <= radii_real[rows]

    return {
        "precision": (in_real_balls > 0).double().mean().item(),
        "recall": recalled.double().mean().item(),
        "density": (in_real_balls.double().sum() / (k * fake.shape[0])).item(),
        "coverage": covered.double().mean().item(),
    }
