"""Label edits beside the bundle: saved, re-applied on load, kept through a rebuild, readable by
``--labels``, and a bad edits file never keeps a bundle shut (nor gets overwritten)."""

from __future__ import annotations

import logging

import pytest

from build_map.bundle.label_edits import LabelEditsError, label_edits_path, read_label_edits, save_label_edit
from build_map.bundle.read import load_bundle
from build_map.labels.files import read_label_file
from tests.support.tiny_bundle import HIDDEN_FEATURE, HTML_LABEL, N_FEATURES, write_tables_bundle


@pytest.fixture
def bundle_dir(tmp_path):
    return write_tables_bundle(tmp_path / "maps" / "tiny")


def test_the_file_lives_beside_the_bundle(bundle_dir):
    path = label_edits_path(bundle_dir)
    assert path == bundle_dir.parent / "tiny.labels.csv"
    assert label_edits_path(bundle_dir / ".." / "tiny") == path
    assert not path.exists()  # nothing edited yet: no file


def test_save_reload_and_revert(bundle_dir):
    bundle, label = load_bundle(bundle_dir), "board games, café & dance"
    built = bundle.features.loc[3, "label"]
    assert bundle.edit_label(3, label) == label
    assert bundle.features.loc[3, ["label", "label_source"]].tolist() == [label, "edited"]
    assert bundle.search_labels("café") == [3]

    path = label_edits_path(bundle_dir)
    assert path.read_text(encoding="utf-8") == 'feature,label\n3,"board games, café & dance"\n'
    assert not any(bundle_dir.glob("*.labels.csv"))  # not inside the atomic contents
    again = load_bundle(bundle_dir)
    assert again.features.loc[3, ["label", "label_source"]].tolist() == [label, "edited"]
    assert again.features.loc[4, "label_source"] == "auto"

    assert again.edit_label(3, "") == built  # the built label, without reloading
    assert again.features.loc[3, "label_source"] == "auto"
    assert not path.exists()
    assert load_bundle(bundle_dir).features.loc[3, "label"] == built


def test_rows_are_kept_per_feature_and_the_built_label_is_no_edit(bundle_dir):
    bundle = load_bundle(bundle_dir)
    bundle.edit_label(1, "one")
    bundle.edit_label(2, "two")
    bundle.edit_label(1, "uno")
    assert read_label_edits(bundle_dir, N_FEATURES) == {1: "uno", 2: "two"}
    bundle.edit_label(2, bundle.built_labels[2][0])  # saving the built label back = no edit
    assert read_label_edits(bundle_dir, N_FEATURES) == {1: "uno"}
    assert bundle.features.loc[2, "label_source"] == "auto"


def test_hidden_features_cannot_be_edited(bundle_dir):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(LabelEditsError, match="hidden"):
        bundle.edit_label(HIDDEN_FEATURE, "peek")
    assert not label_edits_path(bundle_dir).exists()


def test_edits_survive_a_rebuild_and_feed_labels(bundle_dir):
    load_bundle(bundle_dir).edit_label(6, HTML_LABEL)
    write_tables_bundle(bundle_dir, overwrite=True)  # the bundle folder is replaced atomically
    assert load_bundle(bundle_dir).features.loc[6, "label"] == HTML_LABEL
    assert load_bundle(bundle_dir, label_edits=False).features.loc[6, "label_source"] == "auto"
    # `build-map build --labels NAME.labels.csv` reads the same file
    imported = read_label_file(label_edits_path(bundle_dir), N_FEATURES)
    assert imported.to_dict() == {6: HTML_LABEL}


@pytest.mark.parametrize(
    "text",
    [
        "feature,label\n3,fine\n999,out of range\n",
        "feature,label\nthree,words\n",
        "id,name\n3,x\n",
        'feature,label\n3,"unclosed\n',
        b"feature,label\n3,\xff\xfe\n",
    ],
)
def test_a_bad_file_opens_the_bundle_without_edits_and_is_left_alone(bundle_dir, text, caplog):
    path = label_edits_path(bundle_dir)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="build_map.bundle.read"):
        bundle = load_bundle(bundle_dir)
    assert (bundle.features["label_source"] == "auto").all()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning and "fix it" in warning and "built labels" in warning
    with pytest.raises(LabelEditsError, match="left as it is"):
        bundle.edit_label(3, "would overwrite")  # a save never replaces a file it cannot read
    assert path.read_bytes() == before


def test_save_checks_the_id(bundle_dir):
    with pytest.raises(LabelEditsError, match="out of range"):
        save_label_edit(bundle_dir, N_FEATURES, "x", N_FEATURES)
