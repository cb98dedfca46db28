"""Projection of decoder directions to the map: finite, seeded, trustworthy; planted groups stay apart."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from build_map.geometry.clusters import (
    ClusterConfig,
    cluster_levels,
    cluster_parents,
)
from build_map.geometry.config import ProjectConfig
from build_map.geometry.layout import ensure_numba_cache
from build_map.geometry.projection import project_directions, trustworthiness_sample
from tests.support.planted import planted_decoder


def test_projection_is_finite_seeded_and_trustworthy(planted):
    directions, _, xy = planted
    assert xy.shape == (len(directions), 2) and xy.dtype == np.float32
    assert np.isfinite(xy).all()
    assert trustworthiness_sample(directions, xy, n_sample=300, k=10) > 0.9
    again = project_directions(directions, ProjectConfig(seed=0))
    np.testing.assert_allclose(again, xy, atol=1e-4)


def test_partitioned_projection_keeps_groups_apart():
    directions, groups = planted_decoder(n_groups=8, per_group=80, d=256, seed=3)
    cfg = ProjectConfig(knn="partitioned", knn_candidates=128, pca_dim=16, n_epochs=100)
    xy = project_directions(directions, cfg)
    assert np.isfinite(xy).all()
    assert trustworthiness_sample(directions, xy, k=10) > 0.9
    levels = cluster_levels(directions, xy, ClusterConfig())
    assert max(adjusted_rand_score(groups, lv) for lv in levels) >= 0.8


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 16])
def test_tiny_inputs_do_not_crash(n):
    directions = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
    xy = project_directions(directions, ProjectConfig(n_neighbors=15))
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    levels = cluster_levels(directions, xy)
    assert len(levels) == 3 and all(lv.shape == (n,) for lv in levels)
    if n:
        assert len(cluster_parents(levels)) == 3


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
