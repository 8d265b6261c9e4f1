"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", §4).

IS = exp(E_x KL(p(y|x) ‖ p(y))), with p(y) the marginal over the evaluated samples; the
customary protocol splits the samples into 10 consecutive groups and reports the mean and
standard deviation over groups. Values from torchvision's Inception-v3 (1000 classes) are not
comparable to published scores from the original TensorFlow graph (1008 classes); see
Barratt & Sharma 2018, "A Note on the Inception Score".
"""

import math

import torch
from torch import Tensor


def _inception_score(log_p: Tensor) -> float:
    # log p(y) = log mean_x p(y|x), via logsumexp for confident (near one-hot) predictions.
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)
    return kl.mean().exp().item()


@torch.no_grad()
def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the IS over `splits` consecutive groups of `logits` (N, classes).

    Pass class logits (e.g. the second output of `inception_features`); for probabilities pass
    their log. Computed in float64. With splits > 1 the result depends on sample order.
    """
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    scores = torch.tensor([_inception_score(chunk) for chunk in log_p.chunk(splits)], dtype=torch.float64)
    std = scores.std(unbiased=False).item() if len(scores) > 1 else 0.0
    return scores.mean().item(), std
