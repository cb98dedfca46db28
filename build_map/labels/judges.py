"""Judges of labels: given a label and a few snippets with marked words, how well does the label
fit each? Detection and fuzzing (``build_map.labels.scores``) ask one question of any judge.

A judge has a ``name`` (stored with the scores) and ``rate(label, options)``: one number per
option, higher = the label fits the marked words better; the option(s) with the highest number are
its pick. The offline judge needs no model; the LLM judges (``build_map.labels.llm``) ask one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from build_map.labels.snippets import Snippet, forms_match, word_form
from build_map.labels.text import english_stopwords

Option = tuple[Snippet, tuple[int, ...]]
"""A snippet and the indices of its marked words."""

_QUOTED = re.compile(r"'([^']+)'")
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
_COUNTER = re.compile(r"\s·\d+$")


class Judge(Protocol):
    name: str

    def rate(self, label: str, options: Sequence[Option]) -> np.ndarray: ...


def label_terms(label: str) -> tuple[str, ...]:
    """The word forms a label names: every quoted token as it is ("'the'" counts), and the content
    words outside quotes (stopwords left out: "with", "from" say nothing of a feature)."""
    text = _COUNTER.sub("", label or "")
    quoted = [word_form(q) for q in _QUOTED.findall(text)]
    rest = _QUOTED.sub(" ", text)
    stop = english_stopwords()
    bare = [word_form(w) for w in _WORD.findall(rest) if len(w) > 1 and w.lower() not in stop]
    return tuple(dict.fromkeys(t for t in quoted + bare if t))


@dataclass(frozen=True)
class OfflineJudge:
    """Word overlap, no model: each label term scores where it occurs in the snippet, weighted
    1 / (1 + distance in words to the nearest marked word); a snippet's rating is the sum over terms
    of each term's best occurrence. A label whose terms occur in no option rates all options 0, a
    tie, so it scores chance: the judge rewards nothing but evidence."""

    name: str = "offline-overlap"

    def rate(self, label: str, options: Sequence[Option]) -> np.ndarray:
        terms = label_terms(label)
        return np.array([_overlap(terms, snip, marked) for snip, marked in options], dtype=np.float64)


def _overlap(terms: Sequence[str], snip: Snippet, marked: Sequence[int]) -> float:
    if not terms or not marked:
        return 0.0
    total = 0.0
    for term in terms:
        best = 0.0
        for i, form in enumerate(snip.forms):
            if forms_match(term, form):
                best = max(best, 1.0 / (1.0 + min(abs(i - m) for m in marked)))
        total += best
    return total
