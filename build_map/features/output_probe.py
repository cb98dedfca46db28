"""The output-effect probe: what each feature does to the model's next token when it is steered.

Per probed feature, a few strengths (``build_map.features.probe_config`` says which and how one
is chosen) are each added at the hookpoint of every probe context. Only the layers after the
hookpoint run (``build_map.lm.continuation``). Each strength gives:

* ``KL``, the mean KL(steered ‖ unsteered) of the next-token distribution at the probed positions;
* the mean gain in probability of every token: the ``n_tokens`` largest gains are
  ``output_promotes``, and what the largest ``n_tokens`` gains of word tokens add up to is
  ``steerability`` (0 to 1, the share of next-token probability the click moves onto the
  feature's own words);
* the mean change of every token's centred log-probability: the most negative are
  ``output_suppresses`` (a probability drop would list whatever the unsteered model was about to
  say, the same for every feature).

Steerability is read at the chosen ``steer_strength``, so it compares features at one coherence
budget (the same KL). A feature that mostly disturbs the text scores low; a feature that writes
its own words scores high.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from build_map.bundle.schema import PROBE_SCHEMA, add_probe_defaults
from build_map.features.logit_lens import unlisted_ids
from build_map.features.probe_config import CLEAR_STEERABILITY, STRENGTH_GRID, ProbeConfig, ProbeError
from build_map.lm.continuation import ContextState, Continuation
from build_map.lm.hookpoints import input_device
from build_map.lm.models import LoadedModel
from build_map.lm.tokens import MARKERS, TokenText, chat_prompt_ids, eos_token_ids, pad_token_id
from build_map.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)

PROBE_COLUMNS = tuple(PROBE_SCHEMA.names)
_FULL_STEPS = 2  # search steps every feature takes; later ones only where no clear strength was found
_CANDIDATES = 48  # tokens kept per feature and step before cleaning, deduplicating and word-first ranking
_WORD_SHARE = 0.1  # a whole word is listed first when it scores at least this share of the best token


@dataclass
class ProbeResult:
    frame: pd.DataFrame
    """One row per SAE feature: ``feature`` and PROBE_COLUMNS (NaN / empty where not probed)."""
    n_probed: int
    positions: int
    """Steered next-token distributions computed (features × strengths × contexts × positions)."""
    seconds: float
    shortcut: bool
    """Whether only the layers after the hookpoint ran (False: the whole model, see continuation)."""

    @property
    def positions_per_second(self) -> float:
        return self.positions / self.seconds if self.seconds else math.nan


@dataclass
class _Step:
    """What one tested strength per feature measured, for the features of the probe."""

    strength: np.ndarray  # (F,) grid index
    kl: np.ndarray  # (F,)
    promote_ids: np.ndarray  # (F, _CANDIDATES)
    promote_score: np.ndarray
    suppress_ids: np.ndarray
    suppress_score: np.ndarray


def probe_features(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hookpoint: str,
    max_act: Sequence[float],
    features: Sequence[int],
    cfg: ProbeConfig | None = None,
) -> ProbeResult:
    """Probe ``features`` (ids; normally the live, visible ones); strengths are in units of
    ``max_act`` (the bundle's column), as everywhere in steering."""
    cfg = cfg or ProbeConfig()
    started = time.perf_counter()
    ids = np.asarray(list(features), dtype=np.int64)
    scale = torch.as_tensor(np.asarray(max_act, dtype=np.float32))
    if len(ids) and not bool(torch.isfinite(scale[ids]).all() and (scale[ids] > 0).all()):
        raise ProbeError("every probed feature needs a positive max activation; probe live features only.")
    continuation = Continuation(loaded.model, hookpoint)
    states = [continuation.context(prefix, new) for prefix, new in _contexts(loaded, cfg)]
    text = TokenText(loaded.tokenizer)
    vocab = int(states[0].logits.shape[-1])
    excluded = torch.tensor(
        sorted(set(unlisted_ids(loaded.tokenizer, vocab)) | _special_ids(loaded.tokenizer, vocab))
    )
    measure = _Measure(continuation, states, sae, scale, excluded, cfg)
    steps: list[_Step] = []
    index = np.full(len(ids), STRENGTH_GRID.index(cfg.start_strength))
    measured = 0
    for step in range(cfg.search_steps if len(ids) else 0):
        todo = np.ones(len(ids), bool) if step < _FULL_STEPS else ~_resolved(steps, cfg)
        if not todo.any():
            break
        steps.append(measure.step(ids, index, todo, steps[-1] if steps else None))
        measured += int(todo.sum())
        index = _next_index(steps, cfg)
    frame = _empty_frame(sae.d_sae)
    if steps:
        _fill(frame, ids, steps, text, cfg)
    positions = measured * sum(int(s.new_ids.shape[1]) for s in states)
    result = ProbeResult(frame, len(ids), positions, time.perf_counter() - started, continuation.shortcut)
    logger.info(
        "Output probe: %d features × %d strengths in %.1f s (%.0f positions/s, %s)", len(ids), len(steps),
        result.seconds, result.positions_per_second, "layers after the hookpoint" if result.shortcut else "whole model",
    )  # fmt: skip
    return result


def _contexts(loaded: LoadedModel, cfg: ProbeConfig) -> list[tuple[list[int], list[int]]]:
    """(prefix, probed ids) pairs: per prompt and per offset j in ``cfg.positions``, the position
    that writes reply token j + 1 of the unsteered greedy reply (j = 0: the last prompt token),
    with everything before it as the prefix."""
    tokenizer, model = loaded.tokenizer, loaded.model
    contexts = []
    depth = max(cfg.positions)
    for prompt in cfg.prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = list(tokenizer(prompt)["input_ids"])
        if len(ids) < 2:
            raise ProbeError(f"the probe prompt {prompt!r} is a single token; give longer probe prompts.")
        reply: list[int] = []
        if depth:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=torch.tensor([ids], device=input_device(model)), do_sample=False,
                    max_new_tokens=depth, min_new_tokens=depth,
                    pad_token_id=pad_token_id(tokenizer, eos_token_ids(model, tokenizer)),
                )  # fmt: skip
            reply = out[0, len(ids) :].tolist()
        text = ids + reply
        contexts += [(text[: len(ids) - 1 + j], [text[len(ids) - 1 + j]]) for j in cfg.positions]
    return contexts


class _Measure:
    """One search step: every probed feature at its own strength, over every context."""

    def __init__(self, continuation: Continuation, states: list[ContextState], sae: SparseAutoencoder,
                 scale: torch.Tensor, excluded: torch.Tensor, cfg: ProbeConfig):  # fmt: skip
        self.continuation, self.states, self.sae, self.cfg = continuation, states, sae, cfg
        self.scale, self.excluded = scale, excluded
        self.base = [state.logits.log_softmax(-1) for state in states]  # (L, V) each
        self.base_probs = [base.exp().mean(0) for base in self.base]  # (V,) each

    def step(self, ids: np.ndarray, index: np.ndarray, todo: np.ndarray, previous: _Step | None) -> _Step:
        """Measure the features where ``todo`` at their ``index``; the others keep ``previous``."""
        rows = np.flatnonzero(todo)
        batch = self.cfg.batch_rows
        starts = range(0, len(rows), batch)
        bar = tqdm(starts, desc="Output probe", unit="batch", disable=len(starts) < 4)
        parts = [self._batch(ids[rows[i : i + batch]], index[rows[i : i + batch]]) for i in bar]
        measured = [np.concatenate(column) for column in zip(*parts, strict=True)]
        if previous is None:
            return _Step(index.copy(), *measured)
        step = copy.deepcopy(previous)
        step.strength[rows] = index[rows]
        for name, values in zip(("kl", "promote_ids", "promote_score", "suppress_ids", "suppress_score"),
                                measured, strict=True):  # fmt: skip
            getattr(step, name)[rows] = values
        return step

    def _batch(self, ids: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
        strengths = torch.tensor([STRENGTH_GRID[i] for i in index], dtype=torch.float32)
        amounts = strengths * self.scale[torch.as_tensor(ids)]
        directions = self.sae.W_dec.detach()[torch.as_tensor(ids, device=self.sae.W_dec.device)].float()
        kl = probs_mean = change_mean = None
        for state, base, base_probs in zip(self.states, self.base, self.base_probs, strict=True):
            device = state.residual.device
            push = (amounts.to(device)[:, None] * directions.to(device))[:, None, :]  # (B, 1, d)
            logprobs = self.continuation.logits(state, state.residual.float()[None] + push).log_softmax(-1)
            change = logprobs - base.to(logprobs.device)  # (B, L, V)
            probs = logprobs.exp_()  # in place: the log-probabilities are not needed any more
            row_kl = (probs * change).sum(-1).mean(-1)  # (B,)
            # Means over positions first: the (B, V) rest is cheap next to the (B, L, V) tensors.
            row_probs = probs.mean(1) - base_probs.to(probs.device)
            row_change = change.mean(1)
            kl = row_kl if kl is None else kl + row_kl
            probs_mean = row_probs if probs_mean is None else probs_mean + row_probs
            change_mean = row_change if change_mean is None else change_mean + row_change
            del logprobs, probs, change
        n = len(self.states)
        kl, gained = kl / n, probs_mean / n
        shifted = change_mean / n
        shifted -= shifted.mean(-1, keepdim=True)  # a log-probability shift common to all tokens is no effect
        gained[:, self.excluded] = -math.inf
        shifted[:, self.excluded] = math.inf
        top = gained.topk(_CANDIDATES, dim=1)
        bottom = shifted.topk(_CANDIDATES, dim=1, largest=False)
        return tuple(t.cpu().numpy() for t in (kl, top.indices, top.values, bottom.indices, bottom.values))


def clear_share(features: pd.DataFrame) -> float:
    """Share of the probed features (rows with a steer_strength) that steer clearly."""
    probed = features["steer_strength"].notna()
    return float((features.loc[probed, "steerability"] >= CLEAR_STEERABILITY).mean()) if probed.any() else 0.0


def _resolved(steps: list[_Step], cfg: ProbeConfig) -> np.ndarray:
    """Features with a tested strength that is clear and has not collapsed: further steps could
    only find a smaller one a √2 step away, so they are not measured again."""
    kl = np.stack([s.kl for s in steps])
    return ((kl >= cfg.clear_kl) & (kl <= cfg.collapse_kl)).any(0)


def _next_index(steps: list[_Step], cfg: ProbeConfig) -> np.ndarray:
    """The next grid index per feature: the jump the square law predicts lands on target_kl, to a
    strength not tested yet (one step further in the same direction when it was)."""
    last = steps[-1]
    ratio = cfg.target_kl / np.maximum(last.kl, 1e-6)
    # KL ∝ strength² and the grid is √2 apart, so log2 of the KL ratio is the number of grid steps.
    jump = np.clip(np.rint(np.log2(ratio)), -cfg.max_jump, cfg.max_jump).astype(int)
    jump[jump == 0] = np.where(last.kl[jump == 0] < cfg.clear_kl, 1, -1)
    top = len(STRENGTH_GRID) - 1
    proposal = np.clip(last.strength + jump, 0, top)
    tested = np.stack([s.strength for s in steps])  # (steps, F)
    for _ in range(top):
        seen = (tested == proposal[None]).any(0)
        if not seen.any():
            break
        proposal = np.where(seen, np.clip(proposal + np.sign(jump), 0, top), proposal)
    return proposal


def choose_step(strength: np.ndarray, kl: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """Per feature (columns), which tested step (rows of ``strength`` grid indices and ``kl``) gives
    ``steer_strength`` by the rule in ``probe_config``."""
    big = len(STRENGTH_GRID)
    clear = (kl >= cfg.clear_kl) & (kl <= cfg.collapse_kl)
    coherent = kl <= cfg.collapse_kl
    smallest_clear = np.where(clear, strength, big).argmin(0)
    largest_coherent = np.where(coherent, strength, -1).argmax(0)
    smallest = strength.argmin(0)
    return np.where(clear.any(0), smallest_clear, np.where(coherent.any(0), largest_coherent, smallest))


def _fill(
    frame: pd.DataFrame, ids: np.ndarray, steps: list[_Step], text: TokenText, cfg: ProbeConfig
) -> None:
    strength = np.stack([s.strength for s in steps])
    kl = np.stack([s.kl for s in steps])
    chosen = choose_step(strength, kl, cfg)
    cols = np.arange(len(ids))
    pick = lambda name: np.stack([getattr(s, name) for s in steps])[chosen, cols]  # noqa: E731
    frame.loc[ids, "steer_strength"] = np.asarray(STRENGTH_GRID, dtype=np.float32)[strength[chosen, cols]]
    frame.loc[ids, "steer_kl"] = kl[chosen, cols].astype(np.float32)
    promote_ids, promote_score = pick("promote_ids"), pick("promote_score")
    suppress_ids, suppress_score = pick("suppress_ids"), -pick("suppress_score")
    listed = np.unique(np.concatenate([promote_ids.ravel(), suppress_ids.ravel()])).tolist()
    clean = text.clean(listed)
    frame.loc[ids, "steerability"] = _word_gain(promote_ids, promote_score, clean, cfg.n_tokens)
    words = {i for i, shown in text.display(listed).items() if _is_word(shown)}
    promotes = [
        _words_first(r, s, clean, words, cfg.n_tokens)
        for r, s in zip(promote_ids, promote_score, strict=True)
    ]
    suppresses = [
        _words_first(r, s, clean, words, cfg.n_tokens)
        for r, s in zip(suppress_ids, suppress_score, strict=True)
    ]
    frame["output_promotes"] = frame["output_promotes"].astype(object)
    frame["output_suppresses"] = frame["output_suppresses"].astype(object)
    for row, feature in enumerate(ids):
        frame.at[int(feature), "output_promotes"] = promotes[row]
        frame.at[int(feature), "output_suppresses"] = suppresses[row]


def _word_gain(ids: np.ndarray, scores: np.ndarray, clean: dict[int, str], k: int) -> np.ndarray:
    """Per feature, the probability gained by its ``k`` most promoted tokens that hold a letter:
    punctuation and digits a feature piles up ("!!!!", ":") are not words a reader would see."""
    is_word = np.vectorize(lambda i: any(c.isalpha() for c in clean[int(i)]))(ids)
    gains = np.where(is_word, np.clip(scores, 0, None), 0.0)
    order = np.argsort(~is_word, axis=1, kind="stable")[:, :k]  # words first, in score order
    return np.take_along_axis(gains, order, axis=1).sum(1).astype(np.float32)


def _words_first(
    ids: np.ndarray, scores: np.ndarray, clean: dict[int, str], words: set[int], k: int
) -> list[str]:
    """Up to ``k`` distinct token texts with a positive score, best first, whole words ahead of
    fragments and punctuation when they score at least ``_WORD_SHARE`` of the best."""
    items = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)
             if clean[int(i)].isprintable() and clean[int(i)] and s > 0]  # fmt: skip
    if not items:
        return []
    floor = _WORD_SHARE * items[0][1]
    ranked = sorted(enumerate(items), key=lambda e: (not (e[1][0] in words and e[1][1] >= floor), e[0]))
    return list(dict.fromkeys(clean[token] for _, (token, _) in ranked))[:k]


def _is_word(shown: str) -> bool:
    """A word-initial token of letters (" music", not "ing" or "'s")."""
    shown = shown.translate(MARKERS)
    return shown.startswith(" ") and len(shown.strip()) >= 2 and shown.strip().isalpha()


def _special_ids(tokenizer, vocab: int) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) if 0 <= int(i) < vocab}


def _empty_frame(d_sae: int) -> pd.DataFrame:
    frame = pd.DataFrame({"feature": np.arange(d_sae, dtype=np.int32)})
    add_probe_defaults(frame)
    return frame
