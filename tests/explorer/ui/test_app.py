"""The explorer's Panel page without a browser: clicks, edits, deep links, chat, escaping."""

from __future__ import annotations

import time

import numpy as np
import pytest

from build_map.steering.links import open_link
from build_map.steering.requests import Edit, SteeringLimits
from explorer.ui.app import ExplorerSession
from explorer.ui.html import render_card, render_example
from tests.support.tiny_bundle import CLICK_STRENGTHS, DEAD_FEATURE, HIDDEN_FEATURE, HTML_FEATURE


def click(feature: int) -> float:
    """The planted click strength of a tiny-bundle feature, as the explorer reads it."""
    return round(float(CLICK_STRENGTHS[feature % 4]), 4)


@pytest.fixture
def session(explorer_shared):
    session = ExplorerSession(explorer_shared)
    session.view()  # the layout builds
    session.chat.max_new_tokens.value = 8
    return session


def _finish_turn(session, timeout: float = 60.0) -> None:
    session.chat.wait(timeout)
    deadline = time.monotonic() + timeout
    while session.chat.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not session.chat.busy


# ---------------------------------------------------------------- selection, edits


def test_map_click_updates_card_and_add_updates_edits(session):
    session.map._handle_msg({"type": "feature-click", "feature": 3})
    assert session.selected == 3
    assert '<span class="fid">#3</span>' in session.card.html
    assert not session.add_button.disabled
    assert session.add_selected()
    # one click steers at the feature's calibrated strength (planted: CLICK_STRENGTHS[3 % 4])
    assert session.edits.current() == ([Edit(3, click(3), "nudge")], 1.0)
    assert "calibrated 1.41" in session.edits.rows[0].strength.label
    assert session.add_button.disabled  # already in the edits
    assert not session.add_selected()
    # messages that are not clicks, or carry no integer id, change nothing
    for msg in (
        {"type": "other", "feature": 4},
        {"type": "feature-click", "feature": "4"},
        {"feature": 4},
        None,
    ):
        session.map._handle_msg(msg)
    assert session.selected == 3


def test_edit_rows_strength_mode_remove_reset(session):
    for feature in (1, 2):
        session.select(feature)
        session.add_selected()
    first, second = session.edits.rows
    first.strength.value, second.mode.value = 2.5, "pin"
    session.edits.multiplier.value = 0.5
    assert session.edits.current() == ([Edit(1, 2.5, "nudge"), Edit(2, click(2), "pin")], 0.5)
    first.to_default.clicks += 1  # ↺: back to the calibrated click strength
    assert first.strength.value == click(1)
    limits = session.engine.limits
    assert first.strength.fixed_end == limits.max_abs_strength
    assert second.strength.fixed_start == 0.0  # a pin cannot be negative
    first.remove.clicks += 1
    assert [row.feature for row in session.edits.rows] == [2]
    session.edits.reset_button.clicks += 1
    assert session.edits.current() == ([], 1.0)


def test_neighbour_and_chip_links_select_features(session):
    session.card._handle_msg({"type": "select", "feature": 11})
    assert session.selected == 11
    assert session.map.focus == 11


def test_hidden_feature_cannot_be_added(session):
    session.map._handle_msg({"type": "feature-click", "feature": HIDDEN_FEATURE})
    assert session.add_button.disabled
    assert "Hidden features cannot be steered" in session.add_hint.object
    assert not session.add_selected()
    assert session.edits.current() == ([], 1.0)
    assert "hidden" in session.card.html and "feature 7" not in session.card.html  # label not shown


def test_sessions_do_not_share_edits(explorer_shared):
    one, two = ExplorerSession(explorer_shared), ExplorerSession(explorer_shared)
    one.select(4)
    one.add_selected()
    assert two.edits.current() == ([], 1.0) and two.selected is None


# ---------------------------------------------------------------- search, deep links


def test_search_is_case_insensitive_and_highlights(session):
    matches = session.run_search("APRICOT")
    assert matches and all("apricot" in session.bundle.features.label[m].lower() for m in matches)
    assert session.map.highlights["search"] == matches
    assert HIDDEN_FEATURE not in session.run_search("feature")
    session.run_search("")
    assert session.map.highlights["search"] == []


def test_search_by_meaning_lists_and_lights_the_features_the_text_carries(session):
    import re

    text = "the river runs under the old bridge"
    expected, _ = session.shared.text_features.on_text(text, 30)
    session.search.value_input = text
    session.sort_by.value = "steerability"  # the answer keeps its own order: most specific first
    session.search_meaning(text)
    session.meaning_worker.wait()
    listed = [int(f) for f in re.findall(r'data-feature="(\d+)"', session.meaning_results.html)]
    assert listed == [f for f, _ in expected] and "By meaning" in session.meaning_results.html
    assert session.map.highlights["meaning"] == listed
    assert "usual activation" in session.meaning_results.html
    session.meaning_results.clicked = listed[0]  # a chip selects its feature
    assert session.selected == listed[0]
    session.search_meaning("")
    assert session.meaning_results.html == "" and session.map.highlights["meaning"] == []


def test_search_by_meaning_shows_only_the_newest_query_and_failures(session, monkeypatch):
    import threading

    reader = session.shared.text_features
    newer_sent = threading.Event()
    read = reader.on_text

    def slow(text, n):  # the first answer arrives only after a newer query was sent
        newer_sent.wait(30)
        return read(text, n)

    monkeypatch.setattr(reader, "on_text", slow)
    session.search_meaning("first text")
    session._meaning_query = "a newer text"  # typed and sent while the first was read
    newer_sent.set()
    session.meaning_worker.wait()
    assert "Reading" in session.meaning_results.html  # the older answer is dropped
    assert not session.meaning_button.disabled

    def broken(text, n):
        raise RuntimeError("the model is gone")

    monkeypatch.setattr(reader, "on_text", broken)
    session.search_meaning("<b>any</b>")
    session.meaning_worker.wait()
    assert (
        "Could not read the text" in session.meaning_results.html
        and "the model is gone" in session.meaning_results.html
    )
    assert "<b>any</b>" not in session.meaning_results.html


def test_search_results_and_reply_features_sort_by_steerability(session):
    import re

    from explorer.ui.html import render_chips

    steerability = session.bundle.features["steerability"]
    assert session.sort_by.value == "steerability"  # a probed bundle sorts by it from the start
    matches = session.run_search("feature")
    listed = [int(f) for f in re.findall(r'data-feature="(\d+)"', session.search_results.html)]
    assert set(listed) <= set(matches) and len(listed) == min(30, len(matches))
    assert list(steerability[listed]) == sorted(steerability[listed], reverse=True)
    assert steerability[listed].min() >= steerability[matches].nlargest(len(listed)).min()  # the top ones
    session.sort_by.value = "relevance"
    session.run_search("feature")
    listed = [int(f) for f in re.findall(r'data-feature="(\d+)"', session.search_results.html)]
    assert listed and listed == matches[: len(listed)]
    chips = render_chips(session.bundle, [(1, 0.9), (3, 0.5), (4, 0.2)], by="steerability")
    assert [int(f) for f in re.findall(r'data-feature="(\d+)"', chips)] == [4, 3, 1]  # 0.4, 0.3, 0.1
    session.sort_by.value = "label score"
    session.run_search("feature")
    listed = [int(f) for f in re.findall(r'data-feature="(\d+)"', session.search_results.html)]
    detection = session.bundle.features["detection"]
    assert (
        list(detection[listed]) == sorted(detection[listed], reverse=True) and len(set(detection[listed])) > 1
    )


def test_the_card_says_what_one_click_does(session):
    card = render_card(session.bundle, 3)
    assert "one click: <b>×1.41</b>" in card and "steerability <b>0.30</b>" in card
    assert "writes" in card and "&lt;em&gt;" in card and "<em>" not in card  # output tokens escaped
    assert "direct logit lens" in card
    assert "detection <b>6.2/10</b> vs 2.5 by chance · fuzzing <b>6.0/10</b>" in card  # 0.25 + 3/8


def test_an_unscored_bundle_shows_no_label_score(session):
    bundle = session.bundle
    saved = bundle.features["detection"].copy()
    bundle.features["detection"] = np.nan
    try:
        assert "detection" not in render_card(bundle, 3)
    finally:
        bundle.features["detection"] = saved


def test_deep_link_parsing(explorer_shared):
    bundle = explorer_shared.bundle
    link = open_link(
        {
            "feature": [b"3", b"4", b"12", b"3"],
            "strength": [b"0.5", b"-2"],
            "mode": ["nudge", "nudge", "pin"],
        },
        bundle,
    )
    # a bare feature= takes the feature's calibrated click strength
    assert link.edits == [Edit(3, 0.5, "nudge"), Edit(4, -2.0, "nudge"), Edit(12, click(12), "pin")]
    assert len(link.errors) == 1 and "twice" in link.errors[0]
    bad = open_link(
        {
            "feature": ["x", "999", str(HIDDEN_FEATURE), "1", "2", "6"],
            "strength": ["1", "1", "1", "nan", "99", "-1"],
            "mode": ["nudge", "nudge", "nudge", "nudge", "nudge", "pin"],
        },
        bundle,
        SteeringLimits(max_abs_strength=20),
    )
    assert bad.edits == []
    text = " ".join(bad.errors)
    for expected in ("'x' is not a feature id", "999 does not exist", "hidden", "beyond ±20", "negative"):
        assert expected in text


def test_deep_link_preselects_edits_and_reports_errors(explorer_shared):
    session = ExplorerSession(explorer_shared, {"feature": [b"3", b"abc"], "strength": [b"0.5"]})
    assert session.edits.current() == ([Edit(3, 0.5, "nudge")], 1.0)
    assert session.selected == 3
    assert "abc" in session.notice.object and "notice error" in session.notice.object


# ---------------------------------------------------------------- escaping


def test_html_in_labels_and_tokens_is_escaped(session):
    bundle = session.bundle
    card = render_card(bundle, HTML_FEATURE)
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert "<b>bold" not in card and "<b>\u200b" not in card
    assert "&lt;b&gt;" in card and "&lt;i&gt;" in card  # tokens and logit-lens entries
    session.run_search("script")
    assert "<script>" not in session.search_results.html
    session.select(HTML_FEATURE)
    session.add_selected()
    assert "<script>" not in session.edits.rows[0].label.html


def test_example_highlight_alpha_follows_activation():
    page = render_example(["a", "b", "c"], [0.0, 1.0, 2.0], max_act=4.0)
    assert "rgba(255, 140, 0, 0.25)" in page and "rgba(255, 140, 0, 0.50)" in page
    assert page.count("background") == 2  # zero activation: no highlight


def test_dead_feature_card_says_so(session):
    assert "Dead feature" in render_card(session.bundle, DEAD_FEATURE)


# ---------------------------------------------------------------- chat


def test_no_edits_one_reply_then_features_light_up(session):
    columns = session.chat.send("hello, how are you today?")
    assert [c.name for c in columns] == ["reply"]
    _finish_turn(session)
    (reply,) = columns
    assert reply.status == "finished"
    assert reply.features is not None
    shown = [f for f, _ in reply.features]
    assert HIDDEN_FEATURE not in shown and DEAD_FEATURE not in shown
    assert session.map.highlights.get("reply") == shown
    if shown:  # a chip selects its feature
        reply.chips._handle_msg({"type": "select", "feature": shown[0]})
        assert session.selected == shown[0]
    assert session.chat.history_default[-1]["role"] == "assistant"


def test_edits_stream_default_and_steered_side_by_side(session):
    session.select(3)
    session.add_selected(strength=8.0)
    columns = session.chat.send("hello")
    assert [c.name for c in columns] == ["default", "steered"]
    _finish_turn(session)
    assert all(c.status == "finished" for c in columns)
    default, steered = columns
    assert default.pane.object.count("msg reply") == 1 and "steered" in steered.pane.object
    assert default.text != steered.text or default.text == ""
    # the second turn continues each column's own conversation
    columns = session.chat.send("and then?")
    _finish_turn(session)
    assert columns[0].messages[1]["content"] == default.text
    assert columns[1].messages[1]["content"] == steered.text


def test_a_long_chat_keeps_the_newest_turns_and_says_so(session):
    session.chat.history_tokens = 60
    session.chat.temperature.value, session.chat.max_new_tokens.value = 0.0, 6
    for n in range(5):
        columns = session.chat.send(f"message number {n} with a few more words in it")
        _finish_turn(session)
    messages = columns[0].messages
    assert messages[-1]["content"] == "message number 4 with a few more words in it"
    assert len(session.engine.prompt_ids(messages)) <= 60
    assert "message number 0" not in str(messages) and messages[0]["role"] in ("system", "user")
    assert "earlier turn(s) left out" in str(session.chat.history[-1].objects[1].object)
    assert len(session.chat.history_default) <= len(messages) + 1  # the stored history is bounded too


def test_refused_request_is_shown_not_raised(session):
    session.select(3)
    session.add_selected(strength=10.0)
    session.edits.multiplier.value = 3.0  # 30 × max act: beyond the engine's limit
    columns = session.chat.send("hello")
    turn = session.chat.history.objects[-1]
    notice = turn.objects[-1].object
    assert "Request refused" in notice and "beyond" in notice
    assert all(c.status == "error" for c in columns) and not session.chat.busy


def test_generation_exception_is_shown(session, monkeypatch):
    class Broken:
        status = "queued"

        def events(self, timeout=None):
            yield 0, "partial"
            raise RuntimeError("CUDA out of memory")

        def cancel(self):
            pass

    monkeypatch.setattr(session.engine, "submit", lambda request: Broken())
    columns = session.chat.send("hello")
    _finish_turn(session)
    assert columns[0].status == "error"
    assert "Generation failed" in columns[0].pane.object and "out of memory" in columns[0].pane.object
    assert "partial" in columns[0].pane.object


def test_stop_cancels_both_replies(session):
    session.select(3)
    session.add_selected()
    session.chat.max_new_tokens.value = 400
    session.chat.temperature.value = 0.0
    columns = session.chat.send("hello")
    session.chat.stop()
    _finish_turn(session)
    assert {c.status for c in columns} <= {"cancelled", "finished"}
    assert any(c.status == "cancelled" for c in columns)


# ---------------------------------------------------------------- server, CLI


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ({"feature": [b"3"], "temperature": [b"-1"]}, "temperature -1.0 must be between 0 and"),
        (
            {"feature": [b"3"], "max_new_tokens": [b"10000000"]},
            "max_new_tokens 10000000 must be between 1 and",
        ),
        ({"feature": [b"3"], "multiplier": [b"inf"]}, "multiplier=&#x27;inf&#x27; is not a finite number"),
        ({"feature": [b"3"], "seed": [b"-1"]}, "seed -1 must be a non-negative integer"),
        ({"feature": [b"999"]}, "feature 999 does not exist"),
    ],
)
def test_out_of_range_link_values_are_a_visible_notice(explorer_shared, query, said):
    """The rest of the link still opens (feature 3 is added), and the notice stays after it."""
    session = ExplorerSession(explorer_shared)
    session.view()
    session.apply_deep_link(query)
    assert said in session.notice.object and 'class="notice error"' in session.notice.object
    assert [e.feature for e in session.edits.current()[0]] == ([3] if query["feature"] == [b"3"] else [])
