"""Recipes and links on the tiny bundle: save → load reproduces the reply; foreign recipes are refused."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest

from build_map.steering.links import recipe_from_query, recipe_to_query
from build_map.steering.recipes import Recipe, RecipeError, load_recipe, make_recipe, save_recipe
from build_map.steering.requests import Edit, SamplingConfig
from build_map.steering.session import open_bundle
from tests.support.tiny_bundle import DEAD_FEATURE, HIDDEN_FEATURE, N_FEATURES

PROMPT = [{"role": "user", "content": "hello, how are you today?"}]
EDITS = [Edit(3, 2.5, "nudge"), Edit(10, 0.5, "pin")]
GREEDY = SamplingConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from tests.support.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path_factory.mktemp("recipes"), real_map=False)
    with open_bundle(bundle, device="cpu") as session:
        yield session


@pytest.fixture
def bundle(session):
    return session.bundle


def test_save_load_round_trip_reproduces_the_greedy_reply(session, tmp_path):
    steered = session.generate(PROMPT, edits=EDITS, sampling=GREEDY)
    assert steered != session.generate(PROMPT, edits=[], sampling=GREEDY)  # the edits do something
    path = save_recipe(tmp_path / "r.json", make_recipe(session.bundle, EDITS, 1.0, GREEDY))
    recipe = session.apply_recipe(path)
    assert recipe.edits == tuple(EDITS) and recipe.sampling == GREEDY
    assert session.generate(PROMPT) == steered
    assert "".join(session.stream(PROMPT)) == steered
    assert session.generate(PROMPT, edits=[]) != steered  # explicit edits win over the recipe


def test_sampled_recipe_is_reproducible_from_its_seed(session, tmp_path):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=10, seed=11)
    first = session.generate(PROMPT, edits=EDITS, sampling=sampling, multiplier=0.5)
    text = json.dumps(make_recipe(session.bundle, EDITS, 0.5, sampling))
    session.apply_recipe(text)  # JSON text works as well as a path
    assert session.generate(PROMPT) == first


def test_recipe_for_another_sae_is_refused(bundle):
    data = make_recipe(bundle, EDITS)
    data["sae_sha256"] = "ab" * 32
    with pytest.raises(RecipeError) as info:
        load_recipe(data, bundle)
    message = str(info.value)
    assert "abababababab" in message and bundle.manifest["sae"]["sha256"][:12] in message
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
    ],
)
def test_bad_recipes_are_refused_clearly(bundle, change, message):
    data = make_recipe(bundle, EDITS)
    change(data)
    with pytest.raises(RecipeError, match=message):
        load_recipe(json.dumps(data), bundle)


def test_bad_json_and_missing_file(bundle, tmp_path):
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe('{"format": ', bundle)
    with pytest.raises(RecipeError, match="Cannot read recipe"):
        load_recipe(tmp_path / "missing.json", bundle)


def test_dead_features_may_be_steered(bundle):
    assert (
        load_recipe(make_recipe(bundle, [Edit(DEAD_FEATURE, 1.0)]), bundle).edits[0].feature == DEAD_FEATURE
    )


def test_link_round_trip(bundle):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3)
    recipe = load_recipe(make_recipe(bundle, EDITS, 1.5, sampling), bundle)
    query = recipe_to_query(recipe)
    assert query.startswith("feature=3&strength=2.5&mode=nudge&feature=10&strength=0.5&mode=pin")
    back = recipe_from_query(query, bundle)
    assert back == recipe
    assert recipe_from_query(parse_qs(query), bundle) == recipe  # parsed form, as servers pass it


def test_explorer_deep_links_still_parse(bundle):
    recipe = recipe_from_query("?feature=12&strength=0.5&feature=40", bundle)
    assert recipe.edits == (Edit(12, 0.5, "nudge"), Edit(40, 1.0, "nudge"))
    assert recipe.multiplier == 1.0 and recipe.sampling == SamplingConfig()
    with pytest.raises(RecipeError, match="hidden"):
        recipe_from_query(f"feature={HIDDEN_FEATURE}", bundle)
    with pytest.raises(RecipeError, match="not a number"):
        recipe_from_query("feature=1&strength=lots", bundle)


def test_links_made_here_open_in_the_explorer(bundle):
    from build_map.steering.links import open_link

    query = recipe_to_query(Recipe(tuple(EDITS), 2.0, SamplingConfig(seed=5)))
    link = open_link(parse_qs(query), bundle)
    assert link.edits == EDITS and not link.errors


def test_session_attribution_leaves_hidden_features_out(session):
    frame = session.attribute(PROMPT, top_k=N_FEATURES)
    assert len(frame) > 0 and HIDDEN_FEATURE not in set(frame.feature)
    steered = session.attribute(PROMPT, edits=[Edit(3, 2.0)], top_k=N_FEATURES)
    assert 3 in set(steered.feature)
