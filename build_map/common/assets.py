"""The project's browser files, all under ``static/``: the map page's scripts, the export page's
card panel, the explorer's components and style sheet, and the npm packages the map needs.

Python code never holds JavaScript or CSS in strings: it asks for a file here.
"""

from __future__ import annotations

import os
from pathlib import Path

STATIC_DIR_ENV = "SAE_MAP_STATIC_DIR"


class AssetError(ValueError):
    """A browser file of the project is missing or cannot be inlined; the message says what to do."""


def static_dir() -> Path:
    """``$SAE_MAP_STATIC_DIR`` or the repository's static/ folder (next to build_map/)."""
    override = os.environ.get(STATIC_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "static"


def asset_path(name: str) -> Path:
    """The path of ``static/NAME``, or an AssetError naming it."""
    path = static_dir() / name
    if not path.is_file():
        raise AssetError(
            f"{path} is missing: the checkout is incomplete, or {STATIC_DIR_ENV} points at another folder."
        )
    return path


def asset_text(name: str, inline_in: str | None = None) -> str:
    """The text of ``static/NAME``. With ``inline_in`` ("script" or "style") it is checked not to
    hold the closing tag that would end that element early once inlined into a page."""
    text = asset_path(name).read_text(encoding="utf-8")
    if inline_in is not None and f"</{inline_in}" in text.lower():
        raise AssetError(f"static/{name} holds '</{inline_in}', which would end its <{inline_in}> element.")
    return text
