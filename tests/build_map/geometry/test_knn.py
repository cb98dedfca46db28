"""Nearest decoder directions: exact against brute force, partitioned near-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_map.geometry.config import ProjectConfig
from build_map.geometry.knn import decoder_knn, exact_knn, partitioned_knn, reduce_directions
from tests.support.planted import planted_decoder


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
