"""Projection and clustering of decoder directions: planted groups stay together and apart."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from build_map.geometry.clusters import (
    ClusterConfig,
    auto_level_sizes,
    cluster_levels,
    cluster_parents,
    ward_merges,
)
from build_map.geometry.config import ProjectConfig
from build_map.geometry.knn import decoder_knn, exact_knn, partitioned_knn, reduce_directions
from build_map.geometry.layout import ensure_numba_cache
from build_map.geometry.projection import project_directions, trustworthiness_sample


def planted_decoder(n_groups: int = 6, per_group: int = 50, d: int = 64, noise: float = 0.35, seed: int = 0):
    """(n_groups * per_group, d) decoder rows around random unit centres, and the group of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    groups = np.repeat(np.arange(n_groups), per_group)
    rows = centres[groups] + noise * rng.standard_normal((len(groups), d)) / np.sqrt(d) * 3
    scale = rng.uniform(0.5, 2.0, (len(groups), 1))  # decoder norms vary; the map must not care
    return (rows * scale).astype(np.float32), groups


@pytest.fixture(scope="module")
def planted():
    directions, groups = planted_decoder()
    xy = project_directions(directions, ProjectConfig(seed=0))
    return directions, groups, xy


def brute_force_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, 1 - np.take_along_axis(sim, idx, axis=1)


@pytest.mark.parametrize("chunk", [None, 7])
def test_exact_knn_matches_brute_force(chunk):
    x = np.random.default_rng(1).standard_normal((120, 16)).astype(np.float32)
    idx, dist = exact_knn(x, 10, device="cpu", chunk=chunk)
    ref_idx, ref_dist = brute_force_knn(x.astype(np.float64), 10)
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (120, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)
    assert not (idx == np.arange(120)[:, None]).any()


def test_exact_knn_accepts_tensors_and_clips_k():
    x = torch.randn(5, 8, dtype=torch.float64)
    idx, dist = exact_knn(x, 10, device="cpu")
    assert idx.shape == dist.shape == (5, 4)
    assert (np.sort(idx, axis=1) == [[j for j in range(5) if j != i] for i in range(5)]).all()


def test_projection_is_finite_seeded_and_trustworthy(planted):
    directions, _, xy = planted
    assert xy.shape == (len(directions), 2) and xy.dtype == np.float32
    assert np.isfinite(xy).all()
    assert trustworthiness_sample(directions, xy, n_sample=300, k=10) > 0.9
    again = project_directions(directions, ProjectConfig(seed=0))
    np.testing.assert_allclose(again, xy, atol=1e-4)


def test_partitioned_knn_is_exact_with_all_candidates_and_near_exact_with_few():
    directions, _ = planted_decoder(n_groups=8, per_group=80, d=128, seed=2)
    ref_idx, ref_dist = exact_knn(directions, 10, device="cpu")
    idx, dist = partitioned_knn(directions, 10, n_candidates=len(directions), bucket_size=32, pca_dim=16)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-6)
    idx, dist = partitioned_knn(directions, 10, n_candidates=160, bucket_size=32, pca_dim=16)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref_idx, strict=True)])
    assert recall > 0.95 and not (idx == np.arange(len(idx))[:, None]).any()
    assert (np.diff(dist, axis=1) >= 0).all()  # nearest first


def test_partitioned_projection_keeps_groups_apart():
    directions, groups = planted_decoder(n_groups=8, per_group=80, d=256, seed=3)
    cfg = ProjectConfig(knn="partitioned", knn_candidates=128, pca_dim=16, n_epochs=100)
    xy = project_directions(directions, cfg)
    assert np.isfinite(xy).all()
    assert trustworthiness_sample(directions, xy, k=10) > 0.9
    levels = cluster_levels(directions, xy, ClusterConfig())
    assert max(adjusted_rand_score(groups, lv) for lv in levels) >= 0.8


def test_decoder_knn_for_feature_cards():
    directions, groups = planted_decoder()
    idx, dist = decoder_knn(directions, 10, ProjectConfig(device="cpu"))
    assert idx.shape == dist.shape == (len(directions), 10)
    assert (groups[idx] == groups[:, None]).mean() > 0.99  # neighbours come from the same group


def test_reduce_directions_projects_unit_rows():
    x = np.random.default_rng(0).standard_normal((400, 300)).astype(np.float32)
    assert reduce_directions(x, 20, device="cpu").shape == (400, 20)
    assert reduce_directions(x, None, device="cpu").shape == (400, 300)
    with pytest.raises(ValueError, match="knn"):
        ProjectConfig(knn="annoy")


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 16])
def test_tiny_inputs_do_not_crash(n):
    directions = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    xy = project_directions(directions, ProjectConfig(n_neighbors=15))
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    levels = cluster_levels(directions, xy)
    assert len(levels) == 3 and all(lv.shape == (n,) for lv in levels)
    if n:
        assert len(cluster_parents(levels)) == 3


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


def test_numba_cache_respects_user_setting(monkeypatch, tmp_path):
    from numba.core import config

    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)  # restored after the test
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    ensure_numba_cache()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("SAE_MAP_CACHE", str(tmp_path / "cache"))
    ensure_numba_cache()
    assert os.environ["NUMBA_CACHE_DIR"] == config.CACHE_DIR == str(tmp_path / "cache" / "numba")
