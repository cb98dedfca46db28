"""Recipes on the tiny bundle: save → load reproduces the reply; foreign or bad recipes are refused."""

from __future__ import annotations

import json

import pytest

from build_map.steering.recipes import RecipeError, load_recipe, make_recipe, save_recipe
from build_map.steering.requests import Edit, SamplingConfig
from tests.support.tiny_bundle import DEAD_FEATURE, HIDDEN_FEATURE, N_FEATURES

PROMPT = [{"role": "user", "content": "hello, how are you today?"}]
EDITS = [Edit(3, 2.5, "nudge"), Edit(10, 0.5, "pin")]
GREEDY = SamplingConfig(max_new_tokens=10)


def test_save_load_round_trip_reproduces_the_greedy_reply(tiny_session, tmp_path):
    steered = tiny_session.generate(PROMPT, edits=EDITS, sampling=GREEDY)
    assert steered != tiny_session.generate(PROMPT, edits=[], sampling=GREEDY)  # the edits do something
    path = save_recipe(tmp_path / "r.json", make_recipe(tiny_session.bundle, EDITS, 1.0, GREEDY))
    recipe = tiny_session.apply_recipe(path)
    assert recipe.edits == tuple(EDITS) and recipe.sampling == GREEDY
    assert tiny_session.generate(PROMPT) == steered
    assert "".join(tiny_session.stream(PROMPT)) == steered
    assert tiny_session.generate(PROMPT, edits=[]) != steered  # explicit edits win over the recipe


def test_sampled_recipe_is_reproducible_from_its_seed(tiny_session, tmp_path):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=10, seed=11)
    first = tiny_session.generate(PROMPT, edits=EDITS, sampling=sampling, multiplier=0.5)
    text = json.dumps(make_recipe(tiny_session.bundle, EDITS, 0.5, sampling))
    tiny_session.apply_recipe(text)  # JSON text works as well as a path
    assert tiny_session.generate(PROMPT) == first


def test_a_recipe_from_before_the_presence_penalty_loads_without_one(tiny_bundle):
    data = make_recipe(tiny_bundle, EDITS)
    assert data["sampling"]["presence_penalty"] == 0.0
    del data["sampling"]["presence_penalty"]
    assert load_recipe(json.dumps(data), tiny_bundle).sampling.presence_penalty == 0.0


def test_recipe_for_another_sae_is_refused(tiny_bundle):
    data = make_recipe(tiny_bundle, EDITS)
    data["sae_sha256"] = "ab" * 32
    with pytest.raises(RecipeError) as info:
        load_recipe(data, tiny_bundle)
    message = str(info.value)
    assert "abababababab" in message and tiny_bundle.manifest["sae"]["sha256"][:12] in message
    assert "re-make" in message


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["edits"].append({"feature": HIDDEN_FEATURE, "strength": 1.0, "mode": "nudge"}),
            "hidden",
        ),
        (
            lambda d: d["edits"].append({"feature": N_FEATURES, "strength": 1.0, "mode": "nudge"}),
            "does not exist",
        ),
        (lambda d: d["edits"].append({"feature": 3, "strength": 1.0, "mode": "nudge"}), "appears twice"),
        (lambda d: d["edits"].append({"feature": 4, "strength": 1.0, "mode": "boost"}), "choose one of"),
        (lambda d: d["edits"].append({"feature": 4, "strength": -1.0, "mode": "pin"}), "negative"),
        (lambda d: d["edits"].append({"feature": "4", "strength": 1.0}), "whole number"),
        (lambda d: d.update(format="something-else"), "not a steering recipe"),
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.update(multiplier=100.0), "beyond"),
        (lambda d: d.update(hookpoint="model.layers.0"), "steers at"),
        (lambda d: d["sampling"].update(top_p=0.0), "top_p"),
        (lambda d: d["sampling"].update(presence_penalty=5), "presence_penalty 5.0 must be between 0 and 2"),
    ],
)
def test_bad_recipes_are_refused_clearly(tiny_bundle, change, message):
    data = make_recipe(tiny_bundle, EDITS)
    change(data)
    with pytest.raises(RecipeError, match=message):
        load_recipe(json.dumps(data), tiny_bundle)


def test_bad_json_and_missing_file(tiny_bundle, tmp_path):
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe('{"format": ', tiny_bundle)
    with pytest.raises(RecipeError, match="Cannot read recipe"):
        load_recipe(tmp_path / "missing.json", tiny_bundle)


def test_dead_features_may_be_steered(tiny_bundle):
    assert (
        load_recipe(make_recipe(tiny_bundle, [Edit(DEAD_FEATURE, 1.0)]), tiny_bundle).edits[0].feature
        == DEAD_FEATURE
    )


def test_a_recipe_edit_without_strength_takes_the_click_strength(tiny_bundle):
    from build_map.steering.recipes import RECIPE_FORMAT, RECIPE_VERSION, load_recipe
    from tests.support.tiny_bundle import CLICK_STRENGTHS

    edits = [{"feature": 6}, {"feature": 8, "strength": 0.5}]
    data = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "edits": edits}
    recipe = load_recipe(data, tiny_bundle)
    assert [e.strength for e in recipe.edits] == [round(float(CLICK_STRENGTHS[6 % 4]), 4), 0.5]


def test_unknown_recipe_keys_are_named_not_silently_dropped(tiny_bundle):
    data = make_recipe(tiny_bundle, [Edit(1, 1.0)])
    data["author"] = "me"
    data["sampling"]["top_k"] = 5
    data["edits"][0]["note"] = "why"
    recipe = load_recipe(data, tiny_bundle)
    assert recipe.ignored == ("author", "sampling.top_k", "edits[0].note")
    assert "ignored" not in recipe.to_dict() and recipe.edits == (Edit(1, 1.0),)
