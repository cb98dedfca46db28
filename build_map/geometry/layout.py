"""UMAP's layout step, given a kNN graph: the fuzzy graph, the initial layout and the SGD.

This follows umap-learn 0.5 (McInnes, Healy & Melville; ``umap_.py`` and ``layouts.py``) step by
step: per-row ``rho``/``sigma`` so that each row's memberships sum to log2(k), the fuzzy union
of the directed graph with its transpose, edges sampled in proportion to their weight, the
``1 / (1 + a d^2b)`` curve fitted to ``min_dist``, attraction along edges and repulsion from
``negative_sample_rate`` random points per sample, learning rate decaying linearly to zero.

Why not umap-learn itself (it stays the benchmark's baseline): importing it compiles ~20 s of
numba code in a fresh environment (pynndescent, which we never use: the kNN graph is ours), and
its layout optimiser is compiled again in every process (~10 s), as it cannot be cached. Here
the one numba function is compiled with ``cache=True`` (~2 s, once per machine; the cache
lives in the project's cache folder, see ``ensure_numba_cache``), and the rest is
vectorised numpy/scipy. The optimiser is single-threaded and seeded, so a seed gives the same
layout every time (umap-learn with a seed is single-threaded too).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from build_map.common.paths import cache_dir

logger = logging.getLogger(__name__)

SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3
NEGATIVE_SAMPLE_RATE = 5
REPULSION_STRENGTH = 1.0
MAX_COMPONENTS_TO_LINK = 2000  # beyond this many graph components the spectral init gives way to PCA
EPOCHS_PER_CALL = 10  # epochs per call into the compiled optimiser (one progress-bar step)


# ------------------------------------------------------------------------------ fuzzy graph


def smooth_knn_dist(distances: np.ndarray, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``rho`` (distance to the nearest other point) and ``sigma`` such that
    sum_j exp(-max(0, d_ij - rho) / sigma) = log2(k) over the row's neighbours after itself.
    ``distances`` is (n, k), each row's first entry the point itself. Binary search on all rows
    at once (umap-learn does it row by row)."""
    d = distances.astype(np.float64)
    n, k = d.shape
    target = math.log2(k)
    positive = np.where(d > 0, d, np.inf)
    rho = positive.min(axis=1)
    rho[~np.isfinite(rho)] = 0.0
    shifted = d[:, 1:] - rho[:, None]
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        s = shifted[rows]
        psum = np.where(s > 0, np.exp(-np.maximum(s, 0) / mid[rows, None]), 1.0).sum(axis=1)
        done = np.abs(psum - target) < SMOOTH_K_TOLERANCE
        above = psum > target
        hi[rows] = np.where(above, mid[rows], hi[rows])
        lo[rows] = np.where(above, lo[rows], mid[rows])
        bounded = np.isfinite(hi[rows])
        mid[rows] = np.where(done, mid[rows], np.where(bounded, (lo[rows] + hi[rows]) / 2, mid[rows] * 2))
        active[rows[done]] = False
    floor = MIN_K_DIST_SCALE * np.where(rho > 0, d.mean(axis=1), d.mean())
    return rho, np.maximum(mid, floor)


def fuzzy_graph(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """Symmetric (n, n) fuzzy membership graph of a kNN graph ((n, k) arrays, self first):
    each directed edge weighs exp(-(d - rho_i) / sigma_i), then A + A^T - A * A^T."""
    n, k = indices.shape
    rho, sigma = smooth_knn_dist(distances)
    excess = distances.astype(np.float64) - rho[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma is 0 only where excess <= 0
        weights = np.where(excess <= 0, 1.0, np.exp(-excess / sigma[:, None]))
    rows = np.repeat(np.arange(n), k)
    cols = indices.ravel()
    keep = (cols != rows) & (cols >= 0)
    directed = sp.csr_matrix((weights.ravel()[keep], (rows[keep], cols[keep])), shape=(n, n))
    transpose = directed.T.tocsr()
    graph = (directed + transpose - directed.multiply(transpose)).tocsr()
    graph.eliminate_zeros()
    return graph


def find_ab_params(spread: float = 1.0, min_dist: float = 0.1) -> tuple[float, float]:
    """a, b of the low-dimensional similarity 1 / (1 + a x^2b), fitted (as umap-learn does) to
    1 below min_dist and exp(-(x - min_dist) / spread) above it."""
    from scipy.optimize import curve_fit

    xv = np.linspace(0, spread * 3, 300)
    yv = np.where(xv < min_dist, 1.0, np.exp(-(xv - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2 * b)), xv, yv)
    return float(a), float(b)


# ------------------------------------------------------------------------------ initial layout


def pca_init(data: np.ndarray) -> np.ndarray:
    """The first two principal components of ``data`` (n, p), signs fixed so runs agree."""
    centered = data.astype(np.float64) - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centered[:: max(1, len(centered) // 20000)], full_matrices=False)
    xy = centered @ vt[:2].T
    xy *= np.sign(xy[np.abs(xy).argmax(axis=0), [0, 1]])
    return xy


def spectral_init(graph: sp.csr_matrix, data: np.ndarray) -> np.ndarray:
    """The two leading non-trivial eigenvectors of the graph's normalised Laplacian.

    A kNN graph of SAE directions often falls apart into components (isolated features,
    separate families); their eigenvectors are then degenerate. They are tied together first by
    weak edges along a minimum spanning tree of the components' centroids (in ``data``), so the
    eigenvectors still separate components and place related ones near each other. Falls back
    to PCA when the components are too many or the eigensolver does not converge."""
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = graph.shape[0]
    n_components, labels = connected_components(graph, directed=False)
    if n_components > MAX_COMPONENTS_TO_LINK:
        logger.info("%d graph components: PCA initial layout instead of spectral", n_components)
        return pca_init(data)
    if n_components > 1:
        graph = graph + _component_links(labels, n_components, data, weight=1e-3 * graph.data.mean())
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(degrees))
    laplacian = sp.identity(n, format="csr") - scale @ graph @ scale
    k = 3
    try:
        values, vectors = eigsh(
            laplacian,
            k,
            which="SM",
            ncv=max(2 * k + 1, int(np.sqrt(n))),
            tol=1e-4,
            v0=np.ones(n),
            maxiter=n * 5,
        )
    except ArpackNoConvergence:
        logger.warning("The spectral initialisation did not converge: PCA initial layout instead")
        return pca_init(data)
    xy = vectors[:, np.argsort(values)[1:k]]
    return xy * np.sign(xy[np.abs(xy).argmax(axis=0), [0, 1]])


def _component_links(labels: np.ndarray, n_components: int, data: np.ndarray, weight: float) -> sp.csr_matrix:
    """Symmetric weak edges joining the graph's components along the minimum spanning tree of
    their centroids' cosine distances; each tree edge joins the two components' medoid-like rows
    (the rows nearest their own centroid)."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    unit = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((n_components, unit.shape[1]))
    np.add.at(sums, labels, unit)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    # The row of each component most similar to its centroid stands for it.
    closeness = np.einsum("ij,ij->i", unit, centroids[labels])
    order = np.lexsort((-closeness, labels))
    first = np.searchsorted(labels[order], np.arange(n_components))
    representative = order[first]
    distance = np.clip(1.0 - centroids @ centroids.T, 1e-9, None)  # MST ignores zero entries
    np.fill_diagonal(distance, 0.0)
    tree = minimum_spanning_tree(distance).tocoo()
    a, b = representative[tree.row], representative[tree.col]
    n = len(labels)
    links = sp.csr_matrix((np.full(len(a), weight), (a, b)), shape=(n, n))
    return links + links.T


def scale_init(xy: np.ndarray, seed: int) -> np.ndarray:
    """Into the [0, 10] box the optimiser starts from (umap-learn: max |coord| 10, a 1e-4 jitter,
    then min-max scaling)."""
    rng = np.random.default_rng(seed)
    xy = np.asarray(xy, dtype=np.float64)
    xy = xy * (10.0 / max(np.abs(xy).max(), 1e-12)) + rng.normal(scale=1e-4, size=xy.shape)
    span = np.maximum(xy.max(axis=0) - xy.min(axis=0), 1e-12)
    return np.ascontiguousarray(10.0 * (xy - xy.min(axis=0)) / span, dtype=np.float32)


def ensure_numba_cache() -> None:
    """Point numba's compile cache at the project's cache folder (``<user cache>/sae-feature-map/numba``
    or ``$SAE_MAP_CACHE/numba``) before numba is first imported, unless the user set
    ``NUMBA_CACHE_DIR``: the compiled optimiser is then kept with the project's other caches and
    works where site-packages is read-only (containers, system installs)."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return  # the user's own choice wins
    path = str(cache_dir("numba"))
    os.environ["NUMBA_CACHE_DIR"] = path
    if "numba" in sys.modules:  # numba read its config at import: update it in place
        from numba.core import config

        config.CACHE_DIR = path


# ------------------------------------------------------------------------------ optimisation


def _compiled_sgd():
    """The numba-compiled optimiser (imported and compiled on first use, cached on disk)."""
    global _SGD
    if _SGD is None:
        ensure_numba_cache()
        import numba

        _SGD = numba.njit(cache=True, fastmath=True, nogil=True)(_sgd_epochs)
    return _SGD


_SGD = None


def _sgd_epochs(
    embedding, head, tail, epochs_per_sample, next_sample, epochs_per_negative, next_negative,
    first_epoch, last_epoch, n_epochs, a, b, gamma, seed,
):  # fmt: skip
    """Epochs [first_epoch, last_epoch) of umap-learn's optimize_layout_euclidean (2-D, both ends
    of an edge move), updating ``embedding`` and the sampling schedules in place."""
    np.random.seed(seed)
    n_vertices = embedding.shape[0]
    for epoch in range(first_epoch, last_epoch):
        alpha = 1.0 - max(epoch - 1, 0) / n_epochs  # umap-learn: 1 for the first two epochs
        for i in range(head.shape[0]):
            if next_sample[i] > epoch:
                continue
            j = head[i]
            k = tail[i]
            dx = embedding[j, 0] - embedding[k, 0]
            dy = embedding[j, 1] - embedding[k, 1]
            d2 = dx * dx + dy * dy
            coeff = 0.0
            if d2 > 0.0:
                coeff = -2.0 * a * b * d2 ** (b - 1.0) / (a * d2**b + 1.0)
            gx = min(max(coeff * dx, -4.0), 4.0) * alpha
            gy = min(max(coeff * dy, -4.0), 4.0) * alpha
            embedding[j, 0] += gx
            embedding[j, 1] += gy
            embedding[k, 0] -= gx
            embedding[k, 1] -= gy
            next_sample[i] += epochs_per_sample[i]
            n_negative = int((epoch - next_negative[i]) / epochs_per_negative[i])
            for _ in range(n_negative):
                k = np.random.randint(0, n_vertices)
                if k == j:
                    continue
                dx = embedding[j, 0] - embedding[k, 0]
                dy = embedding[j, 1] - embedding[k, 1]
                d2 = dx * dx + dy * dy
                if d2 <= 0.0:
                    continue
                coeff = 2.0 * gamma * b / ((0.001 + d2) * (a * d2**b + 1.0))
                embedding[j, 0] += min(max(coeff * dx, -4.0), 4.0) * alpha
                embedding[j, 1] += min(max(coeff * dy, -4.0), 4.0) * alpha
            next_negative[i] += n_negative * epochs_per_negative[i]


def optimize_layout(
    embedding: np.ndarray, graph: sp.csr_matrix, n_epochs: int, a: float, b: float, seed: int
) -> np.ndarray:
    """Run the SGD on ``embedding`` (n, 2) float32 in place over the edges of ``graph``."""
    coo = graph.tocoo()
    keep = coo.data >= coo.data.max() / n_epochs  # edges too weak to be sampled even once
    head = coo.row[keep].astype(np.int64)
    tail = coo.col[keep].astype(np.int64)
    weights = coo.data[keep].astype(np.float64)
    epochs_per_sample = weights.max() / weights
    epochs_per_negative = epochs_per_sample / NEGATIVE_SAMPLE_RATE
    next_sample = epochs_per_sample.copy()
    next_negative = epochs_per_negative.copy()
    sgd = _compiled_sgd()
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=n_epochs)
    with tqdm(total=n_epochs, desc="Layout", unit="epoch", disable=len(head) < 200_000) as progress:
        for start in range(0, n_epochs, EPOCHS_PER_CALL):
            stop = min(start + EPOCHS_PER_CALL, n_epochs)
            sgd(
                embedding, head, tail, epochs_per_sample, next_sample, epochs_per_negative, next_negative,
                start, stop, n_epochs, a, b, REPULSION_STRENGTH, int(seeds[start]),
            )  # fmt: skip
            progress.update(stop - start)
    return embedding


def umap_layout(
    data: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
    *,
    init: str | np.ndarray,
    n_epochs: int | None,
    min_dist: float,
    seed: int | None,
) -> np.ndarray:
    """2-D layout (n, 2) float32 of a kNN graph ((n, k) indices and cosine distances, each row's
    own index first) whose rows are ``data`` (n, p; used by the pca and spectral inits).
    ``init``: "pca", "spectral" or an (n, 2) array. ``n_epochs`` None: 500 below 10,000 rows,
    else 200 (umap-learn's choice)."""
    seed = int(np.random.default_rng().integers(2**31 - 1)) if seed is None else seed
    start = time.perf_counter()
    graph = fuzzy_graph(indices, distances)
    n_epochs = n_epochs or (500 if len(data) <= 10_000 else 200)
    if isinstance(init, str) and init == "spectral":
        xy = spectral_init(graph, data)
    elif isinstance(init, str) and init == "pca":
        xy = pca_init(data)
    elif isinstance(init, str):
        raise ValueError(f"unknown init {init!r}; use 'pca', 'spectral' or an (n, 2) array")
    else:
        xy = np.asarray(init, dtype=np.float64)
    embedding = scale_init(xy, seed)
    a, b = find_ab_params(1.0, min_dist)
    logger.info("fuzzy graph (%d edges) and initial layout: %.1f s", graph.nnz, time.perf_counter() - start)
    return optimize_layout(embedding, graph, n_epochs, a, b, seed)
