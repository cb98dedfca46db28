"""Do the labels say what a feature means? Detection and fuzzing on held-out examples.

On a bundle (default: the cached demo bundle), the offline labeller runs on the examples a
labeller may see (``labelling_examples``) and the judge scores on the held-out ones, for:

* ``context labels`` — the default (``build_map.labels.contexts``): the words it fires on, the
  words its contexts share (contrasted with the corpus and its decoder neighbours), what it writes;
* ``fires-on only`` — the baseline in the same run: the words it fires on, nothing else (what the
  labels were before the context labeller);
* ``shuffled`` — the context labels handed to random other features: a control that must score
  chance (detection 0.25, fuzzing 0.5) or the judge rewards something besides evidence.

Printed per variant: mean detection (chance 0.25), the share of features above chance, mean
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
    print(f"{'variant':<16} {'detection':>9} {'above chance':>13} {'fuzzing':>8} {'seconds':>8}")
    figures = {}
    for name, variant in (("context labels", labels), ("fires-on only", baseline), ("shuffled", shuffled)):
        start = time.perf_counter()
        _, summary = score_labels(features.assign(label=variant), examples, judge)
        seconds = time.perf_counter() - start
        figures[name] = summary
        print(f"{name:<16} {summary.mean_detection:>9.3f} {100 * summary.above_chance:>12.0f}% "
              f"{summary.mean_fuzzing:>8.3f} {seconds:>8.1f}")  # fmt: skip
    gain = figures["context labels"].mean_detection - 0.25
    base = figures["fires-on only"].mean_detection - 0.25
    print(f"detection above chance: context labels / fires-on only = {gain / base:.2f}x" if base > 0 else "")
    print(f"labelling {len(live):,} features: {label_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
