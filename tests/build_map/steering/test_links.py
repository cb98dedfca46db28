"""Links: the recipe a link carries round-trips, and the explorer opens what "Copy link" makes."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from build_map.steering.links import open_link, recipe_from_query, recipe_to_query
from build_map.steering.recipes import Recipe, RecipeError, load_recipe, make_recipe
from build_map.steering.requests import Edit, SamplingConfig
from tests.support.tiny_bundle import HIDDEN_FEATURE

EDITS = [Edit(3, 2.5, "nudge"), Edit(10, 0.5, "pin")]


def test_link_round_trip(tiny_bundle):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3, presence_penalty=0.5)
    recipe = load_recipe(make_recipe(tiny_bundle, EDITS, 1.5, sampling), tiny_bundle)
    query = recipe_to_query(recipe)
    assert query.startswith("feature=3&strength=2.5&mode=nudge&feature=10&strength=0.5&mode=pin")
    back = recipe_from_query(query, tiny_bundle)
    assert "presence_penalty=0.5" in query and back == recipe
    assert recipe_from_query(parse_qs(query), tiny_bundle) == recipe  # parsed form, as servers pass it


def test_explorer_deep_links_still_parse(tiny_bundle):
    recipe = recipe_from_query("?feature=12&strength=0.5&feature=40", tiny_bundle)
    # a bare feature= takes the feature's calibrated click strength (planted: 2.0 for feature 40)
    assert recipe.edits == (Edit(12, 0.5, "nudge"), Edit(40, 2.0, "nudge"))
    assert recipe.multiplier == 1.0 and recipe.sampling == SamplingConfig()
    with pytest.raises(RecipeError, match="hidden"):
        recipe_from_query(f"feature={HIDDEN_FEATURE}", tiny_bundle)
    with pytest.raises(RecipeError, match="not a number"):
        recipe_from_query("feature=1&strength=lots", tiny_bundle)


def test_links_made_here_open_in_the_explorer(tiny_bundle):
    from build_map.steering.links import open_link

    query = recipe_to_query(Recipe(tuple(EDITS), 2.0, SamplingConfig(seed=5)))
    link = open_link(parse_qs(query), tiny_bundle)
    assert link.edits == EDITS and not link.errors


def test_bad_settings_are_reported_and_the_edits_still_open(tiny_bundle):
    link = open_link("feature=3&strength=0.5&temperature=9&seed=2", tiny_bundle)
    assert link.edits == [Edit(3, 0.5, "nudge")] and link.settings == {}
    assert link.errors == ["Link settings ignored: temperature 9.0 must be between 0 and 5."]
    twice = open_link("feature=3&seed=1&seed=2&multiplier=1.5", tiny_bundle)
    assert twice.settings == {"multiplier": 1.5} and twice.errors == [
        "Link: seed is given 2 times; give it once."
    ]
    with pytest.raises(RecipeError, match="seed is given 2 times"):
        recipe_from_query("feature=3&seed=1&seed=2", tiny_bundle)
