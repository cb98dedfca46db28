"""The strength one click sets: a feature's calibrated ``steer_strength`` from the output-effect
probe (``build_map.features.output_probe``), or ``DEFAULT_STRENGTH`` where the bundle has none
(built before the probe, or a feature that was not probed).

Every way of adding a feature without a strength goes through here: "Add to edits", a click on a
feature under a reply, a deep link's bare ``feature=`` and a recipe edit without ``strength``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from build_map.bundle.read import Bundle
from build_map.steering.requests import DEFAULT_STRENGTH

StrengthOf = Callable[[int], float]
"""feature id → the strength an edit of it without one gets."""


def click_strength(bundle: Bundle | None, feature: int) -> float:
    """``steer_strength`` of ``feature`` when the bundle has a finite one, else DEFAULT_STRENGTH
    (also for ids out of range: the validator reports those)."""
    if bundle is None or not 0 <= int(feature) < bundle.n_features:
        return DEFAULT_STRENGTH
    value = (
        bundle.features["steer_strength"].iat[int(feature)] if "steer_strength" in bundle.features else None
    )
    if value is None or pd.isna(value) or not math.isfinite(value):
        return DEFAULT_STRENGTH
    return round(float(value), 4)  # stored as float32: 1.4142 rather than 1.414199948310852


def strength_of(bundle: Bundle | None) -> StrengthOf:
    return lambda feature: click_strength(bundle, feature)


def is_calibrated(bundle: Bundle, feature: int) -> bool:
    """Whether the feature's click strength comes from the probe (not the fallback default)."""
    if "steer_strength" not in bundle.features or not 0 <= int(feature) < bundle.n_features:
        return False
    return bool(pd.notna(bundle.features["steer_strength"].iat[int(feature)]))
