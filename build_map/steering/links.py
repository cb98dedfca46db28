"""Links: a recipe as query parameters. The explorer's deep links and its "Copy link" are one format,
read by one parser::

    ?feature=12&strength=0.5&mode=pin&feature=40&strength=1&mode=nudge&multiplier=1.5&temperature=0.7&seed=3

``feature`` / ``strength`` / ``mode`` pair by position (a missing strength is the feature's click
strength, ``build_map.steering.click``; a missing mode DEFAULT_MODE); the other keys are single values. ``recipe_from_query`` is strict (the
first problem is an error); ``open_link`` is what the explorer opens: every good edit, the settings
if they are valid, and one message per problem.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from build_map.bundle.read import Bundle
from build_map.steering.click import StrengthOf, strength_of
from build_map.steering.recipes import (
    SAMPLING_KEYS,
    Recipe,
    RecipeError,
    bundle_model,
    bundle_sha,
    check_recipe,
    recipe_from_dict,
    sampling_from,
)
from build_map.steering.requests import (
    DEFAULT_MODE,
    Edit,
    SamplingConfig,
    SteeringError,
    SteeringLimits,
)
from build_map.steering.validation import check_sampling, edit_problems

SETTING_KEYS = ("multiplier", *SAMPLING_KEYS)
_INT_KEYS = ("max_new_tokens", "seed")
PREFIX = "Link: "

Query = str | Mapping[str, Sequence[str | bytes] | str | bytes]
"""A query string, or parsed ``{name: [values]}`` as Panel and Tornado give it."""


@dataclass
class LinkQuery:
    """A link's values, parsed but not judged: edits and settings whose values are numbers."""

    edits: list[Edit] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """The given ones of SETTING_KEYS."""
    errors: list[str] = field(default_factory=list)
    """One message per value that is not a number (its edit or setting is left out)."""


@dataclass
class DeepLink:
    """What the explorer opens from a link."""

    edits: list[Edit] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    """Multiplier and sampling values the link gives, when all of them are valid."""
    errors: list[str] = field(default_factory=list)


def parse_link_query(query: Query, default: StrengthOf | None = None) -> LinkQuery:
    """Read a link's values; a value that is not a number is reported and left out. A feature
    without a strength gets ``default(feature)`` (the bundle's click strength), DEFAULT_STRENGTH
    without one."""
    default = default or strength_of(None)
    params = _query_dict(query)
    features, strengths, modes = (params.get(key, []) for key in ("feature", "strength", "mode"))
    link = LinkQuery()
    for i, raw in enumerate(features):
        try:
            feature = _parse(raw, int, "feature")
            strength = _parse(strengths[i], float, "strength") if i < len(strengths) else default(feature)
        except RecipeError as exc:
            link.errors.append(str(exc))
            continue
        mode = modes[i].strip().lower() if i < len(modes) else DEFAULT_MODE
        link.edits.append(Edit(feature, strength, mode))
    if len(strengths) > len(features) or len(modes) > len(features):
        link.errors.append(f"{PREFIX}more strength/mode values than features; give one feature per edit.")
    for key in SETTING_KEYS:
        values = params.get(key, [])
        try:
            if len(values) > 1:
                raise RecipeError(f"{PREFIX}{key} is given {len(values)} times; give it once.")
            if values:
                link.settings[key] = _parse(values[0], int if key in _INT_KEYS else float, key)
        except RecipeError as exc:
            link.errors.append(str(exc))
    return link


def recipe_from_query(query: Query, bundle: Bundle | None = None) -> Recipe:
    """The recipe a link carries; its first problem is a RecipeError. With ``bundle`` the recipe is
    checked against it and takes its SAE hash, model and hookpoint."""
    link = parse_link_query(query, strength_of(bundle))
    if link.errors:
        raise RecipeError(link.errors[0])
    settings = dict(link.settings)
    recipe = Recipe(tuple(link.edits), settings.pop("multiplier", 1.0), sampling_from(settings))
    if bundle is not None:
        recipe = dataclasses.replace(
            recipe, model=bundle_model(bundle), hookpoint=bundle.manifest.get("hookpoint"),
            sae_sha256=bundle_sha(bundle),
        )  # fmt: skip
        check_recipe(recipe, bundle, source=PREFIX.rstrip(": "))
    return recipe


def open_link(query: Query, bundle: Bundle, limits: SteeringLimits | None = None) -> DeepLink:
    """Every edit of a link that this bundle can serve, its settings if they are all valid, and a
    message for each problem (the rest of the link still opens)."""
    limits = limits or SteeringLimits()
    parsed = parse_link_query(query, strength_of(bundle))
    opened = DeepLink(errors=list(parsed.errors))
    hidden = bundle.features["hidden"].to_numpy(bool)
    problems = dict(edit_problems(parsed.edits, 1.0, bundle.n_features, hidden, limits))
    for index, edit in enumerate(parsed.edits):
        if index in problems:
            if PREFIX + problems[index] not in opened.errors:  # edits past the limit say it once
                opened.errors.append(PREFIX + problems[index])
        else:
            opened.edits.append(edit)
    settings = dict(parsed.settings)
    try:
        sampling = sampling_from(settings)
        check_sampling(sampling, limits)
    except SteeringError as exc:
        opened.errors.append(f"Link settings ignored: {exc}")
        settings = {}
    opened.settings = settings
    return opened


def recipe_to_query(recipe: Recipe | Mapping) -> str:
    """Query string (no leading ``?``) for a copyable link; the SAE is the bundle the link opens."""
    if not isinstance(recipe, Recipe):
        recipe = recipe_from_dict(recipe)
    pairs: list[tuple[str, str]] = []
    for edit in recipe.edits:
        pairs += [("feature", str(edit.feature)), ("strength", _fmt(edit.strength)), ("mode", edit.mode)]
    defaults = SamplingConfig()
    if recipe.multiplier != 1.0:
        pairs.append(("multiplier", _fmt(recipe.multiplier)))
    for key in SAMPLING_KEYS:  # only what differs from the defaults, to keep links short
        value = getattr(recipe.sampling, key)
        if value is not None and value != getattr(defaults, key):
            pairs.append((key, _fmt(value)))
    return urlencode(pairs)


def _parse(raw: str, kind: type, name: str) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        what = (
            "a feature id (a whole number)"
            if name == "feature"
            else f"a {'whole ' if kind is int else ''}number"
        )
        raise RecipeError(f"{PREFIX}{name}={raw!r} is not {what}.") from None
    if kind is float and not math.isfinite(value):
        raise RecipeError(f"{PREFIX}{name}={raw!r} is not a finite number.")
    return value


def _query_dict(query: Query) -> dict[str, list[str]]:
    if isinstance(query, str):
        return parse_qs(query.lstrip("?"), keep_blank_values=True)
    out = {}
    for key, values in query.items():
        key = key.decode() if isinstance(key, bytes) else str(key)
        values = [values] if isinstance(values, (str, bytes)) else list(values)
        out[key] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return out


def _fmt(value: float | int) -> str:
    """Short text for a link: ``2`` not ``2.0``, full precision only where ``g`` would round."""
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
