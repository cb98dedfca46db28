"""``build-map label`` and ``build-map score``: renew a bundle's labels, cluster names and scores in place."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from build_map.bundle.read import load_bundle
from build_map.cli.main import main


@pytest.fixture
def bundle_dir(tiny_bundle_dir, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, out)
    return out


def test_score_fills_in_scores_with_the_judges_name(bundle_dir, capsys):
    old = load_bundle(bundle_dir)
    assert main(["score", str(bundle_dir)]) == 0
    assert "label scores (offline-overlap" in capsys.readouterr().out
    new = load_bundle(bundle_dir)
    visible = ~new.features["dead"] & ~new.features["hidden"]
    scored = new.features.loc[visible, "fuzzing"]
    assert scored.notna().all() and scored.between(0, 1).all()
    assert new.features.loc[~visible, "detection"].isna().all()
    assert set(new.features.loc[visible, "label_judge"]) == {"offline-overlap"}
    assert new.manifest["label_scores"]["judge"] == "offline-overlap"
    assert new.features["label"].equals(old.features["label"]) and new.examples.equals(old.examples)


def test_label_renews_labels_and_cluster_names_and_drops_stale_scores(bundle_dir, capsys):
    old = load_bundle(bundle_dir)
    assert main(["label", str(bundle_dir), "--no-score"]) == 0
    assert "not scored" in capsys.readouterr().out
    new = load_bundle(bundle_dir)
    assert not new.features["label"].equals(old.features["label"])  # the tiny bundle's labels are made up
    assert new.features["detection"].isna().all()  # old scores said nothing of the new labels
    for level, column in enumerate(new.cluster_columns):
        names = set(new.clusters.loc[new.clusters["level"] == level, "name"])
        assert set(new.features[column]) <= names
        assert not any(name.startswith("cluster ") for name in names)
    # the clustering itself is kept: same members per cluster, only the names change
    same = old.features[old.cluster_columns[-1]].factorize()[0]
    renamed = new.features[new.cluster_columns[-1]].factorize()[0]
    assert np.array_equal(same, renamed)


def test_label_options_are_checked_before_any_work(bundle_dir, capsys):
    assert main(["label", str(bundle_dir), "--labeler", "ftp://example.org/v1"]) == 2
    assert "is no labeller or judge" in capsys.readouterr().err
    assert main(["label", str(bundle_dir), "--dry-run"]) == 0
    assert "sends nothing" in capsys.readouterr().out


def test_relabel_says_when_the_builds_label_file_is_gone(bundle_dir, caplog):
    import json

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["build"] = {**manifest.get("build", {}), "labels_file": str(bundle_dir / "gone.csv")}
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    from build_map.pipeline.relabel import relabel_bundle

    with caplog.at_level("WARNING"):  # not through main(): its logging setup replaces caplog's handler
        relabel_bundle(bundle_dir, judge=None)
    assert "gone.csv, which is gone" in caplog.text and "Rebuild with --labels" in caplog.text
