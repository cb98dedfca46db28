"""Group features into nested clusters at several zoom levels (coarse -> fine).

Method: k-means for the finest level, then a size-weighted Ward agglomeration of those
k-means clusters, cut at the coarser counts. Why this and not HDBSCAN or EVoC:

* Every feature gets a cluster at every level (no noise label for the map or the names to
  special-case) and the levels nest by construction: all coarse levels are cuts of one tree.
* It is fast and has no extra dependency: k-means of 65,536 points into ~300 clusters takes
  ~1 s in 2-D, and the Ward tree over ~300 centroids is exact (the Ward cost of merging two
  groups of points only depends on their sizes and centroids) and takes well under a second.
* A map wants predictable counts per level (roughly 8-20 / 40-100 / 150-500 regions for 65k
  features). Targets scale with n; each coarse level then snaps, within a window around its
  target, to the count with the largest relative jump in Ward merge cost, so real gaps between
  groups (planted or natural) are respected rather than cut at an arbitrary count.

By default clusters are found in the 2-D layout (``space="layout"``): the names are drawn over
map regions, so a cluster must be a contiguous region of the map, and the UMAP layout already
encodes the directions' kNN graph. ``space="directions"`` clusters the (PCA-reduced, unit)
decoder directions instead, for semantics independent of the layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SPACES = ("layout", "directions")


@dataclass(frozen=True)
class ClusterConfig:
    level_sizes: tuple[int, ...] | None = None
    """Target number of clusters per level, coarse to fine. None: from n (``auto_level_sizes``),
    about 13 / 61 / 320 for 65,536 features and 4 / 8 / 22 for 300."""
    space: str = "layout"
    """What is clustered: "layout" (the 2-D map coordinates) or "directions" (the decoder
    directions, unit-normalised and PCA-reduced to ``pca_dim``)."""
    snap: float = 0.5
    """Each coarse level's count may move to anywhere in [target / (1 + snap), target * (1 + snap)]
    to land on the largest gap in Ward merge costs; 0 keeps the targets exactly."""
    pca_dim: int = 64
    """PCA dimensions for ``space="directions"``."""
    seed: int = 0
    """Random seed for k-means (and the PCA sample)."""

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"ClusterConfig.space={self.space!r}; choose one of {SPACES}")
        if self.level_sizes is not None and (not self.level_sizes or any(s < 1 for s in self.level_sizes)):
            raise ValueError(f"ClusterConfig.level_sizes={self.level_sizes!r} must be positive counts")


def auto_level_sizes(n: int) -> tuple[int, int, int]:
    """Three target counts for n features: ~n^0.23, ~n^0.37 and ~1.25 sqrt(n) (13/61/320 at 65,536)."""
    if n <= 0:
        return (0, 0, 0)
    raw = (n**0.23, n**0.37, 1.25 * n**0.5)
    return tuple(int(max(1, min(n, round(r)))) for r in raw)  # type: ignore[return-value]


def _cluster_space(directions: np.ndarray, xy: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    if cfg.space == "layout":
        return np.asarray(xy, dtype=np.float64)
    import torch

    from build_map.geometry.knn import reduce_directions

    reduced = reduce_directions(directions, cfg.pca_dim, device="cpu", seed=cfg.seed)
    return torch.nn.functional.normalize(reduced, dim=1).double().numpy()


def _kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels 0..k'-1 (k' <= k: never more clusters than distinct points)."""
    n_distinct = len(np.unique(points, axis=0))
    k = max(1, min(k, n_distinct))
    if k == 1:
        return np.zeros(len(points), dtype=np.int64)
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(points)
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def ward_merges(centroids: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size-weighted Ward agglomeration of m groups: (merges (m-1, 2) int, costs (m-1,) float).

    Merge t joins the groups represented by ``merges[t]`` (original group ids; the merged group
    keeps the first id). Cost = w_a w_b / (w_a + w_b) * |c_a - c_b|^2, the exact increase in the
    within-cluster sum of squares of the underlying points; it never decreases along the way.
    """
    c = np.asarray(centroids, dtype=np.float64).copy()
    w = np.asarray(sizes, dtype=np.float64).copy()
    m = len(c)
    sq = (c**2).sum(1)
    cost = (
        w[:, None]
        * w[None, :]
        / (w[:, None] + w[None, :])
        * np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0.0)
    )
    np.fill_diagonal(cost, np.inf)
    merges = np.zeros((max(m - 1, 0), 2), dtype=np.int64)
    costs = np.zeros(max(m - 1, 0))
    alive = np.ones(m, dtype=bool)
    for t in range(m - 1):
        a, b = divmod(int(np.argmin(cost)), m)
        a, b = min(a, b), max(a, b)
        merges[t], costs[t] = (a, b), cost[a, b]
        c[a] = (w[a] * c[a] + w[b] * c[b]) / (w[a] + w[b])
        w[a] += w[b]
        alive[b] = False
        cost[b, :] = cost[:, b] = np.inf
        others = alive.copy()
        others[a] = False
        d2 = ((c[others] - c[a]) ** 2).sum(1)
        cost[a, others] = cost[others, a] = w[a] * w[others] / (w[a] + w[others]) * d2
    return merges, costs


def _snap_counts(targets: list[int], costs: np.ndarray, m: int, snap: float) -> list[int]:
    """Choose coarse counts (ascending, <= m) near the targets at the largest merge-cost gaps."""
    # Going from c+1 to c groups costs costs[m - c - 1]; a natural cut at c is where merging
    # further (to c - 1) costs much more than the merges before it.
    log_cost = np.log(np.maximum(costs, 1e-300))
    chosen: list[int] = []
    for target in targets:
        low = max(1, int(np.ceil(target / (1 + snap))), (chosen[-1] + 1) if chosen else 1)
        high = min(m, int(np.floor(target * (1 + snap))))
        if low > high:
            chosen.append(min(max(target, chosen[-1] if chosen else 1), m))
            continue
        counts = np.arange(low, high + 1)
        gaps = np.array([_gap(int(c), log_cost, m) for c in counts])
        best = counts[gaps == gaps.max()]
        chosen.append(int(best[np.argmin(np.abs(best - target))]))
    return chosen


def _gap(count: int, log_cost: np.ndarray, m: int) -> float:
    """log(cost of the merge to count-1) - log(cost of the merge to count); 0 when undefined."""
    if count <= 1 or count >= m:
        return 0.0
    return float(log_cost[m - count] - log_cost[m - count - 1])


def _cut(merges: np.ndarray, m: int, count: int) -> np.ndarray:
    """Group representative (0..m-1) of each of the m leaves after merging down to ``count`` groups."""
    rep = np.arange(m)
    for a, b in merges[: m - count]:
        rep[rep == b] = a
    return rep


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Ids 0..c-1, largest cluster first (ties: the one holding the lowest feature index)."""
    uniq, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    first = np.full(len(uniq), len(labels))
    np.minimum.at(first, inverse, np.arange(len(labels)))
    order = np.lexsort((first, -counts))
    new_id = np.empty(len(uniq), dtype=np.int64)
    new_id[order] = np.arange(len(uniq))
    return new_id[inverse]


def cluster_levels(
    directions: np.ndarray | None, xy: np.ndarray, cfg: ClusterConfig | None = None
) -> list[np.ndarray]:
    """Cluster ids per feature at each level, coarse to fine: a list of int64 (n,) arrays.

    Every feature has a cluster (no noise label) at every level; ids run 0..c-1, largest first;
    the levels nest (``cluster_parents`` gives the tree). ``directions`` (n, d) is only read
    when ``cfg.space == "directions"``.
    """
    cfg = cfg or ClusterConfig()
    xy = np.asarray(xy)
    n = len(xy)
    targets = list(cfg.level_sizes or auto_level_sizes(n))
    if n == 0:
        return [np.zeros(0, dtype=np.int64) for _ in targets]
    if cfg.space == "directions" and directions is None:
        raise ValueError("ClusterConfig.space='directions' needs the decoder directions; pass them")
    points = _cluster_space(directions, xy, cfg)  # type: ignore[arg-type]
    fine = _kmeans(points, targets[-1], cfg.seed)
    m = int(fine.max()) + 1
    sizes = np.bincount(fine, minlength=m)
    centroids = np.stack(
        [np.bincount(fine, weights=points[:, j], minlength=m) for j in range(points.shape[1])], 1
    )
    merges, costs = ward_merges(centroids / sizes[:, None], sizes)
    counts = _snap_counts([min(t, m) for t in targets[:-1]], costs, m, cfg.snap)
    levels = [_relabel_by_size(_cut(merges, m, c)[fine]) for c in counts]
    levels.append(_relabel_by_size(fine))
    logger.info("cluster levels: %s clusters", [int(lv.max()) + 1 for lv in levels])
    return levels


def cluster_parents(levels: list[np.ndarray]) -> list[dict[int, int]]:
    """Parent of each cluster at the next coarser level, aligned with ``levels``.

    ``parents[i][c]`` is the level-(i-1) cluster holding level-i cluster c; level 0's clusters map
    to -1. Raises ValueError when the levels do not nest (a cluster split across two parents).
    """
    parents: list[dict[int, int]] = [{int(c): -1 for c in np.unique(levels[0])}] if levels else []
    for i in range(1, len(levels)):
        pairs = np.unique(np.stack([levels[i], levels[i - 1]], 1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            raise ValueError(f"cluster level {i} does not nest inside level {i - 1}")
        parents.append({int(c): int(p) for c, p in pairs})
    return parents
