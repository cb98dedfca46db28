"""Automatic labels are short, readable, distinct and specific; label text is cleaned."""

from __future__ import annotations

import re

import pandas as pd

from build_map.labels.contexts import context_labels
from build_map.labels.text import DEAD_LABEL, MAX_AUTO_CHARS, clean_label
from tests.support.label_tables import N, example_row


def test_auto_labels_readable_and_distinct(label_tables):
    features, examples = label_tables
    labels = context_labels(features, examples)
    assert len(labels) == N
    assert labels[3] == DEAD_LABEL
    live = [label for i, label in enumerate(labels) if i != 3]
    assert all(label and len(label) <= MAX_AUTO_CHARS for label in live)
    assert len(set(live)) == len(live)
    for label in labels:
        assert not re.search(r"[ĠĊ▁ĉ]", label), label
        assert not re.fullmatch(r"[\d\s,\[\]]+", label), label  # never a list of ids
    assert labels[0].startswith("'pizza'")
    assert "→ food, eat" in labels[0]
    assert "'thanks'" in labels[1] and "you" in labels[1]
    assert labels[2].startswith("'the'")  # the only token it fires on, even if common
    assert "'↵'" in labels[4]  # newline made visible rather than dropped


def test_auto_labels_prefer_specific_tokens(label_tables):
    """A token every feature fires on weighs less than one specific to the feature (TF-IDF)."""
    features, examples = label_tables
    common = examples[examples["feature"] >= 4].copy()
    common["acts"] = [[0.0, 1.0, 1.0, 0.0]] * len(common)  # fires on " wordN" and " the" equally
    labels = context_labels(features[features["feature"] >= 4].reset_index(drop=True), common)
    assert all(label.startswith(f"'word{i}'") for i, label in zip(range(4, N), labels, strict=True))


def test_auto_labels_show_whole_words_and_skip_logit_fragments(label_tables):
    """A feature firing on the piece "strugg" of " struggle" reads 'struggle'; logit-lens tokens that
    never occur as words ("outheastern", or "acific" seen only where a window cuts " Pacific")
    stay out of the label, real words ("eat") stay in."""
    features, examples = label_tables
    pieces = ["acific", " I", " strugg", "le", " to", " eat", "<|im_end|>", "Ċ", "Good", "."]
    rows = [{**example_row(0, pieces, 2, act=4.0), "acts": [0, 0, 4.0, 1.0, 0, 0, 0, 0, 0, 0]}]
    rows.append({**example_row(1, pieces, 8, act=2.0), "acts": [0, 0, 0, 0, 0, 0, 1.0, 0, 2.0, 0]})
    features = features.iloc[:2].assign(
        top_logits=[["acific", "outheastern", " eat"], ["outheastern", "acific"]]
    )
    labels = context_labels(features, pd.DataFrame(rows))
    assert labels[0] == "'struggle' → eat", labels
    assert labels[1].startswith("'Good'") and "→" not in labels[1] and "im_end" not in labels[1], labels


def test_clean_label_strips_controls_and_caps():
    assert clean_label("a\x00b\u202e\tc\n d") == "ab c d"
    assert len(clean_label("x" * 500)) == 120
    assert clean_label("x" * 500).endswith("…")
    assert clean_label(None) == ""


# ---------------------------------------------------------------- LLM labeller


def test_topic_words_keep_the_activating_side_of_context_labels():
    from build_map.labels.text import AUTO, IMPORTED, topic_words

    assert topic_words("'pizza' / 'pasta' → food, eat", AUTO) == "'pizza' / 'pasta'"
    assert topic_words("Italian food → recipes", IMPORTED) == "Italian food → recipes"
