"""Editing a feature's label from the card: saved beside the bundle, shown at once (card, search,
names), escaped, refused for hidden features, reverted by empty text, and a bad file reported."""

from __future__ import annotations

import pytest

from build_map.bundle.label_edits import label_edits_path, read_label_edits
from build_map.bundle.read import load_bundle
from explorer.ui.app import ExplorerSession
from explorer.ui.html import feature_name
from tests.support.tiny_bundle import HIDDEN_FEATURE, N_FEATURES

SCRIPT = '<script>alert("edited")</script> zebra'


@pytest.fixture
def session(explorer_shared):
    session = ExplorerSession(explorer_shared)
    session.view()
    yield session
    for feature in list(session.bundle.built_labels):  # leave the module's shared bundle as built
        session.bundle.edit_label(feature, "")


def test_saving_shows_the_label_everywhere_and_reverting_restores_it(session, tiny_bundle_dir):
    session.select(4)
    built = session.bundle.features.loc[4, "label"]
    assert session.label_input.value_input == built and not session.label_save.disabled
    session.label_input.value_input = "  zebra\tcrossing  "  # what the browser sends as the user types
    session.label_save.clicks += 1  # the Save button's handler
    assert session.bundle.features.loc[4, ["label", "label_source"]].tolist() == ["zebra crossing", "edited"]
    assert "zebra crossing" in session.card.html and "label: edited" in session.card.html
    assert "vs 2.5 by chance · fuzzing <b>6.0/10</b> vs 5 by chance (of the built label)" in session.card.html
    assert "Saved in bundle.labels.csv" in session.label_hint.object
    assert session.run_search("zebra") == [4]
    assert 'data-feature="4"' in session.search_results.html
    assert feature_name(session.bundle, 4) == "#4 zebra crossing"
    assert read_label_edits(tiny_bundle_dir, N_FEATURES) == {4: "zebra crossing"}
    assert load_bundle(tiny_bundle_dir).features.loc[4, "label"] == "zebra crossing"  # the next explore

    session.search.value_input = "zebra"
    assert session.save_label("")  # empty: the built label again
    assert session.bundle.features.loc[4, ["label", "label_source"]].tolist() == [built, "auto"]
    assert session.search_results.html == '<p class="muted">No label contains “zebra”.</p>'
    assert "Built label restored" in session.label_hint.object
    assert not label_edits_path(tiny_bundle_dir).exists()


def test_an_edited_label_is_escaped(session):
    session.select(2)
    assert session.save_label(SCRIPT)
    for html in (session.card.html, session.add_hint.object, session.label_hint.object):
        assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;edited&quot;)&lt;/script&gt; zebra" in session.card.html
    session.run_search("zebra")
    assert "<script>" not in session.search_results.html and "&lt;script&gt;" in session.search_results.html


def test_hidden_features_cannot_be_edited(session, tiny_bundle_dir):
    session.select(HIDDEN_FEATURE)
    assert session.label_save.disabled and session.label_input.disabled
    assert not session.save_label("peek")
    assert "Hidden features cannot be edited" in session.label_hint.object
    assert not label_edits_path(tiny_bundle_dir).exists()


def test_a_file_that_cannot_be_read_is_reported_and_kept(session, tiny_bundle_dir):
    path = label_edits_path(tiny_bundle_dir)
    path.write_text("id,name\n1,mine\n", encoding="utf-8")
    try:
        session.select(1)
        assert not session.save_label("new")
        assert "Label not saved" in session.label_hint.object and "feature,label" in session.label_hint.object
        assert session.bundle.features.loc[1, "label_source"] == "auto"
        assert path.read_text(encoding="utf-8") == "id,name\n1,mine\n"
    finally:
        path.unlink()
