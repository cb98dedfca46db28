"""Where the project keeps caches (re-saved models, trained SAEs, demo bundles, numba code)."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

APP_NAME = "sae-feature-map"


def cache_dir(*parts: str) -> Path:
    """``$SAE_MAP_CACHE`` or the user cache folder, plus ``parts``; created on demand."""
    root = Path(os.environ.get("SAE_MAP_CACHE") or user_cache_dir(APP_NAME))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
