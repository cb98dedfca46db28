"""How decoder directions are projected to the map: one frozen config, every field documented."""

from __future__ import annotations

from dataclasses import dataclass

KNN_METHODS = ("auto", "exact", "partitioned")
INITS = ("auto", "spectral", "coarse_spectral", "pca")
LARGE_INIT_MIN_ROWS = 16384
LARGE_EPOCHS = 150


@dataclass(frozen=True)
class ProjectConfig:
    n_neighbors: int = 30
    """UMAP neighbourhood size (kNN graph degree, counting the point itself). 30 rather than
    umap-learn's 15: decoder directions are noisy in thousands of dimensions, and the wider graph
    keeps which families sit near which (docs/ARCHITECTURE.md, "Projection defaults")."""
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
    they are as trustworthy as umap-learn's 200, in less time), else umap-learn's choice (500 below
    10,000 rows, 200 above)."""
    init: str = "auto"
    """UMAP layout initialisation: "spectral" (the kNN graph's Laplacian eigenvectors, as
    umap-learn's; the eigensolver can take minutes on large, strongly clustered kNN graphs),
    "coarse_spectral" (the spectral layout of a graph of ~n/64 k-means buckets, spread back to
    their rows; seconds), "pca" (the rows' first two principal components; instant), or "auto":
    spectral below LARGE_INIT_MIN_ROWS rows, pca from there (the most trustworthy of the three on
    large decoders; docs/ARCHITECTURE.md)."""
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
