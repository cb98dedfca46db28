"""What a steering request is: edits, sampling, the server's limits and batching, and the errors.

Strength units: ``scale_i`` is feature i's max activation from the bundle, so strength 1.0 means
"as strong as the feature ever fires" and strengths are comparable across features; a request's
``multiplier`` scales every strength in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

MODES = ("nudge", "pin", "orthogonal", "cap")
Mode = Literal["nudge", "pin", "orthogonal", "cap"]
Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor
DEFAULT_STRENGTH = 1.0
"""Strength of an edit that names none (one click in the explorer, a link's bare ``feature=``): as
strong as the feature ever fires, added on top of what the model already does."""
DEFAULT_MODE = "nudge"


class SteeringError(ValueError):
    """A steering request is refused; the message says which value and what is allowed."""


class GenerationError(RuntimeError):
    """Generation stopped without a result (its worker died); never a quiet end of text."""


class StreamTimeout(TimeoutError):
    """No token arrived within the consumer's timeout; the request may still be running."""


@dataclass(frozen=True)
class Edit:
    feature: int
    """SAE feature (latent) index, 0 <= feature < d_sae."""
    strength: float
    """In units of the feature's max activation: 1.0 = as strong as it ever fires in the corpus."""
    mode: Mode = "nudge"
    """nudge: add strength × scale × decoder direction; pin: clamp the activation to strength × scale."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens (the reply stops earlier at end of turn)."""
    seed: int | None = None
    """Seed of the row's noise; None draws a fresh one per request (both rows of a pair share it)."""
    min_new_tokens: int = 0
    """End of turn is suppressed before this many tokens (benchmarks use it for fixed lengths)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the reply has already produced, before the
    temperature, greedy rows included (vLLM's and interp-engine's presence penalty; the prompt's
    tokens are not penalised). It breaks the loops a strong edit can cause ("to-to-to…")
    without growing with the loop, as a frequency penalty would."""


@dataclass(frozen=True)
class SteeringLimits:
    max_edits: int = 32
    """Most edits in one request."""
    max_abs_strength: float = 20.0
    """Bound on |multiplier × strength|, in units of max activation (20 = 20× the strongest firing)."""
    max_new_tokens: int = 1024
    """Most tokens one request may ask for."""
    max_temperature: float = 5.0
    """Highest sampling temperature accepted."""
    max_prompt_tokens: int | None = None
    """Cap on prompt length; the effective budget is also at most the model's max positions minus
    the request's max_new_tokens (the context budget)."""


@dataclass(frozen=True)
class BatchingConfig:
    window_s: float = 0.02
    """After a request arrives, wait this long for others to share its batch."""
    max_batch_rows: int = 16
    """Most rows (a pair counts two) in one generate call."""
    max_concurrent_batches: int = 1
    """Batches running at once; more lowers waiting for late arrivals but shares the cores."""
    poll_s: float = 0.25
    """How often a waiting consumer checks that its worker is alive (a quiet queue is not an end)."""
    trim_memory: bool = True
    """Hand freed memory back to the system after each batch (glibc ``malloc_trim``; see
    ``build_map.common.memory``): without it a server's RSS climbs with every reply."""


@dataclass(frozen=True)
class SteeringScope:
    """Which positions of the hookpoint a request's edits act on. Decoding steps (the reply) are
    always steered, and so is the last prompt token, which writes the first reply token."""

    prompt: bool = False
    """Also steer the rest of the prompt (the conversation so far). Off by default: steering only
    the positions that write the reply gave the better effect at the same coherence on the demo
    (docs/ARCHITECTURE.md, "Steering scope")."""
    special_tokens: bool = False
    """Also steer the chat template's special tokens (BOS, <|im_start|>, …) when the prompt is
    steered; off as in Neuronpedia (``steer_special_tokens``)."""


DEFAULT_SCOPE = SteeringScope()


@dataclass(frozen=True)
class SteeringRequest:
    prompt: Prompt
    """Chat messages (rendered with the chat template), a user message as str, or token ids."""
    edits: tuple[Edit, ...] = ()
    """Feature edits of the steered row."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of every row of the request."""
    multiplier: float = 1.0
    """Global multiplier on all strengths."""
    pair: bool = False
    """Also generate the unsteered reply as row 0 (steered is row 1) with the same noise."""
    scope: SteeringScope = DEFAULT_SCOPE
    """Which positions the edits act on."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))
