"""The held-out split, decided by sample id alone so every stage and every node agrees.

Training stages drop held-out rows; the evaluate stage compares samples against them. A hash
(not a row position) keeps the split stable when shards are re-cut or the dataset grows.
"""

from __future__ import annotations

import hashlib

import numpy as np


def heldout_mask(sample_ids, fraction: float, salt: str = "genmodels-heldout") -> np.ndarray:
    """Boolean array: True where the sample belongs to the held-out set (≈ ``fraction`` of ids)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    cut = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.sha256(f"{salt}:{s}".encode()).digest()[:4], "big") < cut
                     for s in sample_ids], dtype=bool)


def row_ids(sample_ids) -> np.ndarray:
    """Stable int64 ids from sample ids (the training loop's exact-resume key)."""
    return np.array([int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:8], "big") >> 1 for s in sample_ids],
                    dtype=np.int64)
