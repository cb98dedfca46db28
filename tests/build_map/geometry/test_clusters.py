"""Nested clusters of the map: planted groups recovered, levels nest, Ward merges exact."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from build_map.geometry.clusters import (
    ClusterConfig,
    auto_level_sizes,
    cluster_levels,
    cluster_parents,
    ward_merges,
)


def test_planted_groups_recovered_and_levels_nest(planted):
    directions, groups, xy = planted
    levels = cluster_levels(directions, xy, ClusterConfig(seed=0))
    assert len(levels) >= 3
    counts = [int(lv.max()) + 1 for lv in levels]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    for lv in levels:  # every feature has a cluster, ids are 0..c-1
        assert lv.dtype == np.int64 and lv.min() == 0 and len(np.unique(lv)) == lv.max() + 1
    assert max(adjusted_rand_score(groups, lv) for lv in levels) >= 0.8
    parents = cluster_parents(levels)
    assert set(parents[0].values()) == {-1}
    for i in range(1, len(levels)):
        assert np.array_equal(np.vectorize(parents[i].get)(levels[i]), levels[i - 1])


def test_clustering_directions_space(planted):
    directions, groups, xy = planted
    levels = cluster_levels(directions, xy, ClusterConfig(space="directions", level_sizes=(3, 6, 20)))
    assert max(adjusted_rand_score(groups, lv) for lv in levels) >= 0.8
    cluster_parents(levels)  # nests


def test_cluster_parents_rejects_non_nested_levels():
    with pytest.raises(ValueError, match="does not nest"):
        cluster_parents([np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])])


def test_ward_merges_are_exact_and_monotone():
    rng = np.random.default_rng(0)
    centroids, sizes = rng.standard_normal((30, 2)), rng.integers(1, 20, 30)
    merges, costs = ward_merges(centroids, sizes)
    assert merges.shape == (29, 2) and (np.diff(costs) >= -1e-9).all()
    a, b = merges[0]  # the first merge is the cheapest pair
    pair = sizes[:, None] * sizes[None, :] / (sizes[:, None] + sizes[None, :])
    cost = pair * ((centroids[:, None] - centroids[None]) ** 2).sum(-1)
    np.fill_diagonal(cost, np.inf)
    assert np.isclose(costs[0], cost.min()) and np.isclose(cost[a, b], cost.min())


def test_auto_level_sizes_fit_a_map():
    coarse, mid, fine = auto_level_sizes(65536)
    assert 8 <= coarse <= 20 and 40 <= mid <= 100 and 150 <= fine <= 500
    assert auto_level_sizes(300) == tuple(sorted(auto_level_sizes(300)))
