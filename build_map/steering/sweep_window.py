"""Reading a sweep: mean effect and coherence per strength, and the window of strengths worth using."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


class SweepError(ValueError):
    """A sweep request cannot run; the message names the value and what to do."""


@dataclass(frozen=True)
class WindowRule:
    """How ``suggest_window`` picks the useful strengths (means over prompts, vs strength 0)."""

    min_effect_rise: float = 0.05
    """The effect must rise by at least this much over strength 0 (units of max activation)."""
    relative_effect_rise: float = 0.2
    """... and by at least this share of the largest rise seen in the sweep."""
    max_coherence_drop: float = 1.0
    """Coherence may fall at most this many nats per token below strength 0 (perplexity × e)."""


def sweep_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean effect, coherence, perplexity and repetition per strength (over prompts)."""
    columns = ["effect", "coherence", "repetition", "n_tokens"]
    summary = frame.groupby("strength")[columns].mean()
    summary["perplexity"] = np.exp(-summary["coherence"])
    return summary.sort_index()


def suggest_window(frame: pd.DataFrame, rule: WindowRule | None = None) -> tuple[float, float] | None:
    """The range of positive strengths worth using, or None when no strength qualifies.

    Rule (on means over prompts, against strength 0): walking up the positive strengths, a
    strength qualifies when its effect rose by at least ``max(min_effect_rise,
    relative_effect_rise × largest rise)`` and its coherence is within ``max_coherence_drop`` nats
    per token of strength 0. The window is the first run of qualifying strengths; it ends at the
    first strength whose coherence collapsed (nothing above it counts) or whose effect fell back."""
    rule = rule or WindowRule()
    summary = sweep_summary(frame)
    if 0.0 not in summary.index:
        raise SweepError("the sweep has no strength 0 to compare with; include 0 in the strengths.")
    base = summary.loc[0.0]
    positive = summary[summary.index > 0]
    rise = positive["effect"] - base["effect"]
    needed = max(rule.min_effect_rise, rule.relative_effect_rise * float(rise.max(skipna=True) or 0.0))
    window: list[float] = []
    for strength, row in positive.iterrows():
        if not row["coherence"] >= base["coherence"] - rule.max_coherence_drop:  # NaN counts as collapsed
            break
        if row["effect"] - base["effect"] >= needed:
            window.append(float(strength))
        elif window:
            break
    return (window[0], window[-1]) if window else None


def window_text(window: tuple[float, float] | None) -> str:
    if window is None:
        return "none (no strength raised the effect before coherence collapsed; try other strengths)"
    return f"{window[0]:g} to {window[1]:g} (× max activation)"
