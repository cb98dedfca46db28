"""How well a label describes its feature, scored on examples the labeller never saw.

*Detection* (as in Goodfire's Llama-3 SAE write-up): the judge gets the label and four snippets,
one a held-out example of the feature, three examples of three of its nearest decoder neighbours
(each with its focus word marked), and picks the one the label describes; ``n_draws`` draws with
different snippets, accuracy from 0 to 1, chance ``1 / (1 + n_distractors)``. Neighbours make it
hard: a label must say what sets the feature apart from features that point the same way.

*Fuzzing* (as in EleutherAI's delphi): the judge gets one held-out example twice, once with the
words the feature fires on marked and once with as many other words marked, and picks the marking
the label describes; accuracy from 0 to 1, chance 0.5.

A tie among the judge's top options counts as a share of a pick (1 / number tied), so a judge that
cannot tell scores chance on average, exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from build_map.features.config import TOP_BUCKET
from build_map.labels.judges import Judge, Option
from build_map.labels.snippets import Snippet, snippet

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("detection", "fuzzing")


@dataclass(frozen=True)
class ScoreConfig:
    n_draws: int = 10
    """Draws per feature and score, each with other snippets."""
    n_distractors: int = 3
    """Neighbours' examples beside the true one in each detection draw (chance = 1 / (1 + this))."""
    n_neighbors: int = 10
    """Nearest decoder neighbours the distractors are drawn from."""
    active_share: float = 0.5
    """Fuzzing marks the words whose activation reaches this share of the example's peak."""
    seed: int = 0
    """Seed of the draws (each feature draws from its own stream: seed and feature id)."""

    def __post_init__(self) -> None:
        if self.n_draws < 1 or self.n_distractors < 1 or self.n_neighbors < self.n_distractors:
            raise ValueError(
                "ScoreConfig: n_draws and n_distractors must be >= 1 and n_neighbors >= n_distractors."
            )

    @property
    def detection_chance(self) -> float:
        return 1.0 / (1 + self.n_distractors)


def held_out(examples: pd.DataFrame) -> np.ndarray:
    """Which example rows are kept from labellers for scoring: every second one of a feature's
    quantile examples (in bucket and rank order: 1 of 3 per bucket by default), so the labeller
    still sees examples across the distribution. A feature with fewer than two quantile examples
    gives up every second top example instead."""
    quantile = (examples["bucket"] != TOP_BUCKET).to_numpy()
    frame = pd.DataFrame(
        {"feature": examples["feature"].to_numpy(), "quantile": quantile,
         "bucket": examples["bucket"].to_numpy(), "rank": examples["rank"].to_numpy()}
    )  # fmt: skip
    ordered = frame.sort_values(["feature", "quantile", "bucket", "rank"], kind="stable")
    nth = ordered.groupby(["feature", "quantile"]).cumcount().reindex(frame.index).to_numpy()
    n_quantile = frame.groupby("feature")["quantile"].transform("sum").to_numpy()
    use = np.where(n_quantile >= 2, quantile, ~quantile)
    return use & (nth % 2 == 1)


def labelling_examples(examples: pd.DataFrame) -> pd.DataFrame:
    """The examples a labeller may see (every row not ``held_out``)."""
    return examples[~held_out(examples)]


@dataclass
class ScoreSummary:
    judge: str
    n_scored: int
    mean_detection: float
    mean_fuzzing: float
    above_chance: float
    """Share of scored features whose detection beats chance."""
    chance: float

    def line(self) -> str:
        if not self.n_scored:
            return f"label scores ({self.judge}): no feature had held-out examples to score"
        return (
            f"label scores ({self.judge}, {self.n_scored:,} features): detection {self.mean_detection:.2f} "
            f"(chance {self.chance:.2f}), {100 * self.above_chance:.0f}% above chance; "
            f"fuzzing {self.mean_fuzzing:.2f} (chance 0.50)"
        )

    def manifest(self) -> dict:
        return {
            "judge": self.judge,
            "n_scored": self.n_scored,
            "mean_detection": self.mean_detection,
            "mean_fuzzing": self.mean_fuzzing,
            "above_chance": self.above_chance,
            "chance": self.chance,
        }


def score_labels(
    features: pd.DataFrame, examples: pd.DataFrame, judge: Judge, cfg: ScoreConfig | None = None
) -> tuple[pd.DataFrame, ScoreSummary]:
    """``detection``, ``fuzzing`` (NaN where a feature cannot be scored: dead, hidden, no held-out
    example, too few neighbours with examples) and ``label_judge`` for every row of ``features``."""
    cfg = cfg or ScoreConfig()
    snippets = _snippets(examples)
    scoring = features[~features["dead"].astype(bool) & ~features["hidden"].astype(bool)]
    detection = np.full(len(features), np.nan)
    fuzzing = np.full(len(features), np.nan)
    position = {int(f): i for i, f in enumerate(features["feature"])}
    desc = f"label scores ({judge.name})"
    rows = scoring[["feature", "label", "neighbors"]].itertuples(index=False)
    for feature, label, neighbors in tqdm(rows, total=len(scoring), desc=desc, unit="feature",
                                          disable=len(scoring) < 200):  # fmt: skip
        own = snippets.get(int(feature))
        if own is None or not own[1]:
            continue
        rng = np.random.default_rng([cfg.seed, int(feature)])
        others = [snippets[n][0] + snippets[n][1] for n in _usable(neighbors, snippets, cfg)]
        if len(others) >= cfg.n_distractors:
            detection[position[int(feature)]] = _detection(judge, str(label), own[1], others, cfg, rng)
        fuzzing[position[int(feature)]] = _fuzzing(judge, str(label), own[1], cfg, rng)
    out = features.copy()
    out["detection"], out["fuzzing"] = detection.astype(np.float32), fuzzing.astype(np.float32)
    out["label_judge"] = judge.name
    return out, _summary(judge.name, detection, fuzzing, cfg)


def _snippets(examples: pd.DataFrame) -> dict[int, tuple[list[Snippet], list[Snippet]]]:
    """feature → (snippets a labeller saw, held-out snippets)."""
    out: dict[int, tuple[list[Snippet], list[Snippet]]] = {}
    hidden = held_out(examples)
    columns = zip(
        examples["feature"], examples["tokens"], examples["acts"], examples["act"], hidden, strict=True
    )
    for feature, tokens, acts, act, is_held in columns:
        if len(tokens) == 0:
            continue
        seen, held = out.setdefault(int(feature), ([], []))
        (held if is_held else seen).append(snippet(tokens, acts, act))
    return out


def _usable(neighbors, snippets: dict, cfg: ScoreConfig) -> list[int]:
    listed = [int(n) for n in (neighbors if neighbors is not None else [])][: cfg.n_neighbors]
    return [n for n in listed if n in snippets and (snippets[n][0] or snippets[n][1])]


def _pick_share(ratings: np.ndarray, truth: int) -> float:
    """1 / (number of options tied at the top) if ``truth`` is among them, else 0."""
    best = np.flatnonzero(ratings >= ratings.max())
    return 1.0 / len(best) if truth in best else 0.0


def _detection(judge: Judge, label: str, held: list[Snippet], others: list[list[Snippet]],
               cfg: ScoreConfig, rng: np.random.Generator) -> float:  # fmt: skip
    hits = 0.0
    for _ in range(cfg.n_draws):
        true = held[rng.integers(len(held))]
        chosen = rng.choice(len(others), size=cfg.n_distractors, replace=False)
        distractors = [others[i][rng.integers(len(others[i]))] for i in chosen]
        options = [true, *distractors]
        order = rng.permutation(len(options))  # where the true one sits must not matter to a judge
        shown: list[Option] = [(options[i], (options[i].focus,)) for i in order]
        hits += _pick_share(judge.rate(label, shown), int(np.flatnonzero(order == 0)[0]))
    return hits / cfg.n_draws


def _fuzzing(
    judge: Judge, label: str, held: list[Snippet], cfg: ScoreConfig, rng: np.random.Generator
) -> float:
    hits, tried = 0.0, 0
    for _ in range(cfg.n_draws):
        snip = held[rng.integers(len(held))]
        active = snip.active(cfg.active_share)
        quiet = [i for i in range(len(snip.words)) if i not in active and snip.words[i].strip()]
        if len(quiet) < len(active):
            continue
        decoy = tuple(sorted(rng.choice(quiet, size=len(active), replace=False).tolist()))
        options: list[Option] = [(snip, active), (snip, decoy)]
        flip = bool(rng.integers(2))
        shown = options[::-1] if flip else options
        hits += _pick_share(judge.rate(label, shown), 1 if flip else 0)
        tried += 1
    return hits / tried if tried else float("nan")


def _summary(judge: str, detection: np.ndarray, fuzzing: np.ndarray, cfg: ScoreConfig) -> ScoreSummary:
    scored = np.isfinite(detection)
    chance = cfg.detection_chance
    return ScoreSummary(
        judge=judge,
        n_scored=int(scored.sum()),
        mean_detection=float(np.nanmean(detection)) if scored.any() else float("nan"),
        mean_fuzzing=float(np.nanmean(fuzzing)) if np.isfinite(fuzzing).any() else float("nan"),
        above_chance=float((detection[scored] > chance + 1e-9).mean()) if scored.any() else 0.0,
        chance=chance,
    )
