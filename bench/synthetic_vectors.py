"""Seeded synthetic vectors for store tests and benchmarks, shaped like CLIP image embeddings or isotropic."""

from __future__ import annotations

import numpy as np


def _normalised(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def embedding_like(
    n: int,
    dim: int = 512,
    seed: int = 0,
    n_clusters: int = 100,
    subspace_dim: int = 48,
    cluster_spread: float = 0.6,
    noise: float = 0.25,
    common_offset: float = 0.9,
) -> np.ndarray:
    """`n` L2-normalised float32 vectors of `dim` that look like CLIP embeddings to an ANN index.

    Real embeddings are anisotropic and clustered: most variance lies in a few dozen directions,
    images of one topic form clusters, and every vector shares a common offset (the "cone" of a
    modality). So: cluster centres (uneven cluster sizes) in a random `subspace_dim`-dimensional
    subspace, points spread around them by `cluster_spread`, a shared mean direction of relative size
    `common_offset` (0.9 gives a mean pairwise cosine near 0.45, as measured on CLIP image embeddings),
    plus isotropic noise of relative size `noise` in all `dim` dimensions. Rows are in random cluster
    order, so to draw queries from the same distribution, draw base and queries in one call and split.
    """
    if not 0 < subspace_dim <= dim:
        raise ValueError(f"subspace_dim must be in 1..{dim}, got {subspace_dim}")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, subspace_dim)))  # orthonormal columns
    centres = rng.standard_normal((n_clusters, subspace_dim))
    sizes = rng.dirichlet(np.full(n_clusters, 0.7))  # uneven topics, like real collections
    labels = rng.choice(n_clusters, size=n, p=sizes)
    latent = centres[labels] + cluster_spread * rng.standard_normal((n, subspace_dim))
    signal_norm = np.sqrt(subspace_dim * (1.0 + cluster_spread**2))  # typical norm of a latent point
    mean_direction = rng.standard_normal(dim)
    mean_direction *= common_offset * signal_norm / np.linalg.norm(mean_direction)
    noise_scale = noise * signal_norm / np.sqrt(dim)  # per dimension, so the noise norm is noise * signal
    x = latent @ basis.T + mean_direction + noise_scale * rng.standard_normal((n, dim))
    return _normalised(x)


def isotropic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """`n` L2-normalised float32 vectors drawn uniformly on the unit sphere (the hardest case for ANN)."""
    return _normalised(np.random.default_rng(seed).standard_normal((n, dim)))
