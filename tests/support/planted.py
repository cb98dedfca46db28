"""Synthetic decoders with planted structure, for the geometry tests."""

from __future__ import annotations

import numpy as np


def planted_decoder(n_groups: int = 6, per_group: int = 50, d: int = 64, noise: float = 0.35, seed: int = 0):
    """(n_groups * per_group, d) decoder rows around random unit centres, and the group of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    groups = np.repeat(np.arange(n_groups), per_group)
    rows = centres[groups] + noise * rng.standard_normal((len(groups), d)) / np.sqrt(d) * 3
    scale = rng.uniform(0.5, 2.0, (len(groups), 1))  # decoder norms vary; the map must not care
    return (rows * scale).astype(np.float32), groups
