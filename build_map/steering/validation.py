"""The one validator of edits and sampling: the engine, recipes and links all ask it.

Strict callers (the engine, recipe files) raise the first problem; lenient ones (the explorer's
links, which keep every good edit and report each bad one) read ``edit_problems``. Every message
names the value and says what is allowed; callers only add where it came from ("Link: ",
"calm.json: ").
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from build_map.steering.requests import MODES, Edit, SamplingConfig, SteeringError, SteeringLimits


def check_edits(
    edits: Sequence[Edit], multiplier: float, n_features: int, hidden: Any, limits: SteeringLimits
) -> None:
    """Raise SteeringError for the first problem of a request's edits (``hidden[i]``: feature i may
    not be steered)."""
    if not is_finite_number(multiplier):
        raise SteeringError(f"multiplier {multiplier!r} is not a finite number.")
    if len(edits) > limits.max_edits:
        raise SteeringError(f"{len(edits)} edits in one request; at most {limits.max_edits} are allowed.")
    problems = edit_problems(edits, multiplier, n_features, hidden, limits)
    if problems:
        raise SteeringError(problems[0][1])


def edit_problems(
    edits: Sequence[Edit], multiplier: float, n_features: int, hidden: Any, limits: SteeringLimits
) -> list[tuple[int, str]]:
    """(index, message) for every edit that cannot be served; the others together make a valid
    request (a repeated feature is a problem at its second edit, edits past the limit too)."""
    problems: list[tuple[int, str]] = []
    seen: set[int] = set()
    for index, edit in enumerate(edits):
        message = _edit_problem(edit, multiplier, n_features, hidden, limits)
        if message is None and edit.feature in seen:
            message = f"feature {edit.feature} appears twice; keep one edit per feature."
        if message is None and len(seen) >= limits.max_edits:
            message = f"more than {limits.max_edits} edits; at most {limits.max_edits} are allowed."
        if message is None:
            seen.add(edit.feature)
        else:
            problems.append((index, message))
    return problems


def _edit_problem(
    edit: Any, multiplier: float, n_features: int, hidden: Any, limits: SteeringLimits
) -> str | None:
    if not isinstance(edit, Edit):
        return f"expected an Edit(feature, strength, mode), got {type(edit).__name__}."
    feature = feature_id(edit.feature)
    if feature is None:
        return f"feature {edit.feature!r} is not a feature id (a whole number)."
    if not 0 <= feature < n_features:
        return f"feature {feature} does not exist: valid feature ids are 0 to {n_features - 1}."
    if bool(hidden[feature]):
        return f"feature {feature} is hidden in this bundle and cannot be steered."
    if edit.mode not in MODES:
        return f"unknown mode {edit.mode!r} for feature {feature}; choose one of {', '.join(MODES)}."
    if not is_finite_number(edit.strength):
        return f"strength {edit.strength!r} of feature {feature} is not a finite number."
    value = edit.strength * multiplier
    if abs(value) > limits.max_abs_strength:
        return (
            f"strength {edit.strength:g} × multiplier {multiplier:g} of feature {feature} is beyond "
            f"±{limits.max_abs_strength:g} (units of the feature's max activation)."
        )
    if edit.mode == "pin" and value < 0:
        return (
            f"feature {feature} cannot be pinned to a negative activation ({value:g}); pin to 0 to "
            "switch it off, or nudge with a negative strength to push it away."
        )
    return None


MAX_PRESENCE_PENALTY = 2.0  # OpenAI's and vLLM's upper bound


def check_sampling(sampling: SamplingConfig, limits: SteeringLimits) -> None:
    """Raise SteeringError when ``sampling`` is outside what the server allows."""
    if not is_finite_number(sampling.temperature) or not 0 <= sampling.temperature <= limits.max_temperature:
        raise SteeringError(
            f"temperature {sampling.temperature!r} must be between 0 and {limits.max_temperature:g}."
        )
    if not is_finite_number(sampling.top_p) or not 0 < sampling.top_p <= 1:
        raise SteeringError(f"top_p {sampling.top_p!r} must be in (0, 1].")
    if (
        not is_finite_number(sampling.presence_penalty)
        or not 0 <= sampling.presence_penalty <= MAX_PRESENCE_PENALTY
    ):
        raise SteeringError(
            f"presence_penalty {sampling.presence_penalty!r} must be between 0 and {MAX_PRESENCE_PENALTY:g}."
        )
    if not is_int(sampling.max_new_tokens) or not 1 <= sampling.max_new_tokens <= limits.max_new_tokens:
        raise SteeringError(
            f"max_new_tokens {sampling.max_new_tokens!r} must be between 1 and {limits.max_new_tokens}."
        )
    if not is_int(sampling.min_new_tokens) or not 0 <= sampling.min_new_tokens <= sampling.max_new_tokens:
        raise SteeringError(
            f"min_new_tokens {sampling.min_new_tokens!r} must be between 0 and max_new_tokens."
        )
    if sampling.seed is not None and (not is_int(sampling.seed) or sampling.seed < 0):
        raise SteeringError(f"seed {sampling.seed!r} must be a non-negative integer or None.")


def feature_id(value: Any) -> int | None:
    """``value`` as a feature id when it is a whole number (numpy integers included), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Sequence[Any]) -> None:
    """Chat messages the chat template can take: dicts with a known role and text content, not all
    empty, no lone surrogates (text a tokenizer cannot encode)."""
    if not messages:
        raise SteeringError("the prompt is empty; send at least one message.")
    for number, message in enumerate(messages, start=1):
        if not (isinstance(message, dict) and "role" in message and "content" in message):
            raise SteeringError(
                "A prompt is chat messages ({'role': ..., 'content': ...}), a string or token ids; "
                f"message {number} is {str(message)[:60]!r}."
            )
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise SteeringError(f"message {number} has role {role!r}; use one of {', '.join(CHAT_ROLES)}.")
        if not isinstance(content, str):
            raise SteeringError(f"message {number}'s content is {type(content).__name__}; give text.")
        surrogate = next((ch for ch in content if "\ud800" <= ch <= "\udfff"), None)
        if surrogate is not None:
            raise SteeringError(
                f"message {number} holds a lone surrogate (U+{ord(surrogate):04X}), which is not text; remove it."
            )
    if not any(str(m["content"]).strip() for m in messages):
        raise SteeringError("the prompt is empty; type a message.")
