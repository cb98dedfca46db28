"""build_map/layout.py: UMAP's layout step on a given kNN graph, checked against umap-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from build_map.geometry.knn import exact_knn
from build_map.geometry.layout import find_ab_params, fuzzy_graph, smooth_knn_dist, spectral_init, umap_layout
from build_map.geometry.projection import trustworthiness_sample


def _planted(
    n_groups: int = 8, per_group: int = 120, d: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, d))
    labels = np.repeat(np.arange(n_groups), per_group)
    rows = centres[labels] + 0.35 * rng.standard_normal((len(labels), d))
    return rows.astype(np.float32), labels


def _knn(rows: np.ndarray, k: int = 15) -> tuple[np.ndarray, np.ndarray]:
    indices, distances = exact_knn(torch.from_numpy(rows), k - 1)
    n = len(rows)
    own = np.arange(n)[:, None]
    return np.hstack([own, indices]), np.hstack([np.zeros((n, 1), np.float32), distances])


def test_memberships_sum_to_log2_k():
    rng = np.random.default_rng(1)
    distances = np.sort(rng.uniform(0.1, 1.0, (200, 15)), axis=1)
    distances[:, 0] = 0.0  # each row's first neighbour is itself
    rho, sigma = smooth_knn_dist(distances)
    assert np.allclose(rho, distances[:, 1])
    memberships = np.exp(-np.maximum(distances[:, 1:] - rho[:, None], 0) / sigma[:, None]).sum(axis=1)
    assert np.allclose(memberships, math.log2(15), atol=1e-4)


def test_fuzzy_graph_is_symmetric_without_self_loops():
    rows, _ = _planted()
    graph = fuzzy_graph(*_knn(rows))
    assert abs(graph - graph.T).max() < 1e-12
    assert graph.diagonal().max() == 0
    assert graph.data.min() > 0 and graph.data.max() <= 1 + 1e-12


def test_ab_params_match_umap_learn():
    from umap.umap_ import find_ab_params as umap_ab

    assert np.allclose(find_ab_params(1.0, 0.1), umap_ab(1.0, 0.1), rtol=1e-3)
    assert np.allclose(find_ab_params(1.0, 0.5), umap_ab(1.0, 0.5), rtol=1e-3)


@pytest.mark.filterwarnings("ignore:.*(n_jobs|knn_search_index).*:UserWarning")
@pytest.mark.parametrize("init", ["spectral", "pca"])
def test_layout_as_trustworthy_as_umap_learn(init):
    import umap

    rows, labels = _planted()
    indices, distances = _knn(rows)
    ours = umap_layout(rows, indices, distances, init=init, n_epochs=None, min_dist=0.1, seed=0)
    theirs = umap.UMAP(
        n_neighbors=15, metric="cosine", init=init, random_state=0, precomputed_knn=(indices, distances),
        force_approximation_algorithm=True,
    ).fit_transform(rows)  # fmt: skip
    assert ours.shape == (len(rows), 2) and ours.dtype == np.float32 and np.isfinite(ours).all()
    trust_ours = trustworthiness_sample(rows, ours, n_sample=len(rows), k=10)
    trust_theirs = trustworthiness_sample(rows, theirs, n_sample=len(rows), k=10)
    assert trust_ours >= trust_theirs - 0.02, (trust_ours, trust_theirs)
    # The planted groups come out as separate blobs: each point's nearest laid-out neighbour is
    # in its own group.
    d2 = ((ours[:, None] - ours[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert (labels[d2.argmin(1)] == labels).mean() > 0.95


def test_same_seed_same_layout():
    rows, _ = _planted(n_groups=4, per_group=60)
    knn = _knn(rows)
    first = umap_layout(rows, *knn, init="pca", n_epochs=50, min_dist=0.1, seed=3)
    again = umap_layout(rows, *knn, init="pca", n_epochs=50, min_dist=0.1, seed=3)
    other = umap_layout(rows, *knn, init="pca", n_epochs=50, min_dist=0.1, seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_spectral_start_of_a_disconnected_graph_separates_components():
    # Two far-apart groups whose kNN graphs never meet: the eigenvectors would be degenerate
    # without the weak links between components.
    rows, labels = _planted(n_groups=2, per_group=80, d=16, seed=2)
    rows[labels == 1] += 50.0
    graph = fuzzy_graph(*_knn(rows, k=8))
    from scipy.sparse.csgraph import connected_components

    assert connected_components(graph, directed=False)[0] >= 2
    xy = spectral_init(graph, rows)
    assert np.isfinite(xy).all()
    # The leading eigenvector splits the two components cleanly.
    first, second = sorted([xy[labels == 0, 0], xy[labels == 1, 0]], key=np.mean)
    assert first.max() < second.min()


def test_unknown_init_is_refused():
    rows, _ = _planted(n_groups=2, per_group=20)
    with pytest.raises(ValueError, match="unknown init"):
        umap_layout(rows, *_knn(rows), init="tsne", n_epochs=5, min_dist=0.1, seed=0)
