"""The explorer's steering tools without a browser: recipes, link, sweep, attribution."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs

import pytest

from build_map.steering.links import open_link
from build_map.steering.requests import Edit
from explorer.ui.app import ExplorerSession


@pytest.fixture
def session(explorer_shared):
    session = ExplorerSession(explorer_shared)
    session.view()
    session.chat.max_new_tokens.value = 8
    return session


def _saved(session) -> bytes:
    return session.recipes.recipe_file().getvalue().encode("utf-8")


def test_save_then_load_recipe_restores_edits_and_sampling(session, explorer_shared):
    session.edits.add(Edit(3, 0.5, "pin"))
    session.edits.add(Edit(5, -1.25, "nudge"))
    session.edits.multiplier.value = 1.5
    session.chat.temperature.value = 0.3
    session.chat.presence_penalty.value = 1.2
    session.chat.seed.value = 7
    data = _saved(session)
    assert json.loads(data)["edits"][0] == {"feature": 3, "strength": 0.5, "mode": "pin"}
    expected = session.edits.current()

    other = ExplorerSession(explorer_shared)
    other.edits.add(Edit(1, 1.0, "nudge"))
    assert other.recipes.load_bytes(data)
    assert other.edits.current() == expected
    assert other.chat.temperature.value == pytest.approx(0.3)
    assert other.chat.presence_penalty.value == pytest.approx(1.2)
    assert other.chat.seed.value == 7
    assert "error" not in other.recipes.notice.object


def test_unknown_recipe_keys_are_a_visible_notice(session):
    session.edits.add(Edit(3, 0.5, "nudge"))
    data = json.loads(_saved(session))
    data["temperature"] = 0.9  # at the top level instead of in "sampling": not applied, so say so
    assert session.recipes.load_bytes(json.dumps(data).encode())
    notice = session.recipes.notice.object
    assert 'class="notice warn"' in notice and "keys this tool does not know: temperature" in notice


def test_recipe_for_another_sae_is_refused_visibly(session):
    session.edits.add(Edit(3, 0.5, "nudge"))
    data = json.loads(_saved(session))
    data["sae_sha256"] = "0" * 64
    session.edits.reset()
    session.edits.add(Edit(2, 1.0, "nudge"))
    assert not session.recipes.load_bytes(json.dumps(data).encode())
    assert session.edits.current() == ([Edit(2, 1.0, "nudge")], 1.0)
    notice = session.recipes.notice.object
    assert 'class="notice error"' in notice and "another SAE" in notice
    assert not session.recipes.load_bytes(b"{not json")
    assert "not JSON" in session.recipes.notice.object


def test_copy_link_parses_back_into_the_same_edits(session, explorer_shared):
    session.edits.add(Edit(3, 0.5, "pin"))
    session.edits.add(Edit(5, -1.25, "nudge"))
    session.edits.multiplier.value = 2.0
    session.chat.presence_penalty.value = 0.6
    query = session.recipes.update_link()
    assert session.recipes.link.value.endswith("?" + query)
    args = parse_qs(query)
    link = open_link(args, explorer_shared.bundle, explorer_shared.engine.limits)
    assert link.errors == []
    assert link.edits == session.edits.current()[0]
    other = ExplorerSession(explorer_shared, {k: [v.encode() for v in vs] for k, vs in args.items()})
    assert other.edits.current() == session.edits.current()
    assert other.chat.presence_penalty.value == pytest.approx(0.6)
    assert other.notice.object == ""


def test_sweep_produces_chart_and_window_text(session):
    session.select(3)
    assert not session.sweep.button.disabled
    worker = session.sweep.start(strengths=(0.0, 1.0), prompts=("Hi",), max_new_tokens=3)
    assert worker is not None
    session.sweep.wait(60)
    assert session.sweep.plot.object is not None and session.sweep.box.visible
    assert "Suggested window" in session.sweep.status.object
    assert sorted(session.sweep.frame["strength"].unique()) == [0.0, 1.0]


def test_sweep_error_is_shown(session):
    session.sweep.start(feature=3, strengths=(1.0,), prompts=(), max_new_tokens=3)
    session.sweep.wait(60)
    assert 'class="notice error"' in session.sweep.status.object


def test_attribution_of_a_reply_token_lists_features_and_lights_the_map(session):
    messages = [{"role": "user", "content": "hello <b>there</b>"}]
    session.attribution.show_reply(messages, "the cat <i>sat</i>", [Edit(3, 1.0, "nudge")], 1.0)
    assert 'data-token="1"' in session.attribution.tokens.html
    assert "<i>" not in session.attribution.tokens.html  # escaped
    session.attribution.start(1, background=False)
    frame = session.attribution.frame
    assert frame is not None and len(frame) > 0
    chips = session.attribution.chips.html
    assert f'data-feature="{int(frame["feature"].iloc[0])}"' in chips
    assert session.map.highlights["attribution"] == [int(f) for f in frame["feature"]]
    session.attribution.chips._handle_msg({"type": "select", "feature": int(frame["feature"].iloc[0])})
    assert session.selected == int(frame["feature"].iloc[0])
    session.attribution.start(999, background=False)
    assert "not in the reply" in session.attribution.status.object


def test_finished_chat_turn_offers_its_tokens(session):
    session.chat.temperature.value = 0.0
    session.chat.send("hi")
    session.chat.wait(60)
    deadline = time.monotonic() + 30
    while session.chat.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    reply = session.chat.last_turn[-1]
    assert reply.text.strip()  # the tiny model's greedy reply is not empty
    assert 'data-token="0"' in session.attribution.tokens.html
    session.chat.clear()
    session.attribution.clear()
    assert session.attribution.tokens.html == "" and session.map.highlights["attribution"] == []
