"""Project SAE decoder directions to 2-D: cosine geometry, a kNN graph in torch, UMAP's layout.

Why this beats ``umap.UMAP(metric="cosine").fit(W_dec)``: the kNN graph is computed in torch with
full-width cosine similarities (``build_map.geometry.knn``), so umap-learn's NN-descent (its slowest
step on 4,096-d data, and most of its first-call numba compile) is skipped, and the layout starts
from our graph (``build_map.geometry.layout``: UMAP's fuzzy graph, PCA or spectral start, SGD with
negative sampling), seeded so the same input gives the same map. It gets the 64-d PCA of the rows
for its initial layout.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from build_map.common.devices import pick_device
from build_map.geometry.config import LARGE_EPOCHS, LARGE_INIT_MIN_ROWS, ProjectConfig
from build_map.geometry.knn import as_unit_rows, knn_graph, pca_rows, spherical_kmeans
from build_map.geometry.layout import umap_layout

logger = logging.getLogger(__name__)


def _with_self(indices: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UMAP expects each point to be its own first neighbour, at distance 0."""
    n = indices.shape[0]
    own = np.arange(n, dtype=np.int64)[:, None]
    return (
        np.ascontiguousarray(np.hstack([own, indices])),
        np.ascontiguousarray(np.hstack([np.zeros((n, 1), np.float32), distances])),
    )


def _small_layout(x: torch.Tensor) -> np.ndarray:
    """Layout for too few points to build a kNN graph: the first two principal components."""
    n = x.shape[0]
    xy = np.zeros((n, 2), dtype=np.float32)
    if n >= 2:
        centered = (x - x.mean(dim=0, keepdim=True)).double().cpu().numpy()
        u, s, _ = np.linalg.svd(centered, full_matrices=False)
        m = min(2, u.shape[1])
        xy[:, :m] = (u[:, :m] * s[:m]).astype(np.float32)
        # SVD signs are arbitrary; fix them so the layout is deterministic.
        signs = np.sign(xy[np.abs(xy).argmax(axis=0), [0, 1]])
        xy *= np.where(signs == 0, 1, signs)
    return xy


def project_directions(directions: np.ndarray | torch.Tensor, cfg: ProjectConfig | None = None) -> np.ndarray:
    """2-D UMAP layout of decoder directions (n, d) -> float32 (n, 2).

    With fewer than ``n_neighbors + 2`` directions there is no meaningful kNN graph; the layout
    is then the first two principal components.
    """
    cfg = cfg or ProjectConfig()
    device = pick_device(cfg.device)
    x = as_unit_rows(directions, device)  # (n, d)
    with torch.inference_mode():
        reduced = pca_rows(x, cfg.pca_dim, cfg.seed)  # (n, <= pca_dim)
        if x.shape[0] < cfg.n_neighbors + 2:
            logger.info(
                "%d directions are too few for UMAP (n_neighbors=%d): PCA layout", x.shape[0], cfg.n_neighbors
            )
            return _small_layout(reduced)
        indices, distances = knn_graph(x, reduced, cfg.n_neighbors - 1, cfg, device)
        init = _initial_layout(indices, reduced, cfg)
        data = reduced.cpu().numpy()
    del x
    start = time.perf_counter()
    xy = _umap_layout(data, _with_self(indices, distances), init, cfg)
    logger.info("UMAP layout: %.1f s", time.perf_counter() - start)
    return xy


def _initial_layout(indices: np.ndarray, reduced: torch.Tensor, cfg: ProjectConfig) -> str | np.ndarray:
    """What UMAP starts from: umap-learn's init name, or our coarse spectral layout (n, 2)."""
    init = cfg.init
    if init == "auto":
        init = "pca" if len(indices) >= LARGE_INIT_MIN_ROWS else "spectral"
    if init != "coarse_spectral":
        return init
    start = time.perf_counter()
    coarse = torch.nn.functional.normalize(reduced, dim=1)
    xy = coarse_spectral_layout(indices, coarse, max(3, len(indices) // 64), cfg.seed)
    logger.info("coarse spectral init: %.1f s", time.perf_counter() - start)
    return xy


def coarse_spectral_layout(
    indices: np.ndarray, coarse: torch.Tensor, n_buckets: int, seed: int | None
) -> np.ndarray:
    """A spectral initial layout (n, 2) from a coarsened kNN graph, in UMAP's [-10, 10] box.

    Rows are grouped into ``n_buckets`` spherical k-means buckets of ``coarse`` (n, p unit rows);
    buckets are linked by the kNN edges between their rows (``indices`` (n, k), self excluded),
    plus weak links to their 5 most similar buckets so the graph is connected. The bucket
    graph's two leading non-trivial eigenvectors place the buckets, as umap-learn's spectral
    init would place rows; each row starts at its bucket, slightly jittered.
    """
    n = len(indices)
    labels = np.unique(spherical_kmeans(coarse, min(n_buckets, n), seed).cpu().numpy(), return_inverse=True)[
        1
    ]
    n_buckets = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    if n_buckets < 3:
        return rng.uniform(-10, 10, (n, 2)).astype(np.float32)
    weights = np.zeros((n_buckets, n_buckets))
    np.add.at(weights, (np.repeat(labels, indices.shape[1]), labels[indices.ravel()]), 1.0)
    weights += weights.T
    np.fill_diagonal(weights, 0.0)
    weights += 1e-3 * max(weights.sum(1).mean(), 1.0) * _similar_buckets(coarse, labels, n_buckets)
    scale = 1.0 / np.sqrt(weights.sum(1))
    _, vectors = np.linalg.eigh(scale[:, None] * weights * scale[None, :])  # ascending eigenvalues
    xy = vectors[:, [-2, -3]]  # the leading one is trivial (sqrt of the degrees)
    xy *= np.sign(xy[np.abs(xy).argmax(0), [0, 1]])  # eigenvector signs are arbitrary: fix them
    xy *= 10.0 / np.abs(xy).max()
    spacing = np.median(np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=-1), axis=1)[:, 1])
    return (xy[labels] + rng.normal(scale=0.3 * spacing + 1e-4, size=(n, 2))).astype(np.float32)


def _similar_buckets(coarse: torch.Tensor, labels: np.ndarray, n_buckets: int, k: int = 5) -> np.ndarray:
    """Symmetric (B, B) links from each bucket to its k most similar by centroid, row sums ~1."""
    sums = torch.zeros(n_buckets, coarse.shape[1], dtype=coarse.dtype, device=coarse.device)
    sums.index_add_(0, torch.as_tensor(labels, device=coarse.device), coarse)
    centroids = torch.nn.functional.normalize(sums, dim=1).cpu().double().numpy()
    sim = centroids @ centroids.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, n_buckets - 1)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    links = np.zeros_like(sim)
    np.put_along_axis(links, nearest, 1.0 / k, axis=1)
    return np.maximum(links, links.T)


def _umap_layout(
    data: np.ndarray, knn: tuple[np.ndarray, np.ndarray], init: str | np.ndarray, cfg: ProjectConfig
) -> np.ndarray:
    return umap_layout(
        data,
        *knn,
        init=init,
        n_epochs=cfg.n_epochs or (LARGE_EPOCHS if len(data) >= LARGE_INIT_MIN_ROWS else None),
        min_dist=cfg.min_dist,
        seed=cfg.seed,
    )


def trustworthiness_sample(
    directions: np.ndarray | torch.Tensor, xy: np.ndarray, n_sample: int = 2000, k: int = 10, seed: int = 0
) -> float:
    """sklearn's trustworthiness (cosine in the original space) on a random sample of rows.

    1.0 means every point's k nearest neighbours in the layout are also near it in the original
    space. Exact trustworthiness is O(n^2); a sample of a few thousand rows estimates it well.
    """
    from sklearn.manifold import trustworthiness

    x = torch.as_tensor(directions).to(torch.float32).cpu().numpy()
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n_sample, n), replace=False))
    k = min(k, (len(rows) - 1) // 2)
    if k < 1:
        return 1.0
    return float(trustworthiness(x[rows], np.asarray(xy)[rows], n_neighbors=k, metric="cosine"))
