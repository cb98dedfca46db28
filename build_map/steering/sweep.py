"""Strength sweep: how strongly a steered feature shows up, and when the text falls apart.

For every strength × prompt the steered model writes a greedy reply; all rows go through one
batched ``generate`` call with the engine's per-row steering. Then the *unsteered* model re-reads
each prompt + reply once, which gives both measures:

* ``effect``: the steered feature's mean SAE activation over the reply tokens at the hookpoint,
  in units of its max activation (1.0 = firing as strongly as it ever does in the corpus); the
  mean over the features of a multi-feature edit. Measured with steering off, it asks whether the
  *text* now carries the feature, not whether we pushed the residual (which is true by
  construction).
* ``coherence``: the mean log-probability per reply token under the unsteered model (nats; 0 is
  perfectly predictable). Steering too hard pushes the model off the text distribution it knows,
  and the unsteered model then finds the reply improbable; ``perplexity`` = exp(-coherence) is the
  same number as a familiar ratio. One blind spot: degenerate repetition ("the the the") is
  *probable* once it has started, so ``repetition`` (share of reply tokens that repeat an earlier
  reply token) is reported next to it.

Strengths multiply the edits: with ``--feature`` the edit is (feature, 1.0) so strength s adds
s × max_act × the decoder direction; with a recipe, strength s multiplies the recipe's multiplier
(1 = the recipe as saved). Strength 0 is always included (nudge: the unsteered reply; pin: the
feature switched off) and is the baseline of ``suggest_window``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import torch

from build_map.lm.capture import capturing
from build_map.lm.hookpoints import input_device
from build_map.lm.tokens import left_pad
from build_map.steering.engine import SteeringEngine
from build_map.steering.recipes import Recipe
from build_map.steering.requests import (
    DEFAULT_SCOPE,
    Edit,
    Prompt,
    SamplingConfig,
    SteeringRequest,
    SteeringScope,
)
from build_map.steering.sampling import RowSampler
from build_map.steering.streaming import StepStreamer
from build_map.steering.sweep_window import SweepError
from build_map.steering.validation import feature_id

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
DEFAULT_PROMPTS = (
    "Tell me about your day.",
    "What should I cook for dinner tonight?",
    "Write a short poem about the sea.",
    "How do I get better at learning new things?",
)
_LOGIT_BUDGET = 1 << 26  # floats of logits per re-read chunk (~256 MB in fp32)


def sweep(
    session_or_engine: Any,
    features_or_recipe: int | Sequence[int] | Edit | Sequence[Edit] | Recipe,
    prompts: Sequence[Prompt],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    max_new_tokens: int = 48,
    seed: int = 0,
    mode: str = "nudge",
    batch_rows: int | None = None,
    progress: bool = False,
    scope: SteeringScope = DEFAULT_SCOPE,
) -> pd.DataFrame:
    """One row per (strength, prompt): reply, effect, coherence, perplexity, repetition, n_tokens.

    ``session_or_engine``: a ``build_map.steering.session.Session`` or a ``SteeringEngine`` (its model,
    tokenizer, SAE, hookpoint and scales are used). ``features_or_recipe``: feature id(s) (steered
    as ``mode`` with strength 1 each), Edit(s), or a Recipe (its edits and multiplier; its sampling
    is not used). ``batch_rows``: most rows per generate call (default: all in one; lower it where
    memory is short). Decoding is greedy; ``seed`` seeds torch for anything stochastic. Edits are
    checked by the engine (hidden features, bounds) before anything is generated."""
    engine = _engine_of(session_or_engine)
    edits, base = sweep_edits(features_or_recipe, mode)
    strengths = _with_zero(strengths)
    prompt_ids = _checked_prompts(engine, prompts, edits, base, strengths, max_new_tokens)
    rows = [(s, p) for s in strengths for p in range(len(prompts))]
    row_edits = [_scaled(edits, base * s) for s, _ in rows]
    torch.manual_seed(seed)
    replies, finishes = generate_rows(
        engine, [prompt_ids[p] for _, p in rows], row_edits, max_new_tokens, batch_rows, progress, scope
    )
    features = [e.feature for e in edits]
    effects, coherence = reread(engine, [prompt_ids[p] for _, p in rows], replies, features)
    frame = pd.DataFrame(
        {
            "strength": [float(s) for s, _ in rows],
            "prompt_index": [p for _, p in rows],
            "prompt": [_prompt_text(prompts[p]) for _, p in rows],
            "reply": [engine.decode(r) for r in replies],
            "n_tokens": [len(r) for r in replies],
            "finish": finishes,
            "effect": [float(np.mean(e)) if len(e) else math.nan for e in effects],
            "feature_effects": [list(map(float, e)) for e in effects],
            "coherence": coherence,
            "perplexity": np.exp(-np.asarray(coherence, dtype=float)),
            "repetition": [repetition(r) for r in replies],
        }
    )
    frame.attrs["sweep"] = {
        "features": features,
        "edits": [asdict(e) for e in edits],
        "base_multiplier": base,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "hookpoint": engine.hookpoint,
        "scope": asdict(scope),
    }
    return frame


def _checked_prompts(
    engine: SteeringEngine,
    prompts: Sequence[Prompt],
    edits: Sequence[Edit],
    base: float,
    strengths: Sequence[float],
    max_new_tokens: int,
) -> list[list[int]]:
    """The prompts' token ids, once every row of the sweep is known to be servable (prompt length,
    vocabulary, max_new_tokens, hidden features, strength bounds): nothing is generated before."""
    if not prompts:
        raise SweepError("no prompts: give at least one prompt to sweep over.")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    prompt_ids = [engine.prompt_ids(p) for p in prompts]
    for ids in prompt_ids:
        engine.validate([], ids, sampling)
    for strength in strengths:
        engine.validate(_scaled(edits, base * strength), prompt_ids[0], sampling)
    return prompt_ids


def _scaled(edits: Sequence[Edit], factor: float) -> list[Edit]:
    return [Edit(e.feature, e.strength * factor, e.mode) for e in edits]


def sweep_edits(features_or_recipe: Any, mode: str = "nudge") -> tuple[list[Edit], float]:
    """The edits a sweep scales, and the multiplier strength 1 stands for."""
    if isinstance(features_or_recipe, Recipe):
        if not features_or_recipe.edits:
            raise SweepError("the recipe has no edits; there is nothing to sweep.")
        return list(features_or_recipe.edits), features_or_recipe.multiplier
    items = [features_or_recipe] if isinstance(features_or_recipe, (int, Edit)) else list(features_or_recipe)
    if not items:
        raise SweepError("no features: pass at least one feature id (or a recipe).")
    edits = [item if isinstance(item, Edit) else Edit(_feature_id(item), 1.0, mode) for item in items]
    return edits, 1.0


def generate_rows(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    row_edits: Sequence[Sequence[Edit]],
    max_new_tokens: int,
    batch_rows: int | None = None,
    progress: bool = False,
    scope: SteeringScope = DEFAULT_SCOPE,
    presence_penalty: float = 0.0,
) -> tuple[list[list[int]], list[str]]:
    """Greedy replies (token ids, end of turn excluded) and finish reasons ("eos" / "length"), each
    row steered with its own edits through the engine's hook, on the positions ``scope`` names,
    with ``presence_penalty`` as in ``SamplingConfig``."""
    size = batch_rows or len(prompt_ids)
    replies: list[list[int]] = []
    finishes: list[str] = []
    for start in range(0, len(prompt_ids), size):
        chunk = slice(start, start + size)
        new = _generate_chunk(
            engine, prompt_ids[chunk], row_edits[chunk], max_new_tokens, progress, scope, presence_penalty
        )
        for tokens in new:
            end = next((i for i, t in enumerate(tokens) if t in engine.eos_ids), None)
            replies.append(tokens if end is None else tokens[:end])
            finishes.append("length" if end is None else "eos")
    return replies, finishes


def _generate_chunk(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    row_edits: Sequence[Sequence[Edit]],
    max_new_tokens: int,
    progress: bool,
    scope: SteeringScope,
    presence_penalty: float,
) -> list[list[int]]:
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, presence_penalty=presence_penalty)
    if engine.generator is not None:  # another backend generates: one request per row, same arithmetic
        return _generate_with_backend(engine, prompt_ids, row_edits, greedy, scope)
    from transformers import GenerationConfig, LogitsProcessorList

    model = engine.model
    ids, mask = left_pad(prompt_ids, engine.pad_id)
    device = input_device(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=engine.eos_ids or None, pad_token_id=engine.pad_id,
    )  # fmt: skip
    streamer = _StepProgress(max_new_tokens, f"sweep: {len(prompt_ids)} rows") if progress else None
    processors = (
        [RowSampler([greedy] * len(prompt_ids), [0] * len(prompt_ids), ids.shape[1], ())]
        if presence_penalty
        else []
    )
    try:
        with engine.steered(row_edits, scope=scope, prompts=(ids, mask)), torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                streamer=streamer, logits_processor=LogitsProcessorList(processors),
            )  # fmt: skip
    finally:
        if streamer is not None:
            streamer.close()
    return out[:, ids.shape[1] :].tolist()


def _generate_with_backend(engine, prompt_ids, row_edits, greedy, scope) -> list[list[int]]:
    handles = [
        engine.submit(SteeringRequest(ids, tuple(edits), greedy, 1.0, scope=scope))
        for ids, edits in zip(prompt_ids, row_edits, strict=True)
    ]
    out = []
    for handle in handles:
        for _ in handle:  # to the end (an error in the backend is raised here)
            pass
        out.append(handle.token_ids[0])
    return out


def reread(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    replies: Sequence[list[int]],
    features: Sequence[int],
) -> tuple[list[np.ndarray], list[float]]:
    """Unsteered re-read of prompt + reply: per row, each feature's mean activation over the reply
    tokens / its max activation, and the mean log-probability of the reply tokens (NaN if empty).
    Identical rows are read once (low strengths often leave the reply unchanged)."""
    keys = [(tuple(p), tuple(r)) for p, r in zip(prompt_ids, replies, strict=True)]
    unique = list(dict.fromkeys(keys))
    vocab = int(engine.model.config.vocab_size)
    longest = max(1, max(len(r) for _, r in unique))
    size = max(1, _LOGIT_BUDGET // (longest * vocab))
    measured: dict[tuple, tuple[np.ndarray, float]] = {}
    for start in range(0, len(unique), size):
        chunk = unique[start : start + size]
        effects, coherence = _reread_chunk(engine, [p for p, _ in chunk], [r for _, r in chunk], features)
        measured.update(zip(chunk, zip(effects, coherence, strict=True), strict=True))
    return [measured[k][0] for k in keys], [measured[k][1] for k in keys]


def _reread_chunk(
    engine: SteeringEngine,
    prompt_ids: Sequence[list[int]],
    replies: Sequence[list[int]],
    features: Sequence[int],
) -> tuple[list[np.ndarray], list[float]]:
    """One forward of rows laid out as [left pad | prompt | reply | right pad], so every reply
    starts at the same column and logits are computed for reply positions only."""
    sae = engine.sae
    width, longest = max(len(p) for p in prompt_ids), max(1, max(len(r) for r in replies))
    ids = torch.full((len(replies), width + longest), engine.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, reply) in enumerate(zip(prompt_ids, replies, strict=True)):
        span = slice(width - len(prompt), width + len(reply))
        ids[row, span] = torch.tensor(list(prompt) + list(reply), dtype=torch.long)
        mask[row, span] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as if unpadded, like generate does
    keep = torch.arange(width - 1, width + longest - 1)  # the logits that predict reply tokens
    hidden, logits = _forward_with_capture(engine, ids, mask, position_ids, keep)
    index = torch.tensor(list(features), device=sae.W_enc.device)
    scale = engine.feature_scale[index.cpu()].numpy()
    effects, coherence = [], []
    for row, reply in enumerate(replies):
        n = len(reply)
        if n == 0:
            effects.append(np.full(len(features), math.nan))
            coherence.append(math.nan)
            continue
        with torch.inference_mode():
            acts = sae.encode(hidden[row, width : width + n].to(sae.W_enc.device))[:, index].float()  # (n, F)
            logprobs = logits[row, :n].float().log_softmax(-1)
            target = torch.tensor(reply, device=logprobs.device)
            token_logprob = logprobs.gather(-1, target[:, None]).squeeze(-1)
        effects.append(acts.mean(0).cpu().numpy() / scale)
        coherence.append(float(token_logprob.mean()))
    return effects, coherence


def _forward_with_capture(
    engine: SteeringEngine,
    ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hookpoint output (rows, seq, d_model), logits at ``keep`` (rows, len(keep), vocab)), unsteered."""
    model = engine.model
    device = input_device(model)
    supported = getattr(model, "_supports_logits_to_keep", lambda: False)()
    extra = {"logits_to_keep": keep.to(device)} if supported else {}
    with capturing(model, engine.hookpoint) as seen, torch.inference_mode():
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
            use_cache=False, **extra,
        ).logits  # fmt: skip
    return seen[0], logits if supported else logits[:, keep.to(logits.device)]


def repetition(tokens: Sequence[int]) -> float:
    """Share of tokens that repeat an earlier token of the same reply (0 = all distinct)."""
    return 1.0 - len(set(tokens)) / len(tokens) if tokens else math.nan


class _StepProgress(StepStreamer):
    """A generate streamer that only counts decoding steps into a tqdm bar."""

    def __init__(self, total: int, description: str):
        from tqdm.auto import tqdm

        super().__init__()
        self.bar = tqdm(total=total, desc=description, unit="step")

    def step(self, _value: torch.Tensor) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _engine_of(session_or_engine: Any) -> SteeringEngine:
    engine = getattr(session_or_engine, "engine", session_or_engine)
    if not isinstance(engine, SteeringEngine):
        raise SweepError(
            f"expected a Session or a SteeringEngine, got {type(session_or_engine).__name__}; "
            "open one with build_map.steering.session.open_bundle(BUNDLE)."
        )
    return engine


def _with_zero(strengths: Sequence[float]) -> list[float]:
    values = sorted({float(s) for s in strengths})
    if not values or not all(math.isfinite(v) for v in values):
        raise SweepError(f"strengths {list(strengths)!r}: give at least one finite number.")
    if 0.0 not in values:
        logger.info("adding strength 0 (the baseline) to the sweep")
        values = sorted([0.0, *values])
    return values


def _feature_id(item: Any) -> int:
    feature = feature_id(item)
    if feature is None:
        raise SweepError(f"{item!r} is not a feature id; pass whole numbers, Edits or a Recipe.")
    return feature


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, torch.Tensor) or all(isinstance(t, int) for t in prompt):
        return json.dumps(
            [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        )
    return json.dumps(list(prompt), ensure_ascii=False)
