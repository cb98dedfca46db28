"""Does one click steer? The output probe's calibrated strength against the real outcome.

On a probed bundle (default: the cached demo bundle), for seeded random live features and for the
features with the highest steerability, one greedy reply per bench prompt is written at the
feature's click strength (``steer_strength``) and at strength 0. Per feature, over the prompts:

* ``changed``: share of prompts whose reply differs from the unsteered one;
* ``effect rise``: the sweep's effect (the feature's activation on the reply, re-read unsteered,
  × max act) at the click strength minus at 0;
* ``concept rise``: the share of reply words that are the feature's concept words (the tokens it
  fires on, plus the tokens the probe says it writes) minus that share in the unsteered reply;
  ``content rise`` is the same without function words ("the", "i", "you"), a stricter count;
* ``coherence drop``: mean log-probability per reply token under the unsteered model, unsteered
  minus steered (nats/token).

A feature *steers visibly* when its replies changed (on at least half the prompts) and its effect
rose by at least 0.05 or its concept share by at least 5 points. Targets: at least 50% of 32
random live features, at least 80% of the 32 most steerable ones, a median coherence drop of at
most 0.6 nats/token. The rank correlation (Spearman) between ``steerability`` and both outcome
measures is printed for at least 48 random features. ``--scope prompt`` steers the prompt as well,
to compare the two scopes. ``--multipliers`` scales every click strength (used to set the
probe's ``clear_kl`` on the *dev* prompts and features, never on the bench's).

The bench prompts and the feature seed differ from the probe's prompts (``PROBE_PROMPTS``) and
from the sweep's defaults; ``--dev`` uses the sweep's defaults and another seed instead.

    python bench/bench_steer_probe.py [BUNDLE] [--random 48] [--top 32] [--tokens 40] [--dev]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.steering.requests import Edit, SamplingConfig, SteeringScope  # noqa: E402
from build_map.steering.session import open_bundle  # noqa: E402
from build_map.steering.sweep import DEFAULT_PROMPTS, generate_rows, reread  # noqa: E402
from explorer.ui.chat import DEFAULT_PRESENCE_PENALTY  # noqa: E402

BENCH_PROMPTS = (
    "Tell me about your weekend.",
    "What is a good way to relax after work?",
    "Can you recommend something to read?",
    "What did you have for breakfast?",
)
BENCH_SEED, DEV_SEED = 2026, 7
_LOOP = re.compile(r"(.{3,20}?)\1\1", re.DOTALL)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# Function words: a concept word that is one of these ("i", "the", "you") says nothing about the
# feature, so the stricter count (``content rise``) leaves them out.
_FUNCTION_TEXT = (
    "a an the i me my we our you your he she it its they them their this that these those is am are was "
    "were be been being have has had do does did will would can could should may might must shall to of "
    "in on at by for with from as and or but not no so if then than there here what which who how when "
    "where why all any some just very too also about up out into over i'm it's don't"
)
FUNCTION_WORDS = set(_FUNCTION_TEXT.split(" "))


def words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def concept_words(row: pd.Series) -> set[str]:
    tokens = list(row["top_tokens"]) + list(row["output_promotes"])
    return {w for t in tokens for w in words(str(t)) if len(w) >= 2}


def concept_share(text: str, concepts: set[str], content_only: bool = False) -> float:
    found = words(text)
    if content_only:
        concepts = concepts - FUNCTION_WORDS
    return sum(w in concepts for w in found) / len(found) if found else 0.0


def pick_features(
    features: pd.DataFrame, n_random: int, n_top: int, seed: int
) -> tuple[list[int], list[int]]:
    probed = features.index[features["steer_strength"].notna()].to_numpy()
    if len(probed) == 0:
        raise SystemExit("This bundle was built without the output probe; rebuild it with build-map build.")
    rng = np.random.default_rng(seed)
    random_ids = rng.choice(probed, size=min(n_random, len(probed)), replace=False).tolist()
    top_ids = features.loc[probed, "steerability"].sort_values(ascending=False).index[:n_top].tolist()
    return [int(i) for i in random_ids], [int(i) for i in top_ids]


def loops(text: str) -> bool:
    """Whether a reply is stuck in a loop: some piece of 3-20 characters three times in a row
    ("to-to-to-", "FFFFFFFFF", "food and food and food and")."""
    return _LOOP.search(text) is not None


def measure(session, features: pd.DataFrame, ids: list[int], prompts, tokens: int, factor: float,
            scope: SteeringScope, batch_rows: int, presence_penalty: float = 0.0) -> pd.DataFrame:  # fmt: skip
    """One row per feature: changed, effect rise, concept rise, coherence drop at factor × click strength."""
    engine = session.engine
    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    strengths = {f: float(features.at[f, "steer_strength"]) * factor for f in ids}
    bound = engine.limits.max_abs_strength
    rows = [(None, p) for p in range(len(prompts))] + [(f, p) for f in ids for p in range(len(prompts))]
    edits = [[] if f is None else [Edit(f, min(strengths[f], bound))] for f, _ in rows]
    torch.manual_seed(0)
    replies, _ = generate_rows(
        engine, [prompt_ids[p] for _, p in rows], edits, tokens, batch_rows, scope=scope,
        presence_penalty=presence_penalty,
    )  # fmt: skip
    unique = sorted(set(ids))
    effects, coherence = reread(engine, [prompt_ids[p] for _, p in rows], replies, unique)
    column = {f: i for i, f in enumerate(unique)}
    texts = [engine.decode(r) for r in replies]
    base = {p: i for i, (f, p) in enumerate(rows) if f is None}
    out = []
    for f in ids:
        concepts = concept_words(features.loc[f])
        per_prompt = []
        for p in range(len(prompts)):
            i, b = rows.index((f, p)), base[p]
            per_prompt.append(
                (
                    replies[i] != replies[b],
                    effects[i][column[f]] - effects[b][column[f]],
                    concept_share(texts[i], concepts) - concept_share(texts[b], concepts),
                    concept_share(texts[i], concepts, True) - concept_share(texts[b], concepts, True),
                    coherence[b] - coherence[i],
                    loops(texts[i]),
                )
            )
        changed, effect, concept, content, drop, looped = (
            float(np.nanmean(v)) for v in zip(*per_prompt, strict=True)
        )
        out.append({"feature": f, "strength": strengths[f], "steerability": float(features.at[f, "steerability"]),
                    "changed": changed, "effect_rise": effect, "concept_rise": concept, "content_rise": content,
                    "coherence_drop": drop, "looped": looped,
                    "example": texts[rows.index((f, 0))][:90]})  # fmt: skip
    frame = pd.DataFrame(out)
    frame["visible"] = (frame["changed"] >= 0.5) & (
        (frame["effect_rise"] >= 0.05) | (frame["concept_rise"] >= 0.05)
    )
    return frame


def sampled_reference(session, prompts, tokens: int, seeds: int = 4, temperature: float = 0.7) -> float:
    """Median coherence "drop" of *unsteered* replies sampled at ``temperature`` (the chat's default)
    against the greedy ones: what any fluent reply that differs from the greedy one costs under the
    same measure, the floor a steered reply is compared with."""
    engine = session.engine
    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    greedy, _ = generate_rows(engine, prompt_ids, [[] for _ in prompt_ids], tokens)
    sampled = [
        engine.encode(
            session.generate(p, [], SamplingConfig(temperature=temperature, max_new_tokens=tokens, seed=s))
        )
        for s in range(seeds)
        for p in prompts
    ]
    rows = prompt_ids * seeds
    # reread measures features' effects too; one placeholder feature, only the coherence is used
    _, base = reread(engine, prompt_ids, greedy, [0])
    _, other = reread(engine, rows, sampled, [0])
    return float(np.nanmedian([base[i % len(prompts)] - c for i, c in enumerate(other)]))


def report(name: str, frame: pd.DataFrame) -> None:
    print(
        f"{name}: {len(frame)} features; steer visibly {100 * frame['visible'].mean():.0f}% "
        f"(reply changed {100 * (frame['changed'] >= 0.5).mean():.0f}%, effect rise ≥ 0.05 "
        f"{100 * (frame['effect_rise'] >= 0.05).mean():.0f}%, concept share rise ≥ 5 pts "
        f"{100 * (frame['concept_rise'] >= 0.05).mean():.0f}%; content words only "
        f"{100 * (frame['content_rise'] >= 0.05).mean():.0f}%); median coherence drop "
        f"{frame['coherence_drop'].median():.2f} nats/token; replies in a loop {100 * frame['looped'].mean():.0f}%; "
        f"median click strength {frame['strength'].median():.2f}"
    )


def spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "bundle", nargs="?", default=None, help="a probed bundle (default: the cached demo bundle)"
    )
    parser.add_argument(
        "--random", type=int, default=48, help="random live features (the first 32 are the target set)"
    )
    parser.add_argument("--top", type=int, default=32, help="features with the highest steerability")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--scope", choices=("reply", "prompt"), default="reply")
    parser.add_argument("--multipliers", default="1", help="comma-separated factors on every click strength")
    parser.add_argument("--dev", action="store_true", help="tuning set: the sweep's prompts and another seed")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="the replies' presence penalty (default: the chat's)")  # fmt: skip
    parser.add_argument("--batch-rows", type=int, default=64)
    parser.add_argument("--show", type=int, default=6, help="example replies printed")
    parser.add_argument("--dump", default=None, help="write every feature's measures to this Parquet file")
    args = parser.parse_args()
    if args.bundle is None:
        from build_map.pipeline.demo import demo_bundle

        args.bundle = str(demo_bundle()[0])
    session = open_bundle(args.bundle)
    features = session.bundle.features
    prompts = DEFAULT_PROMPTS if args.dev else BENCH_PROMPTS
    random_ids, top_ids = pick_features(features, args.random, args.top, DEV_SEED if args.dev else BENCH_SEED)
    probe = session.bundle.manifest.get("probe") or {}
    print(f"bundle {args.bundle}; {'dev' if args.dev else 'bench'} prompts; scope {args.scope}; "
          f"probe: {probe.get('n_probed')} features in {probe.get('seconds')} s "
          f"({probe.get('positions_per_second')} positions/s)")  # fmt: skip
    scope = SteeringScope(prompt=args.scope == "prompt")
    reference = sampled_reference(session, prompts, args.tokens)
    print(f"reference: unsteered replies sampled at temperature 0.7 (4 seeds) cost {reference:.2f} nats/token "
          "against the greedy ones")  # fmt: skip
    penalty = DEFAULT_PRESENCE_PENALTY if args.presence_penalty is None else args.presence_penalty
    print(f"presence penalty {penalty:g} (steered and unsteered replies alike)")
    dumped = []
    for factor in (float(x) for x in args.multipliers.split(",")):
        started = time.perf_counter()
        ids = list(dict.fromkeys(random_ids + top_ids))
        frame = measure(
            session, features, ids, prompts, args.tokens, factor, scope, args.batch_rows, penalty
        ).set_index("feature")
        dumped.append(frame.assign(factor=factor, random=frame.index.isin(random_ids)))
        print(f"\n× {factor:g} the click strength ({time.perf_counter() - started:.0f} s)")
        report("32 random live", frame.loc[random_ids[:32]])
        report(f"{len(top_ids)} most steerable", frame.loc[top_ids])
        sample = frame.loc[random_ids]
        print(f"rank correlation over {len(sample)} random features: steerability vs effect rise "
              f"{spearman(sample['steerability'], sample['effect_rise']):.2f}, vs concept rise "
              f"{spearman(sample['steerability'], sample['concept_rise']):.2f}, vs visible "
              f"{spearman(sample['steerability'], sample['visible'].astype(float)):.2f}")  # fmt: skip
        for f in random_ids[: args.show]:
            row = frame.loc[f]
            print(f"  #{f} {features.at[f, 'label']!r} ×{row['strength']:.2f} steer {row['steerability']:.2f} "
                  f"writes {list(features.at[f, 'output_promotes'])[:5]}: {row['example']!r}")  # fmt: skip
    if args.dump:
        pd.concat(dumped).reset_index().to_parquet(args.dump, index=False)


if __name__ == "__main__":
    main()
