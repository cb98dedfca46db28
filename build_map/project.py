"""Project SAE decoder directions to 2-D: cosine geometry, a kNN graph in torch, UMAP layout.

The fast path, and why it beats ``umap.UMAP(metric="cosine").fit(W_dec)``:

1. Rows are L2-normalised (a decoder direction's norm is a scale, not a meaning).
2. The kNN graph is computed in torch with full-width cosine similarities, so umap-learn's
   NN-descent (its slowest step on 4,096-d data, and most of its first-call numba compile) is
   skipped: the layout starts from our graph.
   * exact: a chunked matmul + top-k over all rows. Used on a GPU (65,536 x 4,096 in seconds)
     and for small SAEs.
   * partitioned (CPU, large SAEs; an exact search of 65,536 x 4,096 takes ~10 min on two
     cores): a spherical k-means of the rows' 64-d PCA splits them into buckets of ~256; each
     bucket is compared, at full width, with the ~2,048 rows of its nearest buckets. That is
     32x less work, and finds the exact neighbours of >99 % of rows on clustered data (tests).
3. The layout is UMAP's (fuzzy graph, PCA or spectral start, SGD with negative sampling),
   computed by ``build_map/layout.py`` rather than umap-learn, seeded so the same input gives
   the same map. It gets the 64-d PCA of the rows for its initial layout.

numba compile cache: importing umap-learn would compile ~20 s of pynndescent's numba code in a
fresh environment, and its layout optimiser is compiled again in every process; layout.py's one
numba function is compiled once (~2 s) and cached. Before numba is first imported we point
``NUMBA_CACHE_DIR`` at the project's cache folder (``<user cache folder>/sae-feature-map/numba``,
or ``$SAE_MAP_CACHE/numba``), unless the user has set ``NUMBA_CACHE_DIR`` themselves, so the
cache is kept with the project's other caches and works where site-packages is read-only
(containers, system installs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from build_map.paths import cache_dir

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 256 * 2**20  # memory for one block of the (chunk, n) similarity matrix
KNN_METHODS = ("auto", "exact", "partitioned")
INITS = ("auto", "spectral", "coarse_spectral", "pca")
LARGE_INIT_MIN_ROWS = 16384
LARGE_EPOCHS = 150


@dataclass(frozen=True)
class ProjectConfig:
    n_neighbors: int = 30
    """UMAP neighbourhood size (kNN graph degree, counting the point itself). 30 rather than
    umap-learn's 15: decoder directions are noisy in thousands of dimensions, and the wider graph
    keeps which families sit near which (trustworthiness of a 65,536 x 4,096 synthetic decoder:
    0.85 at 30, 0.73 at 15; bench/bench_projection.py)."""
    min_dist: float = 0.1
    """UMAP minimum distance between points in the layout; smaller packs clusters tighter."""
    metric: str = "cosine"
    """Distance between directions. Only cosine is supported: SAE decoder directions are
    compared by angle."""
    knn: str = "auto"
    """kNN search: "exact" (all pairs), "partitioned" (full-width cosine within the nearest
    buckets of a k-means partition; near-exact) or "auto": exact on a GPU or when n <= 4 x
    knn_candidates, partitioned otherwise."""
    knn_candidates: int = 2048
    """Rows each row is compared with in the partitioned search (more: slower, closer to exact)."""
    pca_dim: int = 64
    """PCA dimensions of the rows used for the k-means partition and handed to UMAP."""
    n_epochs: int | None = None
    """UMAP optimisation epochs. None: LARGE_EPOCHS from LARGE_INIT_MIN_ROWS rows (after a PCA init
    they reach the trustworthiness of umap-learn's 200 and save a quarter of the layout time),
    else umap-learn's choice (500 below 10,000 rows, 200 above)."""
    init: str = "auto"
    """UMAP layout initialisation: "spectral" (the kNN graph's Laplacian eigenvectors, as
    umap-learn's; the eigensolver can take minutes on large, strongly clustered kNN graphs),
    "coarse_spectral" (the spectral layout of a graph of
    ~n/64 k-means buckets, spread back to their rows; seconds), "pca" (the rows' first two
    principal components; instant), or "auto": spectral below LARGE_INIT_MIN_ROWS rows, pca from
    there (on 32k-65k synthetic decoders pca gave trustworthiness 0.85 against 0.83-0.84 for
    coarse_spectral and 0.74 for spectral)."""
    seed: int | None = 0
    """Random seed; the same seed gives the same layout. None draws a random seed."""
    device: str = "auto"
    """Device for PCA and the kNN search: "auto" (CUDA when available, else CPU), "cpu", "cuda"..."""

    def __post_init__(self) -> None:
        if self.metric != "cosine":
            raise ValueError(f"ProjectConfig.metric={self.metric!r} is not supported; use 'cosine'")
        if self.knn not in KNN_METHODS:
            raise ValueError(f"ProjectConfig.knn={self.knn!r}; choose one of {KNN_METHODS}")
        if self.init not in INITS:
            raise ValueError(f"ProjectConfig.init={self.init!r}; choose one of {INITS}")
        if self.n_neighbors < 2:
            raise ValueError(f"ProjectConfig.n_neighbors={self.n_neighbors} must be >= 2")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else is passed to torch."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_unit_rows(directions: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(n, d) float32 tensor on ``device`` with unit rows (zero rows stay zero)."""
    x = torch.as_tensor(directions).to(device=device, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(
            f"decoder directions must be a 2-D (n_features, d_model) array, got {tuple(x.shape)}"
        )
    return torch.nn.functional.normalize(x, dim=1)


def _knn_chunk_rows(n: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return int(max(1, min(n, _CHUNK_BYTES // (4 * max(n, 1)))))


def _exact_knn_unit(x: torch.Tensor, k: int, chunk: int | None) -> tuple[np.ndarray, np.ndarray]:
    """kNN of unit rows ``x`` (n, d) by cosine, self excluded; k already clipped to n - 1."""
    n = x.shape[0]
    rows = _knn_chunk_rows(n, chunk)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    starts = range(0, n, rows)
    for start in tqdm(starts, desc="exact kNN", unit="chunk", disable=None if len(starts) > 8 else True):
        stop = min(start + rows, n)
        sim = x[start:stop] @ x.T  # (chunk, n)
        local = torch.arange(stop - start, device=x.device)
        sim[local, local + start] = -torch.inf  # a feature is not its own neighbour
        top_sim, top_idx = torch.topk(sim, k, dim=1)  # sorted, most similar first
        indices[start:stop] = top_idx.cpu().numpy()
        distances[start:stop] = (1.0 - top_sim).clamp_(min=0.0).cpu().numpy()
    return indices, distances


def exact_knn(
    directions: np.ndarray | torch.Tensor, k: int, device: str = "auto", chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each row by cosine distance, the row itself excluded.

    Returns ``(indices, distances)``: int64 (n, k) and float32 (n, k), nearest first; distances
    are ``1 - cosine similarity`` (in [0, 2]). ``k`` is clipped to ``n - 1``. The (n, n)
    similarity matrix is never held: rows are processed ``chunk`` at a time (default: as many as
    fit in 256 MiB), so a 65,536 x 4,096 decoder needs ~1 GiB plus one chunk.
    """
    dev = resolve_device(device)
    x = _as_unit_rows(directions, dev)  # (n, d)
    k = max(0, min(int(k), x.shape[0] - 1))
    with torch.inference_mode():
        return _exact_knn_unit(x, k, chunk)


def reduce_directions(
    directions: np.ndarray | torch.Tensor, pca_dim: int | None, device: str = "auto", seed: int | None = 0
) -> torch.Tensor:
    """Unit-normalised rows, PCA-reduced to ``pca_dim`` when d > pca_dim: (n, min(d, pca_dim))."""
    return _pca(_as_unit_rows(directions, resolve_device(device)), pca_dim, seed)


def _pca(x: torch.Tensor, pca_dim: int | None, seed: int | None, fit_rows: int = 8192) -> torch.Tensor:
    """Rows of ``x`` (n, d) on their top ``pca_dim`` principal axes (x itself when d <= pca_dim).

    The axes are fitted on a random sample of ``fit_rows`` rows (a randomised SVD, Halko et al.),
    then every row is projected: for 65,536 rows this is several times cheaper than fitting on
    all of them, and the top axes of 8k rows are as good for a partition or a UMAP init.
    """
    n, d = x.shape
    if pca_dim is None or d <= pca_dim or n <= pca_dim:
        return x
    rng = np.random.default_rng(seed)
    rows = torch.as_tensor(np.sort(rng.choice(n, size=min(n, max(fit_rows, pca_dim)), replace=False)))
    rng_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)  # svd_lowrank draws its random test matrix from the global RNG
    with torch.inference_mode():
        sample = x[rows.to(x.device)]
        mean = sample.mean(dim=0, keepdim=True)
        # 10 extra random vectors (oversampling) make the top pca_dim axes accurate.
        _, _, axes = torch.svd_lowrank(sample - mean, q=min(pca_dim + 10, d, len(rows)), niter=2)
        reduced = (x - mean) @ axes[:, :pca_dim]  # (n, pca_dim)
    torch.random.set_rng_state(rng_state)
    return reduced


def _spherical_kmeans(x: torch.Tensor, n_clusters: int, seed: int | None, iters: int = 10) -> torch.Tensor:
    """Bucket of each unit row of ``x`` (n, p): k-means by cosine, seeded, ``iters`` rounds."""
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    start = torch.randperm(x.shape[0], generator=generator)[:n_clusters].to(x.device)
    centroids = x[start].clone()
    for _ in range(iters + 1):
        labels = torch.cat([(x[i : i + 8192] @ centroids.T).argmax(1) for i in range(0, x.shape[0], 8192)])
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = torch.bincount(labels, minlength=n_clusters)[:, None] > 0
        centroids = torch.where(filled, torch.nn.functional.normalize(sums, dim=1), centroids)
    return labels


def _partitioned_knn_unit(
    x: torch.Tensor, coarse: torch.Tensor, k: int, n_candidates: int, bucket_size: int, seed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """kNN of unit rows ``x`` (n, d), searched among the rows of each row's nearest buckets.

    Buckets: spherical k-means of ``coarse`` (n, p), unit rows. Each bucket's rows are compared
    at full width with every row of the buckets whose centroids are nearest its own, taken until
    there are ``n_candidates`` of them; with n_candidates >= n this is the exact search.
    """
    n = x.shape[0]
    n_buckets = max(1, n // bucket_size)
    labels = _spherical_kmeans(coarse, n_buckets, seed)
    order = torch.argsort(labels, stable=True)
    x_sorted = x[order]  # rows grouped by bucket
    counts = torch.bincount(labels, minlength=n_buckets)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
    centroids = torch.nn.functional.normalize(
        torch.zeros_like(coarse[:n_buckets]).index_add_(0, labels, coarse), dim=1
    )
    nearest_buckets = torch.argsort(centroids @ centroids.T, dim=1, descending=True)  # (B, B)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    order_np = order.cpu().numpy()
    for b in tqdm(range(n_buckets), desc="kNN", unit="bucket", disable=None if n_buckets > 16 else True):
        if counts[b] == 0:
            continue
        taken = torch.cumsum(counts[nearest_buckets[b]], 0)
        m = int(torch.searchsorted(taken, max(n_candidates, k + 1))) + 1
        chosen = nearest_buckets[b, :m].tolist()
        lo, hi = offsets[b], offsets[b + 1]
        sim = torch.cat([x_sorted[lo:hi] @ x_sorted[offsets[c] : offsets[c + 1]].T for c in chosen], dim=1)
        positions = torch.cat([torch.arange(offsets[c], offsets[c + 1], device=x.device) for c in chosen])
        sim[positions[None, :] == torch.arange(lo, hi, device=x.device)[:, None]] = -torch.inf  # not itself
        top_sim, top = torch.topk(sim, k, dim=1)
        rows = order_np[lo:hi]
        indices[rows] = order_np[positions[top].cpu().numpy()]
        distances[rows] = (1.0 - top_sim).clamp_(min=0.0).cpu().numpy()
    return indices, distances


def partitioned_knn(
    directions: np.ndarray | torch.Tensor,
    k: int,
    *,
    n_candidates: int = 2048,
    bucket_size: int = 256,
    pca_dim: int = 64,
    seed: int | None = 0,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Near-exact cosine kNN for large inputs on CPU; same output as ``exact_knn``.

    Distances are exact (full width); a neighbour is missed only when it lies outside the
    ``n_candidates`` rows of the row's nearest k-means buckets (in a ``pca_dim``-d PCA). Costs
    about n x n_candidates x d, against n x n x d for the exact search.
    """
    x = _as_unit_rows(directions, resolve_device(device))
    k = max(0, min(int(k), x.shape[0] - 1))
    with torch.inference_mode():
        coarse = torch.nn.functional.normalize(_pca(x, pca_dim, seed), dim=1)
        return _partitioned_knn_unit(x, coarse, k, n_candidates, bucket_size, seed)


def decoder_knn(
    directions: np.ndarray | torch.Tensor, k: int, cfg: ProjectConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest decoder directions of each feature (cosine, itself excluded), the way the map's
    kNN graph is built: exact or partitioned per ``cfg.knn``. For feature cards' neighbours."""
    cfg = cfg or ProjectConfig()
    device = resolve_device(cfg.device)
    x = _as_unit_rows(directions, device)
    k = max(0, min(int(k), x.shape[0] - 1))
    with torch.inference_mode():
        return _knn(x, _pca(x, cfg.pca_dim, cfg.seed), k, cfg, device)


def _knn(
    x: torch.Tensor, reduced: torch.Tensor, k: int, cfg: ProjectConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    method = cfg.knn
    if method == "auto":
        small = x.shape[0] <= 4 * cfg.knn_candidates
        method = "exact" if device.type != "cpu" or small else "partitioned"
    start = time.perf_counter()
    if method == "exact":
        result = _exact_knn_unit(x, k, None)
    else:
        coarse = torch.nn.functional.normalize(reduced, dim=1)
        result = _partitioned_knn_unit(x, coarse, k, cfg.knn_candidates, 256, cfg.seed)
    logger.info("%s %d-NN of %d x %d on %s: %.1f s", method, k, *x.shape, device, time.perf_counter() - start)
    return result


def ensure_numba_cache() -> None:
    """Point numba's compile cache at the project's user cache folder (see the module docstring)."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return  # the user's own choice wins
    path = str(cache_dir("numba"))
    os.environ["NUMBA_CACHE_DIR"] = path
    if "numba" in sys.modules:  # numba read its config at import: update it in place
        from numba.core import config

        config.CACHE_DIR = path


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
    device = resolve_device(cfg.device)
    x = _as_unit_rows(directions, device)  # (n, d)
    with torch.inference_mode():
        reduced = _pca(x, cfg.pca_dim, cfg.seed)  # (n, <= pca_dim)
        if x.shape[0] < cfg.n_neighbors + 2:
            logger.info(
                "%d directions are too few for UMAP (n_neighbors=%d): PCA layout", x.shape[0], cfg.n_neighbors
            )
            return _small_layout(reduced)
        indices, distances = _knn(x, reduced, cfg.n_neighbors - 1, cfg, device)
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
    labels = np.unique(_spherical_kmeans(coarse, min(n_buckets, n), seed).cpu().numpy(), return_inverse=True)[
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
    from build_map.layout import umap_layout

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
