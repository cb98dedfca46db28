"""Offline labels from what a feature's activating contexts share, not only the token it fires on.

Per feature, from its examples (the top ones and those across its activation quantiles):

- *fires on*: the words holding the focus token, by TF-IDF over features (as in ``auto``), so
  " the" everywhere loses to "pizza". A feature whose focus word is one word in most examples is
  *token-specific* and is labelled by that word alone on the left ("'between'").
- *context*: content words near the focus (weight 1 / (1 + distance in words), within
  ``window`` words, in at least two examples), scored by class-based TF-IDF: contrasted with the
  corpus (how many features' contexts hold the word) and with the feature's decoder neighbours
  (what the neighbours' contexts share is discounted, since that is what tells it from them).
- *writes*: the words the output probe says it promotes through the model (``output_promotes``),
  kept only when they are specific to few features; else the logit lens's whole words.

Label: ``'teeth' / 'mouth' (dentist, dental) → chew``; parts without evidence are left out.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from build_map.labels.auto import characteristic_words, example_words, unique_label, whole_words
from build_map.labels.snippets import snippet, word_form
from build_map.labels.text import (
    DEAD_LABEL,
    DISCOURSE_WORDS,
    MAX_AUTO_CHARS,
    NO_EVIDENCE_LABEL,
    clean_label,
    english_stopwords,
    label_token,
)

_CONTENT = re.compile(r"^[^\W\d_][^\W_]*(?:['’\-][^\W_]+)*$")


@dataclass(frozen=True)
class ContextLabelConfig:
    window: int = 4
    """Words either side of the focus word that count as its context."""
    min_examples: int = 2
    """A context word must occur near the focus in at least this many examples."""
    token_share: float = 0.6
    """A feature is token-specific when one word holds the focus in this share of its examples."""
    n_fires_on: int = 3
    """Words it fires on, at most (a token-specific feature shows one)."""
    n_context: int = 2
    """Context words, at most."""
    n_writes: int = 2
    """Words it writes (after "→"), at most."""
    max_write_share: float = 0.02
    """Output-probe words promoted by more than this share of features say nothing specific."""


def context_labels(
    features: pd.DataFrame, examples: pd.DataFrame, cfg: ContextLabelConfig | None = None
) -> list[str]:
    """One label per row of ``features`` (``"dead feature"`` for dead ones), distinct from each other."""
    cfg = cfg or ContextLabelConfig()
    words, known = example_words(examples)
    fires_on = characteristic_words(words, limit=cfg.n_fires_on + 2)  # room for case duplicates
    focus, context = _contexts(examples, cfg)
    scored = _context_scores(context, features, cfg)
    writes = _specific_writes(features, known, cfg)
    labels: list[str] = []
    taken: set[str] = set()
    for feature, dead in zip(features["feature"].astype(int), features["dead"].astype(bool), strict=True):
        if dead:
            labels.append(DEAD_LABEL)
            continue
        left = _fires_on_part(fires_on.get(feature, []), focus.get(feature, Counter()), cfg)
        said = {word_form(w) for w in left}
        near = [w for w in scored.get(feature, []) if word_form(w) not in said][: cfg.n_context]
        label = unique_label(_variants(left, near, writes.get(feature, []), cfg), taken)
        taken.add(label)
        labels.append(label)
    return labels


def _contexts(examples: pd.DataFrame, cfg: ContextLabelConfig) -> tuple[dict, dict]:
    """feature → Counter of focus word forms (one per example), and feature → {context word:
    [summed proximity weight, examples holding it, most common spelling]}."""
    focus: dict[int, Counter] = defaultdict(Counter)
    context: dict[int, dict[str, list]] = defaultdict(dict)
    stop = english_stopwords() | DISCOURSE_WORDS
    rows = zip(examples["feature"], examples["tokens"], examples["acts"], examples["act"], strict=True)
    for feature, tokens, acts, act in rows:
        if len(tokens) == 0:
            continue
        snip = snippet(tokens, acts, act)
        forms = snip.forms
        focus[int(feature)][forms[snip.focus]] += 1
        near: dict[str, tuple[float, str]] = {}
        lo, hi = max(0, snip.focus - cfg.window), min(len(forms), snip.focus + cfg.window + 1)
        for i in range(lo, hi):
            form, word = forms[i], snip.words[i].strip()
            if i == snip.focus or form == forms[snip.focus] or len(form) < 3 or form in stop:
                continue
            if not _CONTENT.match(word) or (i > 0 and _is_special(snip.words[i - 1])):
                continue  # the role name after "<|im_start|>" is the chat template, not a context
            weight = 1.0 / (1.0 + abs(i - snip.focus))
            if weight > near.get(form, (0.0, ""))[0]:
                near[form] = (weight, word)
        bag = context[int(feature)]
        for form, (weight, word) in near.items():
            entry = bag.setdefault(form, [0.0, 0, Counter()])
            entry[0] += weight
            entry[1] += 1
            entry[2][word] += 1
    return focus, context


def _context_scores(context: dict, features: pd.DataFrame, cfg: ContextLabelConfig) -> dict[int, list[str]]:
    """feature → its best context words, best first, spelled as they mostly occur."""
    n_docs = max(len(context), 1)
    doc_freq = Counter(form for bag in context.values() for form in bag)
    listed = features["neighbors"] if "neighbors" in features.columns else [None] * len(features)
    neighbors = dict(zip(features["feature"].astype(int), listed, strict=True))
    out: dict[int, list[str]] = {}
    for feature, bag in context.items():
        near = [int(n) for n in (neighbors.get(feature) if neighbors.get(feature) is not None else [])]
        scored = []
        for form, (weight, n_examples, spellings) in bag.items():
            if n_examples < cfg.min_examples:
                continue
            shared = np.mean([context.get(n, {}).get(form, (0.0,))[0] for n in near]) if near else 0.0
            contrast = weight / (weight + shared)
            score = weight * math.log(n_docs / doc_freq[form]) * contrast
            if score > 0:
                scored.append((score, spellings.most_common(1)[0][0]))
        scored.sort(key=lambda s: -s[0])
        best = scored[0][0] if scored else 0.0
        out[feature] = [word for score, word in scored if score >= best / 3][: cfg.n_context + 2]
    return out


def _specific_writes(
    features: pd.DataFrame, known: set[str], cfg: ContextLabelConfig
) -> dict[int, list[str]]:
    """feature → words it writes that few features write: the probe's whole words where probed,
    else the logit lens's whole words seen in the examples."""
    probe = features["output_promotes"] if "output_promotes" in features.columns else None
    lists = {}
    for i, feature in enumerate(features["feature"].astype(int)):
        promoted = _as_list(probe.iloc[i]) if probe is not None else []
        lists[feature] = promoted or _as_list(features["top_logits"].iloc[i])
    counts = Counter(word_form(w) for words in lists.values() for w in set(words))
    limit = max(cfg.max_write_share * len(lists), 2)
    out = {}
    for feature, words in lists.items():
        specific = [w for w in words if counts[word_form(w)] <= limit]
        out[feature] = whole_words(specific, known, limit=cfg.n_writes)
    return out


def _is_special(word: str) -> bool:
    text = word.strip()
    return len(text) > 2 and text.startswith("<") and text.endswith(">")


def _as_list(values) -> list[str]:
    return [] if values is None else [str(v) for v in values]


def _fires_on_part(fires_on: Sequence[str], focus: Counter, cfg: ContextLabelConfig) -> list[str]:
    """The quoted words on the left: the one word of a token-specific feature, else its
    characteristic focus words."""
    total = sum(focus.values())
    if total and focus:
        form, count = focus.most_common(1)[0]
        if count / total >= cfg.token_share:
            same = [w for w in fires_on if word_form(w) == form]
            return same[:1] or [form or next(iter(fires_on), "")]
    distinct: dict[str, str] = {}  # "day" and "Day" are one word to a reader
    for word in fires_on:
        distinct.setdefault(word_form(word), word)
    return list(distinct.values())[: cfg.n_fires_on]


def _variants(left: Sequence[str], context: Sequence[str], writes: Sequence[str],
              cfg: ContextLabelConfig) -> Iterable[str]:  # fmt: skip
    """Full label first, then shorter ones (for the length cap); ``unique_label`` takes the first not
    used by another feature."""
    quoted = " / ".join(f"'{label_token(w)}'" for w in left)
    for n_context in range(len(context), -1, -1):
        for n_writes in range(len(writes), -1, -1):
            parts = [quoted] if quoted else []
            if n_context:
                parts.append(
                    f"({', '.join(context[:n_context])})" if quoted else ", ".join(context[:n_context])
                )
            text = " ".join(parts)
            if n_writes:
                text = f"{text} → {', '.join(writes[:n_writes])}".strip()
            text = text or NO_EVIDENCE_LABEL
            if len(text) <= MAX_AUTO_CHARS:
                yield clean_label(text, MAX_AUTO_CHARS)
    yield clean_label(quoted or NO_EVIDENCE_LABEL, MAX_AUTO_CHARS)
