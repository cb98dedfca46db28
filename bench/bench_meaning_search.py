"""Does "search by meaning" find the feature a text is about? Specificity against raw activation.

For seeded random live features of a bundle (default: the cached demo bundle), one of each
feature's *quantile* examples (its ordinary firings, not its top ones) is turned back into text and
read exactly as the search box reads it (``TextFeatures.read_text``: a user message). Where does the
feature itself rank among all features? Two rankings of the same activations:

* ``specific`` (shipped, ``TextFeatures.specificity``): mean activation / the feature's usual level
  (density × mean act);
* ``activation / max`` (the reply ranking before): activation / max activation, where features
  that fire on nearly every token lead every list.

Printed per ranking: median rank, share in the top 8 / top 30 (what the explorer lists), mean
reciprocal rank, and the ratio of the two medians.

    python bench/bench_meaning_search.py [BUNDLE] [--features 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.steering.session import open_bundle  # noqa: E402
from build_map.steering.text_features import TextFeatures  # noqa: E402


def _rank(score: torch.Tensor, feature: int) -> int:
    return int((score > score[feature]).sum()) + 1 if score[feature] > 0 else len(score)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", nargs="?", default=None)
    parser.add_argument("--features", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.bundle is None:
        from build_map.pipeline.demo import demo_bundle

        args.bundle = demo_bundle()[0]
    with open_bundle(args.bundle) as session:
        bundle = session.bundle
        reader = TextFeatures(session.engine, bundle)
        max_act = torch.as_tensor(bundle.features["max_act"].to_numpy(float)).clamp_min(1e-6)
        excluded = reader.levels <= 0
        examples = bundle.examples[bundle.examples["bucket"] != "top"]
        rng = np.random.default_rng(args.seed)
        live = np.flatnonzero(~excluded.numpy())
        ranks: dict[str, list[int]] = {"specific (shipped)": [], "activation / max (before)": []}
        start = time.perf_counter()
        for feature in rng.choice(live, min(args.features, len(live)), replace=False):
            rows = examples[examples["feature"] == feature]
            if rows.empty:
                continue
            text = "".join(rows.iloc[int(rng.integers(len(rows)))]["tokens"])
            mean, _ = reader.read_text(text)
            if mean is None:
                continue
            specific = reader.specificity(mean)
            raw = torch.where(excluded, torch.zeros(()), mean / max_act)
            ranks["specific (shipped)"].append(_rank(specific, int(feature)))
            ranks["activation / max (before)"].append(_rank(raw, int(feature)))
        seconds = time.perf_counter() - start
    print(
        f"{len(ranks['specific (shipped)'])} features of {bundle.path.name}, {len(live)} live; {seconds:.0f} s"
    )
    medians = {}
    for name, values in ranks.items():
        r = np.asarray(values)
        medians[name] = float(np.median(r))
        print(
            f"  {name:28s} median rank {np.median(r):6.0f}  top 8 {np.mean(r <= 8):5.1%}  "
            f"top 30 {np.mean(r <= 30):5.1%}  MRR {np.mean(1 / r):.3f}"
        )
    shipped, before = medians.values()
    print(f"  median rank, before / shipped: {before / max(shipped, 1):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
