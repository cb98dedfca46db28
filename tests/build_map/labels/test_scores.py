"""Label scores: detection and fuzzing on held-out examples, with any judge; labellers never see
the held-out examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from build_map.labels.judges import OfflineJudge, label_terms
from build_map.labels.scores import ScoreConfig, held_out, labelling_examples, score_labels
from build_map.labels.snippets import snippet
from build_map.pipeline.label_stage import label_features
from tests.support.label_tables import example_row

TOPICS = ["pizza", "guitar", "soccer", "violin", "pasta", "tennis"]


def topic_tables(n_examples: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Six features, each firing on its own topic word in otherwise shared sentences; each is the
    others' decoder neighbour. Quantile rows 1, 3, 5 are held out."""
    rows = []
    for f, topic in enumerate(TOPICS):
        for rank in range(n_examples):
            words = ["I", " really", " like", f" {topic}", " on", " the", " weekend", "."]
            acts_row = example_row(f, words, 3, act=2.0 + rank, bucket="q50", rank=rank)
            acts_row["acts"][2] = 0.3  # a little activation before the focus word
            rows.append(acts_row)
    features = pd.DataFrame(
        {
            "feature": range(len(TOPICS)),
            "label": [f"'{t}'" for t in TOPICS],
            "dead": False,
            "hidden": False,
            "neighbors": [[g for g in range(len(TOPICS)) if g != f] for f in range(len(TOPICS))],
            "top_logits": [[] for _ in TOPICS],
        }
    )
    return features, pd.DataFrame(rows)


def test_a_label_naming_the_feature_scores_high_and_a_wrong_one_scores_chance():
    features, examples = topic_tables()
    scored, summary = score_labels(features, examples, OfflineJudge())
    assert scored["detection"].tolist() == pytest.approx([1.0] * 6)
    assert scored["fuzzing"].tolist() == pytest.approx([1.0] * 6)
    assert set(scored["label_judge"]) == {"offline-overlap"}
    assert summary.above_chance == 1.0 and summary.n_scored == 6

    wrong = features.assign(label=["'weather'"] * 6)  # in no snippet: every option ties
    scored, summary = score_labels(wrong, examples, OfflineJudge())
    assert scored["detection"].tolist() == pytest.approx([0.25] * 6)
    assert scored["fuzzing"].tolist() == pytest.approx([0.5] * 6)
    assert summary.above_chance == 0.0
    assert "detection 0.25 (chance 0.25)" in summary.line()

    shared = features.assign(label=["'weekend'"] * 6)  # in every snippet, near every focus word
    assert score_labels(shared, examples, OfflineJudge())[0]["detection"].tolist() == pytest.approx(
        [0.25] * 6
    )


def test_where_the_true_snippet_sits_is_random():
    """A judge that always picks the first option is right a quarter of the time, not always."""

    class FirstOption:
        name = "first"

        def rate(self, label, options):
            return np.array([1.0] + [0.0] * (len(options) - 1))

    features, examples = topic_tables()
    scored, _ = score_labels(features, examples, FirstOption(), ScoreConfig(n_draws=400))
    assert scored["detection"].mean() == pytest.approx(0.25, abs=0.04)
    assert scored["fuzzing"].mean() == pytest.approx(0.5, abs=0.05)


def test_features_without_held_out_examples_or_neighbours_are_not_scored():
    features, examples = topic_tables()
    features["neighbors"] = [[1, 2]] + features["neighbors"].tolist()[1:]  # fewer than the distractors
    features.loc[1, "dead"] = True
    examples = examples[(examples["feature"] != 2) | (examples["rank"] == 0)]  # one example: none to hold out
    scored, summary = score_labels(features, examples, OfflineJudge())
    assert np.isnan(scored.loc[0, "detection"]) and np.isfinite(scored.loc[0, "fuzzing"])
    assert np.isnan(scored.loc[1, "detection"]) and np.isnan(scored.loc[2, "fuzzing"])
    assert summary.n_scored == 3


def test_scores_are_reproducible_and_seeded():
    features, examples = topic_tables()
    noisy = features.assign(label=["'pizza' (weekend)"] + [f"'{t}'" for t in TOPICS[1:]])
    one = score_labels(noisy, examples, OfflineJudge(), ScoreConfig(seed=1))[0]["detection"]
    two = score_labels(noisy, examples, OfflineJudge(), ScoreConfig(seed=1))[0]["detection"]
    assert one.tolist() == two.tolist()


def test_held_out_takes_every_second_quantile_example_or_else_top_ones():
    rows = [example_row(0, ["a"], 0, bucket=b, rank=r) for b in ("q25", "q50") for r in range(3)]
    rows += [example_row(0, ["a"], 0, rank=r) for r in range(4)]
    rows += [example_row(1, ["a"], 0, rank=r) for r in range(4)] + [example_row(1, ["a"], 0, bucket="q50")]
    frame = pd.DataFrame(rows)
    held = frame[held_out(frame)]
    assert held[held["feature"] == 0][["bucket", "rank"]].values.tolist() == [
        ["q25", 1],
        ["q50", 0],
        ["q50", 2],
    ]
    assert held[held["feature"] == 1][["bucket", "rank"]].values.tolist() == [["top", 1], ["top", 3]]


def test_labellers_never_see_held_out_examples():
    """A word that only held-out examples hold never reaches a label."""
    features, examples = topic_tables()
    secret = examples.index[(examples["feature"] == 0) & held_out(examples)]
    for i in secret:
        tokens = list(examples.at[i, "tokens"])
        tokens[3] = " zeppelin"
        examples.at[i, "tokens"] = tokens
    assert "zeppelin" not in " ".join(" ".join(t) for t in labelling_examples(examples)["tokens"])
    labelled = label_features(features.drop(columns=["label"]), examples)
    assert "zeppelin" not in " ".join(labelled["label"])
    assert labelled.loc[0, "label"].startswith("'pizza'")


def test_label_terms_and_snippet_words():
    assert label_terms("'teeth' / 'the' (dentist, with) → Chews ·3") == ("teeth", "the", "dentist", "chew")
    snip = snippet(["I", " strugg", "le", " with", " teeth", "."], [0, 2.0, 1.0, 0, 0.5, 0], act=2.0)
    assert snip.words == ("I", " struggle", " with", " teeth", ".") and snip.focus == 1
    assert snip.active() == (1,) and snip.marked_text([1, 3]) == "I «struggle» with «teeth»."


def test_the_sampler_shows_held_out_true_examples_and_neighbours_distractors():
    """Every snippet a judge sees for feature f is either one of f's held-out examples (the true
    one) or an example of one of f's listed neighbours; never one a labeller saw."""
    features, examples = topic_tables()
    features["neighbors"] = [[(f + 1) % 6, (f + 2) % 6, (f + 3) % 6] for f in range(6)]
    for f in range(len(TOPICS)):  # tag each example's words with its feature and split
        rows = examples.index[examples["feature"] == f]
        held = held_out(examples.loc[rows])
        for i, is_held in zip(rows, held, strict=True):
            tokens = list(examples.at[i, "tokens"])
            tokens[-1] = f" f{f}{'held' if is_held else 'seen'}"
            examples.at[i, "tokens"] = tokens
    shown: dict[str, list[list[str]]] = {}

    class Recorder:
        name = "recorder"

        def rate(self, label, options):
            shown.setdefault(label, []).append([snip.words[-1].strip() for snip, _ in options])
            return np.zeros(len(options))

    score_labels(features, examples, Recorder(), ScoreConfig(n_draws=30))
    for f, topic in enumerate(TOPICS):
        allowed_others = {f"f{n}{kind}" for n in features.at[f, "neighbors"] for kind in ("held", "seen")}
        for options in shown[f"'{topic}'"]:
            own = [tag for tag in options if tag.startswith(f"f{f}")]
            assert own and set(own) == {f"f{f}held"}  # the true example is held out, never seen
            assert set(options) - set(own) <= allowed_others
