"""Feature labels as text: cleaning untrusted label text, showing tokens as labels, combining
label sources.

Every label is untrusted text. Here it is only cleaned (control characters stripped, whitespace
collapsed, length capped); HTML escaping is the renderers' job. Priority when several exist for a
feature: imported > llm > auto.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata

import pandas as pd

from build_map.lm.tokens import MARKERS

AUTO, IMPORTED, LLM = "auto", "imported", "llm"
DEAD_LABEL = "dead feature"
NO_EVIDENCE_LABEL = "unlabelled feature"
MAX_AUTO_CHARS = 60
MAX_LABEL_CHARS = 120  # imported and LLM labels

_SPACES = re.compile(r"\s+")

# Words of chat that carry no topic (fillers, hedges, contractions written without the apostrophe):
# frequent near every focus word in conversational corpora, so they crowd real context words out of
# labels and name map regions "just, really". Not stopwords of formal English (sklearn's list).
DISCOURSE_WORDS = frozenset(
    [
        "just",
        "really",
        "pretty",
        "yeah",
        "yep",
        "yes",
        "okay",
        "ok",
        "oh",
        "ooh",
        "ah",
        "lol",
        "haha",
        "hahaha",
        "hehe",
        "im",
        "ive",
        "id",
        "youre",
        "thats",
        "whats",
        "dont",
        "didnt",
        "doesnt",
        "isnt",
        "cant",
        "wont",
        "gonna",
        "wanna",
        "got",
        "lot",
        "lots",
        "stuff",
        "thing",
        "things",
        "kind",
        "sort",
        "maybe",
        "actually",
        "probably",
        "definitely",
        "basically",
        "literally",
        "totally",
        "sure",
        "guess",
        "don",  # "don't" cut at the apostrophe, and its kin
        "didn",
        "doesn",
        "isn",
        "wasn",
        "couldn",
        "wouldn",
        "shouldn",
        "aren",
        "haven",
    ]
)


@functools.lru_cache(maxsize=1)
def english_stopwords() -> frozenset[str]:
    """Formal English function words (scikit-learn's list): no topic, in labels or in judging them."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def clean_label(text: object, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Drop control/format characters, collapse whitespace, cap the length with an ellipsis."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    kept = str(text)
    if not kept.isprintable():  # the slow path only for text with control/format/odd characters
        chars = (" " if ch.isspace() else ch for ch in kept)
        kept = "".join(ch for ch in chars if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    kept = _SPACES.sub(" ", kept).strip()
    if len(kept) > max_chars:
        kept = kept[: max_chars - 1].rstrip() + "…"
    return kept


def label_token(token: str) -> str:
    """A token as a label shows it: markers replaced, whitespace trimmed, pure whitespace made visible."""
    text = str(token).translate(MARKERS)
    stripped = text.strip()
    if stripped:
        return clean_label(stripped, 24)
    if "\n" in text:
        return "↵"
    return "␣" if text else ""


def topic_words(label: str, source: str) -> str:
    """The part of a label that says what a feature is about, for naming clusters: an automatic
    label's activating words ("'pizza' / 'pasta'", not the noisier logit-lens side after "→")."""
    return label.split(" → ", 1)[0] if source == AUTO else label


def apply_labels(
    features_df: pd.DataFrame,
    auto: list[str],
    imported: pd.Series | None = None,
    llm: pd.Series | None = None,
) -> pd.DataFrame:
    """A copy of ``features_df`` with ``label`` and ``label_source``: imported > llm > auto."""
    if len(auto) != len(features_df):
        raise ValueError(f"{len(auto)} automatic labels for {len(features_df)} features.")
    out = features_df.copy()
    labels = pd.Series([clean_label(text, MAX_AUTO_CHARS) for text in auto], index=out["feature"].to_numpy())
    source = pd.Series(AUTO, index=labels.index, dtype=object)
    for override, name in ((llm, LLM), (imported, IMPORTED)):
        if override is None or len(override) == 0:
            continue
        override = override[override.index.isin(labels.index)].map(clean_label)
        override = override[override != ""]
        labels.loc[override.index] = override.to_numpy()
        source.loc[override.index] = name
    out["label"] = labels.to_numpy()
    out["label_source"] = source.to_numpy()
    return out
