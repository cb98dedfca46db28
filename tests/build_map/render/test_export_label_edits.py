"""`build-map export` carries the explorer's label edits (NAME.labels.csv beside the bundle)."""

from __future__ import annotations

from build_map.bundle.read import load_bundle
from build_map.cli.main import main as build_map_main
from tests.support.card_data import cards, read_card_data
from tests.support.tiny_bundle import write_tables_bundle

EDITED = '<script>alert("e")</script> hobbies'


def test_export_carries_edited_labels(tmp_path, monkeypatch):
    drawn = {}

    def fake_map(bundle, config, title):  # the map is tested in test_export.py; here: what it is given
        drawn.update(zip(bundle.features["feature"], bundle.features["label"], strict=True))
        return "<html><body></body></html>"

    monkeypatch.setattr("build_map.render.export.page._render_map", fake_map)
    bundle_dir = write_tables_bundle(tmp_path / "tiny")
    built = load_bundle(bundle_dir).features.loc[11, "label"]
    load_bundle(bundle_dir).edit_label(10, EDITED)

    out = tmp_path / "tiny.html"
    assert build_map_main(["export", str(bundle_dir), str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    by_feature = {c["feature"]: c["label"] for c in cards(*read_card_data(html))}
    assert by_feature[10] == EDITED and by_feature[11] == built
    assert drawn[10] == EDITED  # the exported map's points show it too
    assert "<script>alert" not in html
