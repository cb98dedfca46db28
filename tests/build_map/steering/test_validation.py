"""One validator: the engine, recipe files and links refuse the same edit with the same words."""

from __future__ import annotations

import numpy as np
import pytest

from build_map.steering.links import open_link
from build_map.steering.recipes import RecipeError, load_recipe, make_recipe
from build_map.steering.requests import Edit, SteeringError, SteeringLimits
from build_map.steering.validation import check_edits, edit_problems
from tests.support.tiny_bundle import HIDDEN_FEATURE, N_FEATURES

LIMITS = SteeringLimits(max_edits=3, max_abs_strength=20)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            Edit(HIDDEN_FEATURE, 1.0),
            f"feature {HIDDEN_FEATURE} is hidden in this bundle and cannot be steered.",
        ),
        (
            Edit(N_FEATURES, 1.0),
            f"feature {N_FEATURES} does not exist: valid feature ids are 0 to {N_FEATURES - 1}.",
        ),
        (Edit(2, 30.0), "strength 30 × multiplier 1 of feature 2 is beyond ±20"),
        (Edit(2, -1.0, "pin"), "feature 2 cannot be pinned to a negative activation (-1)"),
    ],
)
def test_every_surface_says_the_same(tiny_session, edit, message):
    bundle, engine = tiny_session.bundle, tiny_session.engine
    with pytest.raises(SteeringError) as from_engine:
        engine.check_edits([edit])
    assert message in str(from_engine.value)
    data = make_recipe(bundle, [])
    data["edits"] = [{"feature": edit.feature, "strength": edit.strength, "mode": edit.mode}]
    with pytest.raises(RecipeError) as from_recipe:
        load_recipe(data, bundle)
    assert str(from_recipe.value) == f"recipe: {from_engine.value}"
    link = open_link(
        {"feature": [str(edit.feature)], "strength": [repr(edit.strength)], "mode": [edit.mode]}, bundle
    )
    assert link.edits == [] and link.errors == [f"Link: {from_engine.value}"]


def test_lenient_callers_keep_the_good_edits():
    hidden = np.zeros(10, dtype=bool)
    hidden[4] = True
    edits = [Edit(1, 1.0), Edit(4, 1.0), Edit(1, 2.0), Edit(2, 1.0), Edit(3, 1.0), Edit(5, 1.0)]
    problems = edit_problems(edits, 1.0, 10, hidden, LIMITS)
    assert [index for index, _ in problems] == [1, 2, 5]  # hidden, repeated, past the limit of 3
    assert "appears twice" in problems[1][1] and "more than 3 edits" in problems[2][1]


def test_numpy_feature_ids_are_feature_ids():
    check_edits([Edit(np.int64(4), 1.0)], 1.0, 10, np.zeros(10, dtype=bool), LIMITS)
    with pytest.raises(SteeringError, match=r"feature 4\.0 is not a feature id \(a whole number\)"):
        check_edits([Edit(4.0, 1.0)], 1.0, 10, np.zeros(10, dtype=bool), LIMITS)
