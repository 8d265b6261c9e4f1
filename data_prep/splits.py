"""Id-hash rules: the held-out split, training subsets and row ids, by sample id alone, so that
every stage and every node agrees.

Only the shard stage applies ``heldout_mask`` (it writes the ``split`` column that everyone else
reads). A hash, not a row position, keeps the split stable when shards are re-cut or the
dataset grows.
"""

from __future__ import annotations

import hashlib

import numpy as np


def id_fraction(sample_ids, fraction: float, salt: str) -> np.ndarray:
    """Boolean array, True for ≈ ``fraction`` of the ids, chosen by a salted hash of each id."""
    cut = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.sha256(f"{salt}:{s}".encode()).digest()[:4], "big") < cut
                     for s in sample_ids], dtype=bool)


def heldout_mask(sample_ids, fraction: float) -> np.ndarray:
    """True where the sample belongs to the held-out set (≈ ``fraction`` of ids)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    return id_fraction(sample_ids, fraction, "genmodels-heldout")


def subset_mask(sample_ids, fraction: float) -> np.ndarray:
    """A training subset (e.g. the rows a stage inverts), independent of the held-out split."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    return id_fraction(sample_ids, fraction, "genmodels-subset")


def row_ids(sample_ids) -> np.ndarray:
    """Stable int64 ids from sample ids (the training loop's exact-resume key)."""
    return np.array([int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:8], "big") >> 1 for s in sample_ids],
                    dtype=np.int64)
