"""Do the labels say what a feature means? Detection and fuzzing on held-out examples.

On a bundle (default: the cached demo bundle), the offline labeller runs on the examples a
labeller may see (``labelling_examples``) and the judge scores on the held-out ones, for:

* ``context labels`` — the default (``build_map.labels.contexts``): the words it fires on, the
  words its contexts share (contrasted with the corpus and its decoder neighbours), what it writes;
* ``fires-on only`` — the baseline in the same run: the words it fires on, nothing else (what the
  labels were before the context labeller);
* ``shuffled`` — the context labels handed to random other features: a control that must score
  chance (detection 0.25, fuzzing 0.5) or the judge rewards something besides evidence.

Printed per variant: mean detection (chance 0.25), the share of features above chance, the share
of live features above 0.5 (the issue's second target), mean
fuzzing (chance 0.5); then the ratio of the default's detection gain over chance to the baseline's,
and the labelling and scoring times.

    python bench/bench_labels.py [BUNDLE] [--judge offline|self|URL]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.bundle.read import load_bundle  # noqa: E402
from build_map.labels.contexts import ContextLabelConfig, context_labels  # noqa: E402
from build_map.labels.scores import labelling_examples, score_labels  # noqa: E402
from build_map.pipeline.label_stage import judge_for  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=None, help="a bundle (default: the cached demo bundle)")
    parser.add_argument("--judge", default="offline", help="offline, self or an endpoint URL")
    args = parser.parse_args()
    if args.bundle is None:
        from build_map.pipeline.demo import demo_bundle

        args.bundle = str(demo_bundle()[0])
    bundle = load_bundle(args.bundle, label_edits=False)
    features, examples = bundle.features, bundle.examples
    seen = labelling_examples(examples)
    judge = judge_for(args.judge)
    start = time.perf_counter()
    labels = context_labels(features, seen)
    label_seconds = time.perf_counter() - start
    baseline = context_labels(features, seen, ContextLabelConfig(n_context=0, n_writes=0))
    live = np.flatnonzero(~features["dead"].to_numpy(bool))
    shuffled = list(labels)
    for i, j in zip(live, np.random.default_rng(0).permutation(live), strict=True):
        shuffled[i] = labels[j]
    print(f"{bundle.path}: {len(live):,} live features; judge {judge.name}")
    print(
        f"{'variant':<16} {'detection':>9} {'above chance':>13} {'live > 0.5':>11} {'fuzzing':>8} {'seconds':>8}"
    )
    figures = {}
    for name, variant in (("context labels", labels), ("fires-on only", baseline), ("shuffled", shuffled)):
        start = time.perf_counter()
        scored, summary = score_labels(features.assign(label=variant), examples, judge)
        above_half = float((scored["detection"].to_numpy()[live] > 0.5).mean())  # the 2nd target
        seconds = time.perf_counter() - start
        figures[name] = summary
        print(f"{name:<16} {summary.mean_detection:>9.3f} {100 * summary.above_chance:>12.0f}% "
              f"{100 * above_half:>10.0f}% {summary.mean_fuzzing:>8.3f} {seconds:>8.1f}")  # fmt: skip
    gain = figures["context labels"].mean_detection - 0.25
    base = figures["fires-on only"].mean_detection - 0.25
    print(f"detection above chance: context labels / fires-on only = {gain / base:.2f}x" if base > 0 else "")
    print(f"labelling {len(live):,} features: {label_seconds:.1f} s")
    _llm_judge_cost(features.assign(label=labels), examples, len(live))
    _cluster_names(bundle.clusters, "this bundle")
    _synthetic_cluster_names()
    return 0


def _cluster_names(clusters, what: str) -> None:
    """Placeholder names ("cluster 12") and names shared within a level."""
    placeholders = int(clusters["name"].str.fullmatch(r"cluster \d+").sum())
    shared = int(sum(level["name"].str.lower().duplicated().sum() for _, level in clusters.groupby("level")))
    sizes = "/".join(str(n) for n in clusters.groupby("level").size())
    print(
        f"cluster names, {what} ({sizes} per level): {placeholders} placeholders, {shared} shared within a level"
    )


def _synthetic_cluster_names(n: int = 65_536) -> None:
    """65,536 synthetic labels in 3 nested levels (12 / 72 / 432 regions), a fifth of them of
    function words only and some empty, named by ``name_levels`` as the build does."""
    import pandas as pd

    from build_map.labels.cluster_names import name_levels

    rng = np.random.default_rng(0)
    words = np.array([f"topic{i}" for i in range(3000)] + ["the", "of", "and", "you", "'s", "↵"] * 50)
    fine = rng.integers(0, 432, n)
    levels = [fine // 36, fine // 6, fine]
    labels = [
        None if rng.random() < 0.02 else " / ".join(f"'{w}'" for w in rng.choice(words, rng.integers(1, 4)))
        for _ in range(n)
    ]
    parents = [{int(c): -1 for c in np.unique(levels[0])}, {int(c): int(c) // 6 for c in np.unique(levels[1])},
               {int(c): int(c) // 6 for c in np.unique(levels[2])}]  # fmt: skip
    start = time.perf_counter()
    names = name_levels(labels, levels, parents)
    seconds = time.perf_counter() - start
    rows = [
        {"level": lv, "cluster": c, "name": name}
        for lv, level in enumerate(names)
        for c, name in level.items()
    ]
    _cluster_names(pd.DataFrame(rows), f"synthetic {n:,} features, named in {seconds:.1f} s")


class _CountingChat:
    """Stands in for an LLM judge: counts the prompts and their characters, answers nothing (so
    every option ties)."""

    name = "counter"

    def __init__(self) -> None:
        self.prompts, self.chars = 0, 0

    def complete(self, prompts, max_tokens):
        self.prompts += len(prompts)
        self.chars += sum(len(m["content"]) for p in prompts for m in p)
        return [""] * len(prompts)


def _llm_judge_cost(features, examples, n_live: int, sample: int = 200) -> None:
    """Prompts and tokens an LLM judge needs per feature (on a sample), and the projection for
    65,536 features; tokens are estimated at 4 characters each (no tokenizer loaded)."""
    from build_map.labels.llm import LLMJudge

    chat = _CountingChat()
    chosen = features[~features["dead"]].sample(min(sample, n_live), random_state=0)
    _, summary = score_labels(chosen, examples[examples["feature"].isin(set(chosen["feature"]))
                                               | examples["feature"].isin(_neighbours(chosen))], LLMJudge(chat))  # fmt: skip
    per_feature = chat.prompts / max(summary.n_scored, 1)
    tokens = chat.chars / 4 / max(summary.n_scored, 1)
    total = tokens * 65_536
    print(f"LLM judge: {per_feature:.0f} prompts and ~{tokens:,.0f} prompt tokens per feature (+1-4 answer tokens "
          f"each); 65,536 features: ~{total / 1e6:,.0f}M prompt tokens, {per_feature * 65_536 / 1e6:.1f}M requests")  # fmt: skip


def _neighbours(features) -> set[int]:
    return {int(n) for row in features["neighbors"] for n in (row if row is not None else [])}


if __name__ == "__main__":
    sys.exit(main())
