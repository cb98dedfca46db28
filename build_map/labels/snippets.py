"""Examples as words, for judging labels: tokens glued into words, each word's activation, the
focus word, and the word forms a label is matched against."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from build_map.lm.tokens import MARKERS

_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


@dataclass(frozen=True)
class Snippet:
    """One example as words: ``words`` keep their leading spaces (joined they give the text back),
    ``acts`` the highest activation of any token in each word, ``focus`` the word holding the
    example's focus token (the one at the example's ``act``), ``forms`` each word in the form
    labels are matched in (``word_form``)."""

    words: tuple[str, ...]
    acts: tuple[float, ...]
    focus: int
    forms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.forms) != len(self.words):
            object.__setattr__(self, "forms", tuple(word_form(w) for w in self.words))

    def active(self, share: float = 0.5) -> tuple[int, ...]:
        """Words whose activation reaches ``share`` of the snippet's peak (the focus word always)."""
        peak = max(self.acts, default=0.0)
        chosen = {i for i, a in enumerate(self.acts) if peak > 0 and a >= share * peak}
        return tuple(sorted(chosen | {self.focus}))

    def marked_text(self, marked: Sequence[int], left: str = "«", right: str = "»") -> str:
        """The text with the ``marked`` words wrapped in ``left``/``right`` (spaces kept outside)."""
        chosen = set(marked)
        parts = []
        for i, word in enumerate(self.words):
            if i in chosen and word.strip():
                lead = word[: len(word) - len(word.lstrip())]
                parts.append(f"{lead}{left}{word.strip()}{right}")
            else:
                parts.append(word)
        return "".join(parts)


def snippet(tokens: Sequence[str], acts: Sequence[float], act: float) -> Snippet:
    """A Snippet from an example row (its ``tokens``, ``acts`` and focus ``act``)."""
    texts = [str(t).translate(MARKERS) for t in tokens]
    values = np.asarray(acts, dtype=np.float64)
    focus_token = int(np.argmin(np.abs(values - float(act)))) if len(values) else 0
    words: list[str] = []
    word_acts: list[float] = []
    focus = 0
    for i, text in enumerate(texts):
        glued = (
            bool(words) and bool(text) and text[0].isalnum() and bool(words[-1]) and words[-1][-1].isalnum()
        )
        if glued:
            words[-1] += text
            word_acts[-1] = max(word_acts[-1], float(values[i]))
        else:
            words.append(text)
            word_acts.append(float(values[i]) if len(values) else 0.0)
        if i == focus_token:
            focus = len(words) - 1
    return Snippet(tuple(words), tuple(word_acts), focus)


def word_form(word: str) -> str:
    """Lower case, edge punctuation and a possessive or plural ending dropped ("Dogs'" → "dog"); a
    word of punctuation only keeps it ("," stays ",")."""
    text = word.strip().lower()
    stripped = _EDGE_PUNCT.sub("", text)
    if not stripped:
        return text
    for ending in ("'s", "’s"):
        if stripped.endswith(ending):
            stripped = stripped[: -len(ending)]
    if len(stripped) > 3 and stripped.endswith("s") and not stripped.endswith("ss"):
        stripped = stripped[:-1]
    return stripped


def forms_match(a: str, b: str) -> bool:
    """Same word form, or one a prefix of the other of at least four letters ("tooth", "toothbrush")."""
    if a == b:
        return True
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= 4 and long.startswith(short)
