"""Word-level evidence for automatic labels (``build_map.labels.contexts``): the words a feature
fires on in its examples (sub-word tokens glued into the words around them, weighted by activation
and by TF-IDF with features as documents, so " the" everywhere loses to "pizza"), and which
output tokens are whole words seen in the examples (logit-lens fragments such as "outheastern"
are no words)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from build_map.labels.text import MAX_AUTO_CHARS, NO_EVIDENCE_LABEL, label_token
from build_map.lm.tokens import MARKERS


def _token_traits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct token string: (continues a word, a word may continue after it, starts with a
    space, label form)."""
    shown = np.array([label_token(t) for t in raw], dtype=object)
    text = [str(t).translate(MARKERS) for t in raw]
    special = np.array([t.startswith("<") and t.endswith(">") and len(t) > 2 for t in text])
    joins_left = np.array([bool(t) and t[0].isalnum() for t in text]) & ~special
    joins_right = np.array([bool(t) and t[-1].isalnum() for t in text]) & ~special
    spaced = np.array([t[:1].isspace() for t in text], dtype=bool)
    return joins_left, joins_right, spaced, shown


def example_words(examples_df: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """Every word of every example with an active token (feature, text, weight), and the
    lower-cased words known to be whole words (see the comment at ``known``).

    Tokens are glued into words where an alphanumeric piece follows an alphanumeric piece with no
    space or marker between them. A word's weight is its most active token's activation scaled to
    the example's peak, doubled when the word holds the example's focus token (the one at ``act``).
    Vectorised: 65,536 features x ~19 examples x ~20 tokens is ~25M cells.
    """
    lengths = examples_df["acts"].map(len).to_numpy() if len(examples_df) else np.zeros(0, int)
    frame, lengths = examples_df[lengths > 0], lengths[lengths > 0]
    if frame.empty:
        return pd.DataFrame({"feature": [], "text": [], "weight": []}), set()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    acts = np.concatenate([np.asarray(a, dtype=np.float64) for a in frame["acts"]])
    distance = np.abs(acts - np.repeat(frame["act"].to_numpy(np.float64), lengths))
    focus = distance == np.repeat(np.minimum.reduceat(distance, starts), lengths)
    peak = np.maximum(np.repeat(np.maximum.reduceat(acts, starts), lengths), 1e-12)
    weight = np.where(acts > 0, acts / peak * np.where(focus, 2.0, 1.0), 0.0)
    codes, raw = pd.factorize(np.concatenate([np.asarray(t, dtype=object) for t in frame["tokens"]]))
    joins_left, joins_right, spaced, shown = _token_traits(np.asarray(raw, dtype=object))
    new_word = np.ones(len(codes), dtype=bool)
    new_word[1:] = ~(joins_left[codes[1:]] & joins_right[codes[:-1]])
    new_word[starts] = True
    word_start = np.flatnonzero(new_word)
    word_weight = np.maximum.reduceat(weight, word_start)
    active = np.flatnonzero(word_weight > 0)
    word_end = np.r_[word_start[1:], len(codes)]
    raw_text = np.asarray(raw, dtype=object)
    texts = [
        shown[codes[s]] if e - s == 1 else label_token("".join(raw_text[codes[s:e]]).translate(MARKERS))
        for s, e in zip(word_start[active].tolist(), word_end[active].tolist(), strict=True)
    ]
    feature = np.repeat(frame["feature"].to_numpy(np.int64), lengths)[word_start[active]]
    words = pd.DataFrame({"feature": feature, "text": texts, "weight": word_weight[active]})
    # Known words: whole single-token words after a space, and the active words, away from the
    # window edges (a window can start or end inside a word: "acific" of " Pacific" is no word;
    # "ing" after a hyphen is no word either).
    ends = np.cumsum(lengths)
    inner = ~np.isin(word_start, starts) & ~np.isin(word_end, ends)
    single = word_start[(word_end - word_start == 1) & inner & spaced[codes[word_start]]]
    seen = Counter(str(t).lower() for t in shown[codes[single]])
    seen.update(t.lower() for t, keep in zip(texts, inner[active].tolist(), strict=True) if keep)
    known = {word for word, count in seen.items() if count >= 2}  # typos and odd splits occur once
    return words[words["text"] != ""], known


def characteristic_words(words: pd.DataFrame, limit: int = 3) -> dict[int, list[str]]:
    """feature → up to ``limit`` words it fires on, best first, by TF-IDF.

    TF: the words' weights summed over the feature's examples (see ``example_words``). IDF:
    sqrt(log(1 + features / features firing on the word)). Words scoring under a third of the
    best are left out.
    """
    if words.empty:
        return {}
    word, shown = pd.factorize(words["text"].to_numpy(dtype=object))
    feature = words["feature"].to_numpy(np.int64)
    keys, inverse = np.unique(feature * len(shown) + word, return_inverse=True)
    tf = np.bincount(inverse, weights=words["weight"].to_numpy(np.float64))
    key_feature, key_word = keys // len(shown), keys % len(shown)
    doc_freq = np.bincount(key_word, minlength=len(shown))[key_word]
    # IDF softened by a square root: rare words should win over " the", not over a feature's main word.
    score = tf * np.sqrt(np.log1p(len(np.unique(key_feature)) / doc_freq))
    order = np.lexsort((key_word, -score, key_feature))  # by feature, best score first
    key_feature, key_word, score = key_feature[order], key_word[order], score[order]
    first = np.r_[True, key_feature[1:] != key_feature[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start
    chosen = (rank < limit) & (score >= score[group_start] / 3)
    out: dict[int, list[str]] = {}
    for f, t in zip(key_feature[chosen].tolist(), shown[key_word[chosen]].tolist(), strict=True):
        out.setdefault(f, []).append(t)
    return out


def whole_words(tokens: Iterable[str] | None, known: set[str], limit: int = 3) -> list[str]:
    """Logit-lens tokens worth showing: whole words of two or more characters seen in the
    examples, deduplicated."""
    shown: list[str] = []
    for token in list(tokens) if tokens is not None else []:
        text = label_token(token)
        lower = text.lower()
        wordlike = len(text) > 1 and any(ch.isalnum() for ch in text)
        if wordlike and lower in known and lower not in (s.lower() for s in shown):
            shown.append(text)
        if len(shown) == limit:
            break
    return shown


def unique_label(variants: Iterable[str], taken: set[str]) -> str:
    """The first variant not taken; else the most detailed one with a counter (" ·2")."""
    text = NO_EVIDENCE_LABEL
    for text in variants:
        if text not in taken:
            return text
    base, n = text[: MAX_AUTO_CHARS - 4], 2
    while f"{base} ·{n}" in taken:
        n += 1
    return f"{base} ·{n}"
