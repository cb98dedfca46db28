"""Small feature and example tables for the label tests."""

from __future__ import annotations

import pandas as pd

N = 10


def example_row(feature, words, focus, act=2.0, bucket="top", rank=0):
    acts = [0.0] * len(words)
    acts[focus] = act
    return {"feature": feature, "rank": rank, "bucket": bucket, "act": act, "tokens": words, "acts": acts}


def label_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature 0 fires on food words (its context holds the words it promotes), 1 on "thanks", 2 on " the" (which every feature's context has),
    3 is dead, the others fire on the byte-level newline/space markers and plain words."""
    rows = []
    for rank, word in enumerate(["Ġpizza", " pasta", " pizza"]):
        words = ["I", " like", " the", word, " food", " we", " eat", " now"]
        rows.append(example_row(0, words, 3, act=3.0 - rank, rank=rank))
    for rank in range(3):
        rows.append(
            example_row(
                1, ["Well", " thanks", " for", " the", " you", " welcome", " help"], 1, act=2.0, rank=rank
            )
        )
    for rank in range(3):
        rows.append(example_row(2, ["on", " the", " mat"], 1, act=1.0, rank=rank))
    for feature in range(4, N):
        words = ["Ċ", f" word{feature}", " the", "▁x"]
        rows.append(example_row(feature, words, 1 if feature % 2 else 0, act=1.5))
        rows.append({**example_row(feature, words, 2, act=0.5, bucket="q50"), "acts": [0.0, 0.0, 0.5, 0.4]})
    examples = pd.DataFrame(rows)
    features = pd.DataFrame(
        {
            "feature": range(N),
            "dead": [i == 3 for i in range(N)],
            "top_logits": [["Ġfood", " eat", "123", "!!", " eat"], [" you", " welcome"], [" cat"], []]
            + [[f" out{i}", "\n"] for i in range(4, N)],
        }
    )
    return features, examples
