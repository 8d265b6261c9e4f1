"""Exact and near-duplicate detection on CLIP image embeddings (SemDeDup, Abbas et al., 2023, §3).

k-means on the embeddings splits the rows into clusters; duplicates are then looked for only
inside a cluster (pairwise cosine), which keeps the work near linear. Exact duplicates (same
content hash) share an embedding and therefore a cluster, so they are found in the same pass.
Every decision is made in a fixed row order, so a rerun makes the same decisions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data_prep.partitions import read_shard_rows
from pipeline.store import Artifact


def embeddings(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column (fixed-size list) as an (N, D) float32 array."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def fit_centroids(scores: Artifact, shards: list[str], k: int, sample: int, iters: int = 10) -> np.ndarray:
    """Spherical k-means on the first ``sample`` rows of ``scores/`` in (shard, key) order:
    deterministic, so a rerun after a crash assigns the same clusters."""
    parts, n = [], 0
    for shard in sorted(shards):
        t = read_shard_rows(scores, "scores", shard, ["key", "embedding"])
        parts.append(embeddings(t))
        n += t.num_rows
        if n >= sample:
            break
    x = np.concatenate(parts)[:sample]
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    k = min(k, len(x))
    c = x[np.linspace(0, len(x) - 1, k).astype(int)].copy()
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                m = members.mean(0)
                c[j] = m / (np.linalg.norm(m) + 1e-8)
    return c


def assign_cluster(batch: pa.Table, *, centroids: np.ndarray) -> pa.Table:
    x = embeddings(batch)
    cluster = (x @ centroids.T).argmax(1).astype(np.int32) if len(centroids) > 1 else np.zeros(len(x), np.int32)
    return batch.append_column("cluster", pa.array(cluster))


def exact_duplicates(hashes: list[str]) -> dict[int, int]:
    """{duplicate: first} among ``hashes`` in order: later copies of the same content hash."""
    first: dict[str, int] = {}
    dups = {}
    for i, h in enumerate(hashes):
        j = first.setdefault(h, i)
        if j != i:
            dups[i] = j
    return dups


def near_duplicates(x: np.ndarray, threshold: float, chunk: int = 1024) -> dict[int, int]:
    """Greedy in row order: row i is a duplicate of the most similar earlier *kept* row when
    their cosine is ≥ ``threshold``; returns {duplicate: kept}. Memory O(chunk * kept)."""
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    kept: list[int] = []
    dups: dict[int, int] = {}
    for a in range(0, len(x), chunk):
        block = x[a:a + chunk]
        prev = block @ x[kept].T if kept else np.zeros((len(block), 0), np.float32)
        intra = block @ block.T
        local: list[int] = []
        for r in range(len(block)):
            best, val = -1, -np.inf
            if prev.shape[1]:
                j = int(prev[r].argmax())
                best, val = kept[j], prev[r, j]
            if local:
                q = int(np.argmax(intra[r, local]))
                if intra[r, local[q]] > val:
                    best, val = a + local[q], intra[r, local[q]]
            if val >= threshold:
                dups[a + r] = best
            else:
                local.append(r)
        kept += [a + q for q in local]
    return dups
