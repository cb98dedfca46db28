"""The project's browser files come from static/ through one helper, which refuses what cannot be
inlined and names what is missing."""

from __future__ import annotations

import pytest

from build_map.common.assets import STATIC_DIR_ENV, AssetError, asset_path, asset_text, static_dir


def test_the_shipped_browser_files_are_there():
    for name in ("map_bridge.js", "map_preview.js", "export_card.js", "export.css", "explorer.css",
                 "map_tooltip.html", "components/map_view.js", "components/linked_html.js"):  # fmt: skip
        assert asset_path(name).is_file()
        asset_text(name, inline_in="script" if name.endswith(".js") else "style")


def test_missing_and_uninlinable_files_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(STATIC_DIR_ENV, str(tmp_path))
    assert static_dir() == tmp_path
    with pytest.raises(AssetError, match=f"nope.js is missing.*{STATIC_DIR_ENV}"):
        asset_text("nope.js")
    (tmp_path / "bad.js").write_text("console.log('</script>')")
    assert "console.log" in asset_text("bad.js")  # fine as a file of its own
    with pytest.raises(AssetError, match="would end its <script> element"):
        asset_text("bad.js", inline_in="script")
