"""Steer SAE features while a model generates: one forward hook, per-row edits, batched streaming.

No Panel here: the server calls this module, and tests drive it without a server.

Semantics. ``scale_i`` is feature i's max activation from the bundle, so strength 1.0 means "as
strong as the feature ever fires" and strengths are comparable across features; a request's
``multiplier`` scales every strength in it. With ``v_i = multiplier * strength * scale_i``:

* ``nudge``: ``x += v_i * W_dec[i]`` at every position (prompt and reply) of the hookpoint output.
  Identical to Goodfire's encode → add to the feature → decode → add the SAE error back, because
  the decoder is linear.
* ``pin``: clamp the feature so that the SAE encoder reads exactly ``v_i`` at the hookpoint output
  after steering. The residual only moves along the pinned features' decoder rows:
  ``x += sum_j c_j * W_dec[j]``, with ``c`` solved jointly for all pinned features of the request
  from the |P|×|P| system ``pre_P(x + c W_dec[P]) = v_P`` (pre-activations are affine in x). When
  the encoder and decoder rows are matched (``W_dec[i] · W_enc[:, i] = 1``, no cross terms) and the
  feature is active, this is exactly encode → set → decode → add the error back, i.e. a change of
  ``(v_i - f_i) * W_dec[i]``; in general that recipe does not make the encoder read v_i, this does.
  ``v_i = 0`` ablates: the feature is pushed just to zero (nothing changes where it is already off).
  Pins are applied after the nudges, so pins win. Only the pinned features' encoder columns are
  used (``x @ W_enc[:, P] + b_enc[P]``), never the full SAE. For a TopK SAE the pinned feature's
  pre-activation is v_i and it fires at v_i when it ranks in the top k; for JumpReLU values below
  the feature's threshold read as 0.

Per-request edits are never global state: the hook reads a per-batch-row steering spec from a
``ContextVar`` that the generating thread sets for the duration of its ``generate`` call, so every
row of a batch (row 0 unsteered, row 1 steered, rows of other users) gets its own vector.

Sampling (``RowSampler``): Gumbel-max over the temperature / top-p filtered logits, with one
uniform per vocabulary entry drawn at every step from a generator seeded by
``noise_seed(request seed, step)``. "Same seed" therefore means identical noise on every token at
every step: the default and steered rows of a pair (and a request run alone or inside any batch)
draw exactly the same random numbers, so they differ only where the steering changes the logits.

Batching: ``submit`` queues a request; a scheduler thread gathers the requests that arrive within
``BatchingConfig.window_s`` (up to ``max_batch_rows`` rows) into one left-padded ``generate`` call
in a worker thread. Batches are static: a request arriving while ``max_concurrent_batches``
batches run waits for one of them to finish. Each request ends (and its consumer moves on) as soon
as its own rows stop (end of turn, its max_new_tokens, or cancel).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from build_map.hooks import install_dispatch
from build_map.models import normalize_hookpoint, resolve_hookpoint
from build_map.sae import SparseAutoencoder

logger = logging.getLogger(__name__)

MODES = ("nudge", "pin")
Mode = Literal["nudge", "pin"]
Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor


class SteeringError(ValueError):
    """A steering request is refused; the message says which value and what is allowed."""


class GenerationError(RuntimeError):
    """Generation stopped without a result (its worker died); never a quiet end of text."""


class StreamTimeout(TimeoutError):
    """No token arrived within the consumer's timeout; the request may still be running."""


# ---------------------------------------------------------------- configuration


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))


# ---------------------------------------------------------------- steering maths


@dataclass
class RowSteering:
    """One row's steering in float32 on the SAE's device; empty means unsteered."""

    nudge: torch.Tensor | None = None  # (d_in,)
    pin_enc: torch.Tensor | None = None  # (d_in, P) encoder columns of the pinned features
    pin_bias: torch.Tensor | None = None  # (P,) encoder bias, b_dec folded in when applied to input
    pin_value: torch.Tensor | None = None  # (P,) target activations
    pin_threshold: torch.Tensor | None = None  # (P,) where the activation turns on (0 unless jumprelu)
    pin_dec: torch.Tensor | None = None  # (P, d_in) = A⁻¹ W_dec[P], the joint solve folded in

    @property
    def n_pins(self) -> int:
        return 0 if self.pin_enc is None else int(self.pin_enc.shape[1])

    @property
    def is_empty(self) -> bool:
        return self.nudge is None and self.n_pins == 0


@dataclass
class BatchSteering:
    """Steering of every row of a batch, on the hookpoint's device; applied by the hook."""

    rows: int
    nudge: torch.Tensor | None  # (B, 1, d_in) hidden dtype
    pin_enc: torch.Tensor | None  # (B, d_in, P) float32
    pin_bias: torch.Tensor | None  # (B, 1, P)
    pin_value: torch.Tensor | None  # (B, 1, P)
    pin_threshold: torch.Tensor | None  # (B, 1, P)
    pin_dec: torch.Tensor | None  # (B, P, d_in)

    @classmethod
    def build(
        cls, rows: Sequence[RowSteering], device: torch.device, dtype: torch.dtype
    ) -> BatchSteering | None:
        """Stack per-row specs; None when no row is steered (the hook then does nothing)."""
        if all(row.is_empty for row in rows):
            return None
        d_in = next(_row_width(row) for row in rows if not row.is_empty)
        nudge = None
        if any(row.nudge is not None for row in rows):
            nudge = torch.stack(
                [
                    row.nudge.to(device) if row.nudge is not None else torch.zeros(d_in, device=device)
                    for row in rows
                ]
            )
            nudge = nudge.to(dtype).unsqueeze(1)
        width = max(row.n_pins for row in rows)
        if width == 0:
            return cls(len(rows), nudge, None, None, None, None, None)
        enc = torch.zeros(len(rows), d_in, width, device=device)
        dec = torch.zeros(len(rows), width, d_in, device=device)
        bias, value, threshold = (torch.zeros(len(rows), 1, width, device=device) for _ in range(3))
        for r, row in enumerate(rows):
            p = row.n_pins
            if p:  # padded pins are all zero: pre = 0, so their residual is 0
                enc[r, :, :p] = row.pin_enc.to(device)
                dec[r, :p] = row.pin_dec.to(device)
                bias[r, 0, :p] = row.pin_bias.to(device)
                value[r, 0, :p] = row.pin_value.to(device)
                threshold[r, 0, :p] = row.pin_threshold.to(device)
        return cls(len(rows), nudge, enc, bias, value, threshold, dec)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, seq, d_in) → steered (B, seq, d_in); every row with its own vector."""
        if hidden.shape[0] != self.rows:
            raise RuntimeError(
                f"steering was prepared for {self.rows} rows but the hookpoint saw a batch of {hidden.shape[0]}"
            )
        if self.nudge is not None:
            if self.nudge.device != hidden.device:
                self.nudge = self.nudge.to(hidden.device)
            hidden = hidden + self.nudge
        if self.pin_enc is None:
            return hidden
        self._move_pins(hidden.device)
        x = hidden.float()
        pre = torch.baddbmm(self.pin_bias, x, self.pin_enc)  # (B, seq, P)
        active = pre * (pre > self.pin_threshold)
        residual = torch.where(self.pin_value > 0, self.pin_value - pre, -active)
        return (x + torch.bmm(residual, self.pin_dec)).to(hidden.dtype)

    def _move_pins(self, device: torch.device) -> None:
        if self.pin_enc.device == device:
            return
        for name in ("pin_enc", "pin_bias", "pin_value", "pin_threshold", "pin_dec"):
            setattr(self, name, getattr(self, name).to(device))


def _row_width(row: RowSteering) -> int:
    return int(row.nudge.shape[0] if row.nudge is not None else row.pin_enc.shape[0])


def steer_output(output: Any, steering: BatchSteering) -> Any:
    """Apply steering to a decoder layer's output: a plain tensor (transformers 5) or a tuple whose
    first item is the hidden state (older versions). Indexing a tensor with [0] would pick batch
    row 0, so the two cases are told apart by type."""
    if isinstance(output, torch.Tensor):
        return steering.apply(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (steering.apply(output[0]), *output[1:])
    raise TypeError(
        f"Cannot steer a hookpoint output of type {type(output).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden state. Pick a decoder block output as hookpoint."
    )


def effective_scales(max_act: Any, d_sae: int) -> tuple[torch.Tensor, float]:
    """Per-feature scale (max activation) with a fallback for dead / zero / non-finite entries:
    the median of the valid scales (1.0 when none is valid). Returns (scales, fallback)."""
    scales = torch.as_tensor(max_act, dtype=torch.float32).flatten().cpu()
    if scales.shape[0] != d_sae:
        raise SteeringError(
            f"feature_scale has {scales.shape[0]} entries but the SAE has {d_sae} features; pass the "
            "bundle's max_act column for this SAE."
        )
    valid = torch.isfinite(scales) & (scales > 0)
    fallback = float(scales[valid].median()) if valid.any() else 1.0
    return torch.where(valid, scales, torch.tensor(fallback)), fallback


# ---------------------------------------------------------------- sampling, stopping, streaming


class RowSampler:
    """Logits processor that samples each row from its own seeded noise (Gumbel-max over the
    temperature/top-p filtered logits) and marks the chosen token +inf, so generate's greedy argmax
    picks it. Greedy rows are left untouched; min_new_tokens masks end of turn.

    At every step a row draws one uniform per vocabulary entry from a generator seeded with
    ``noise_seed(seed, step)``: rows with the same seed see the same noise on the same token at
    every step, whatever else is in the batch. Work is vectorized over rows and, for peaked
    distributions, the nucleus is found among the top candidates without touching the rest."""

    top_p_candidates = 64
    """The nucleus is looked for among this many top tokens first (one cheap topk)."""
    buckets_per_nat = 16
    """Resolution of the log-probability buckets used for rows whose candidates are not enough."""
    n_buckets = 16 * 40

    def __init__(self, configs: Sequence[SamplingConfig], seeds: Sequence[int], prompt_length: int, eos_ids):
        self.configs = list(configs)
        self.seeds = list(seeds)
        self.prompt_length = prompt_length
        self.eos_ids = list(eos_ids)
        self.sampled = [r for r, cfg in enumerate(self.configs) if cfg.temperature > 0]
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        early = [r for r, cfg in enumerate(self.configs) if step < cfg.min_new_tokens]
        if early and self.eos_ids:
            early_rows = torch.tensor(early, device=scores.device)[:, None]
            scores[early_rows, torch.tensor(self.eos_ids, device=scores.device)[None, :]] = -math.inf
        if len(self.sampled) == scores.shape[0]:  # every row samples: no gather copy
            scores[torch.arange(scores.shape[0], device=scores.device), self.sample(scores, step)] = math.inf
        elif self.sampled:
            rows = torch.tensor(self.sampled, device=scores.device)
            scores[rows, self.sample(scores[rows], step)] = math.inf
        return scores

    def noise(self, step: int, vocab: int, device: torch.device) -> torch.Tensor:
        """(S, vocab) uniforms of the sampled rows at ``step``."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        noise = torch.empty(len(self.sampled), vocab, device=device)
        for i, r in enumerate(self.sampled):
            self.generator.manual_seed(noise_seed(self.seeds[r], step))
            noise[i].uniform_(generator=self.generator)
        return noise

    def sample(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """(S, vocab) scores of the sampled rows → (S,) chosen token ids. Few passes over the
        vocabulary (on a CPU batch they are what sampling costs): divide, logsumexp, topk, noise."""
        device = scores.device
        configs = [self.configs[r] for r in self.sampled]
        top_p = torch.tensor([c.top_p for c in configs], device=device)
        temperature = torch.tensor([c.temperature for c in configs], device=device)
        noise = self.noise(step, scores.shape[-1], device)
        logits = scores / temperature[:, None]
        log_total = logits.logsumexp(-1, keepdim=True)
        top, ids = logits.topk(min(self.top_p_candidates, logits.shape[-1]), dim=-1)
        probs = (top - log_total).exp()
        keep = (probs.cumsum(-1) - probs) < top_p[:, None]  # the token that crosses top_p is kept
        candidates = top.masked_fill(~keep, -math.inf) + _gumbel(noise.gather(-1, ids))
        choice = ids.gather(-1, candidates.argmax(-1, keepdim=True)).squeeze(-1)
        whole = (top_p >= 1.0) | (probs.sum(-1) < top_p)  # no filter, or a nucleus beyond the candidates
        for r in whole.nonzero().flatten().tolist():
            row = logits[r]  # Gumbel-max needs no normalization
            if float(top_p[r]) < 1.0:
                row = row.masked_fill(~self._bucket_nucleus(row - log_total[r], float(top_p[r])), -math.inf)
            choice[r] = (row + _gumbel(noise[r])).argmax()
        return choice

    def nucleus_mask(self, log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
        """(vocab,) mask of the top-p nucleus: the smallest set of most likely tokens whose
        probability reaches top_p (the token that crosses it is kept), as a full sort finds it."""
        top, ids = log_probs.topk(min(self.top_p_candidates, log_probs.shape[-1]))
        probs = top.exp()
        if float(probs.sum()) < top_p:
            return self._bucket_nucleus(log_probs, top_p)
        keep = (probs.cumsum(-1) - probs) < top_p
        return torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, ids, keep)

    def _bucket_nucleus(self, log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
        """(vocab,) nucleus mask: bucket tokens by how far below the best their log-probability is;
        buckets above the one where the cumulative mass crosses top_p are wholly inside, and only
        the crossing bucket is sorted."""
        depth = ((log_probs.max() - log_probs) * self.buckets_per_nat).clamp(max=self.n_buckets - 1).long()
        probs = log_probs.exp()
        mass = torch.zeros(self.n_buckets, dtype=probs.dtype, device=probs.device).scatter_add_(
            0, depth, probs
        )
        cumulative = mass.cumsum(0)
        crossing = min(int((cumulative < top_p).sum()), self.n_buckets - 1)
        before = float(cumulative[crossing - 1]) if crossing else 0.0
        allowed = depth < crossing
        edge = (depth == crossing).nonzero().flatten()
        edge_probs, order = probs[edge].sort(descending=True)
        allowed[edge[order[(before + edge_probs.cumsum(-1) - edge_probs) < top_p]]] = True
        return allowed


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def noise_seed(seed: int, step: int) -> int:
    """Seed of a row's noise at one step: a pure function of (request seed, step), so a row draws
    the same noise alone, in any batch, and beside its paired row."""
    return (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


class _RowState:
    """One batch row: the tokens it produced, the text already sent, and why it stopped."""

    def __init__(self, job: _Job, local_row: int, prompt_ids: list[int], steering: RowSteering):
        self.job = job
        self.local_row = local_row
        self.prompt_ids = prompt_ids
        self.steering = steering
        self.tokens: list[int] = []
        self.sent = ""
        self.reason: str | None = None  # eos, length, cancelled

    @property
    def sampling(self) -> SamplingConfig:
        return self.job.request.sampling


class _RowStop:
    """Per-row stopping: a row is done at its own max_new_tokens or when its request is cancelled."""

    def __init__(self, rows: Sequence[_RowState], prompt_length: int):
        self.rows = rows
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        done = [
            step >= row.sampling.max_new_tokens or row.job.handle.cancel_event.is_set() for row in self.rows
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _BatchStreamer:
    """Streamer for a whole batch (transformers' own ones take one row): decodes each row's new
    tokens and sends the new text to the row's request; ends a request as soon as its rows stop."""

    def __init__(self, rows: Sequence[_RowState], decode, eos_ids: Iterable[int], count_tokens):
        self.rows = rows
        self.decode = decode
        self.count_tokens = count_tokens  # called with each row's token count when it stops
        self.eos_ids = set(eos_ids)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first passes the prompt
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist(), strict=True):
            self._accept(row, int(token))
        self._finish_jobs()

    def end(self) -> None:
        for row in self.rows:
            if row.reason is None:
                self._close(row, "length")
        self._finish_jobs()

    def _accept(self, row: _RowState, token: int) -> None:
        if row.reason is not None:
            return
        if row.job.handle.cancel_event.is_set():
            self._close(row, "cancelled")
        elif token in self.eos_ids:
            self._close(row, "eos")
        else:
            row.tokens.append(token)
            self._send(row, final=False)
            if len(row.tokens) >= row.sampling.max_new_tokens:
                self._close(row, "length")

    def _send(self, row: _RowState, final: bool) -> None:
        text = self.decode(row.tokens)
        if not final and text.endswith("\ufffd"):  # an unfinished multi-byte character: wait
            return
        if not text.startswith(row.sent):
            if final:
                logger.warning(
                    "Decoded text of row %d changed retroactively; the tail is dropped", row.local_row
                )
            return
        if len(text) > len(row.sent):
            row.job.handle._put_text(row.local_row, text[len(row.sent) :])
            row.sent = text

    def _close(self, row: _RowState, reason: str) -> None:
        self._send(row, final=True)
        self.count_tokens(len(row.tokens))  # before the request ends, so its consumer sees it
        row.reason = reason
        row.job.handle.finish_reasons[row.local_row] = reason

    def _finish_jobs(self) -> None:
        for job in {id(row.job): row.job for row in self.rows}.values():
            reasons = [row.reason for row in self.rows if row.job is job]
            if not job.handle.done and None not in reasons:
                job.handle._finish("cancelled" if "cancelled" in reasons else "finished")


# ---------------------------------------------------------------- handles


class GenerationStream:
    """What ``submit`` returns: iterate for ``(row, text_piece)`` events (row 0 default, row 1
    steered for a pair); ``cancel()`` stops it early and the stream then ends with status
    ``cancelled``; an error in the worker is raised here, never a quiet end of text."""

    def __init__(self, engine: SteeringEngine, request: SteeringRequest, seed: int, rows: int):
        self.engine = engine
        self.request = request
        self.seed = seed
        self.rows = rows
        self.texts = [""] * rows
        self.finish_reasons: list[str | None] = [None] * rows
        self.cancel_event = threading.Event()
        self.status = "queued"  # queued → running → finished | cancelled | error
        self.done = False  # set by the worker once its end or error is queued
        self._events: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._consumed = False  # the end (or error) was read: iterating again replays it
        self._error: BaseException | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[Any]:
        return self.events()

    def events(self, timeout: float | None = None) -> Iterator[tuple[int, str]]:
        """Yield (row, piece) until the end. ``timeout``: most seconds to wait for one event before
        raising StreamTimeout (the request keeps running; call cancel() to stop it)."""
        while not self._consumed:
            kind, first, second = self._next_event(timeout)
            if kind == "text":
                self.texts[first] += second
                yield first, second
                continue
            self._consumed = True
            self.status = first if kind == "end" else "error"
            self._error = first if kind == "error" else None
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> list[str]:
        """Wait for the end and return every row's text."""
        for _ in self.events(timeout):
            pass
        return list(self.texts)

    def _next_event(self, timeout: float | None) -> tuple:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self.engine.batching.poll_s
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            try:
                return self._events.get(timeout=wait)
            except queue.Empty:
                pass
            if not self._worker_alive():  # it queued everything it had before exiting
                try:
                    return self._events.get_nowait()
                except queue.Empty:
                    raise GenerationError(
                        "the generation worker stopped without finishing this request; see the server log"
                    ) from None
            if deadline is not None and time.monotonic() >= deadline:
                raise StreamTimeout(
                    f"no text for {timeout:.1f} s; the request is still {self.status} (call cancel() to stop it)"
                )

    def _worker_alive(self) -> bool:
        worker = self._worker
        return worker.is_alive() if worker is not None else self.engine._scheduler_alive()

    # called from the worker thread
    def _put_text(self, row: int, piece: str) -> None:
        self._events.put(("text", row, piece))

    def _finish(self, status: str) -> None:
        self.done = True
        self._events.put(("end", status, None))

    def _fail(self, exc: BaseException) -> None:
        self.done = True
        self._events.put(("error", exc, None))


class TextStream(GenerationStream):
    """A one-row stream whose iteration yields text pieces (str)."""

    def __iter__(self) -> Iterator[str]:
        for _, piece in self.events():
            yield piece


@dataclass
class _Job:
    request: SteeringRequest
    handle: GenerationStream
    prompt_ids: list[int]
    steerings: list[RowSteering]

    @property
    def rows(self) -> int:
        return len(self.steerings)


# ---------------------------------------------------------------- the engine


class SteeringEngine:
    """Generate with SAE features steered, batching concurrent requests into one generate call.

    ``feature_scale``: per-feature max activation (d_sae,), see ``effective_scales`` for the
    fallback. ``hidden``: feature ids (or a bool mask) that requests may not steer.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        sae: SparseAutoencoder,
        hookpoint: str,
        feature_scale: Any,
        hidden: Iterable[int] | Any = (),
        limits: SteeringLimits | None = None,
        batching: BatchingConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sae = sae
        self.hookpoint = normalize_hookpoint(model, hookpoint)
        self.limits = limits or SteeringLimits()
        self.batching = batching or BatchingConfig()
        hidden_size = getattr(model.config, "hidden_size", sae.d_in)
        if sae.d_in != hidden_size:
            raise SteeringError(
                f"SAE d_in {sae.d_in} does not match the model's hidden size {hidden_size} at "
                f"{self.hookpoint}; pass the SAE trained for this model."
            )
        self.feature_scale, self.scale_fallback = effective_scales(feature_scale, sae.d_sae)
        self.hidden = _hidden_mask(hidden, sae.d_sae)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.stats = {"batches": 0, "rows": 0, "tokens": 0}  # generate calls, rows, generated tokens
        self._stats_lock = threading.Lock()
        self._module = resolve_hookpoint(model, self.hookpoint)
        self._device = _module_device(self._module, model)
        self._active: contextvars.ContextVar[BatchSteering | None] = contextvars.ContextVar(
            f"steering_{id(self)}", default=None
        )
        # First among the module's hooks, so observers (attribution, reply scoring) see the steered
        # residual stream whatever order the hooks were added in.
        self._hook = self._module.register_forward_hook(self._steer_hook, prepend=True)
        # Attribution, sweeps and reply scoring hook this module per request: install their
        # dispatcher now, never while other threads are generating (build_map.hooks).
        install_dispatch(self._module)
        self._tokenizer_lock = threading.Lock()
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(self.batching.max_concurrent_batches)
        self._closed = False
        self._scheduler: threading.Thread | None = None
        self._running: dict[threading.Thread, list[_Job]] = {}  # batches in flight, joined by close()

    # ------------------------------------------------------------ public API

    def validate(
        self,
        edits: Sequence[Edit],
        prompt_ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
    ) -> None:
        """Raise SteeringError with a clear message if the request cannot be served."""
        sampling = sampling or SamplingConfig()
        self._validate_sampling(sampling)
        self._validate_edits(edits, multiplier)
        self._validate_prompt(prompt_ids, sampling)

    def submit(self, request: SteeringRequest) -> GenerationStream:
        """Queue a request; it is batched with others arriving within the batching window."""
        return self._submit(request, GenerationStream)

    def stream(
        self,
        prompt: Prompt,
        edits: Sequence[Edit] = (),
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
    ) -> TextStream:
        """Stream the steered reply; iterating yields text pieces."""
        request = SteeringRequest(prompt, tuple(edits), sampling or SamplingConfig(), multiplier)
        return self._submit(request, TextStream)

    def stream_pair(
        self,
        prompt: Prompt,
        edits: Sequence[Edit],
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
    ) -> GenerationStream:
        """Default (row 0) and steered (row 1) replies in one batch with the same noise; yields
        (row, piece). With no edits only row 0 is generated (the steered reply equals it)."""
        request = SteeringRequest(prompt, tuple(edits), sampling or SamplingConfig(), multiplier, pair=True)
        return self.submit(request)

    def generate(
        self,
        prompt: Prompt,
        edits: Sequence[Edit] = (),
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
        timeout: float | None = None,
    ) -> str:
        """The steered reply as one string (the concatenation of what ``stream`` yields)."""
        return self.stream(prompt, edits, sampling, multiplier).result(timeout)[0]

    @contextlib.contextmanager
    def steered(self, rows: Sequence[Sequence[Edit]], multiplier: float = 1.0) -> Iterator[None]:
        """Steer plain forward calls in this thread: ``rows[b]`` are the edits of batch row b."""
        for edits in rows:
            self._validate_edits(edits, multiplier)
        steering = BatchSteering.build(
            [self.row_steering(edits, multiplier) for edits in rows], self._device, _hidden_dtype(self.model)
        )
        token = self._active.set(steering)
        try:
            yield
        finally:
            self._active.reset(token)

    def row_steering(self, edits: Sequence[Edit], multiplier: float = 1.0) -> RowSteering:
        """Precompute one row's nudge vector and pin solve (edits must be valid)."""
        nudges = [e for e in edits if e.mode == "nudge" and e.strength != 0]
        pins = [e for e in edits if e.mode == "pin"]
        steering = RowSteering()
        with torch.no_grad():
            if nudges:
                steering.nudge = self._nudge_vector(nudges, multiplier)
            if pins:
                self._pin_solve(steering, pins, multiplier)
        return steering

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages go through the chat template with the generation
        prompt appended; a str is one user message; ids pass through."""
        if isinstance(prompt, torch.Tensor):
            return [int(t) for t in prompt.flatten().tolist()]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise SteeringError(
                "A prompt is chat messages ({'role': ..., 'content': ...}), a string or token ids."
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise SteeringError("This tokenizer has no chat template; pass token ids instead of messages.")
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def close(self, timeout: float | None = 60.0) -> None:
        """Refuse new requests, serve the queued ones, wait for running batches, then remove the
        hook (removing it earlier would un-steer a batch mid-reply). Requests still running after
        ``timeout`` seconds are cancelled first."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in [self._scheduler, *list(self._running)]:
            if thread is not None:
                thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        running = dict(self._running)
        if running:
            logger.warning("closing the steering engine: cancelling %d running batches", len(running))
            for thread, jobs in running.items():
                for job in jobs:
                    job.handle.cancel()
                thread.join(10.0)  # a cancelled batch stops within one decoding step
        self._hook.remove()

    # ------------------------------------------------------------ validation

    def _validate_edits(self, edits: Sequence[Edit], multiplier: float) -> None:
        if not _is_finite_number(multiplier):
            raise SteeringError(f"multiplier {multiplier!r} is not a finite number.")
        if len(edits) > self.limits.max_edits:
            raise SteeringError(
                f"{len(edits)} edits in one request; at most {self.limits.max_edits} are allowed."
            )
        seen: set[int] = set()
        for edit in edits:
            self._validate_edit(edit, multiplier)
            if edit.feature in seen:
                raise SteeringError(
                    f"feature {edit.feature} appears in more than one edit; keep one edit per feature."
                )
            seen.add(edit.feature)

    def _validate_edit(self, edit: Edit, multiplier: float) -> None:
        if not isinstance(edit, Edit):
            raise SteeringError(f"expected an Edit(feature, strength, mode), got {type(edit).__name__}.")
        feature, d_sae = edit.feature, self.sae.d_sae
        if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < d_sae:
            raise SteeringError(f"unknown feature {feature!r}: valid feature ids are 0 to {d_sae - 1}.")
        if bool(self.hidden[feature]):
            raise SteeringError(f"feature {feature} is hidden in this bundle and cannot be steered.")
        if edit.mode not in MODES:
            raise SteeringError(
                f"unknown mode {edit.mode!r} for feature {feature}; choose one of {', '.join(MODES)}."
            )
        if not _is_finite_number(edit.strength):
            raise SteeringError(f"strength {edit.strength!r} of feature {feature} is not a finite number.")
        bound = self.limits.max_abs_strength
        if abs(edit.strength * multiplier) > bound:
            raise SteeringError(
                f"strength {edit.strength:g} × multiplier {multiplier:g} of feature {feature} is beyond ±{bound:g} "
                "(units of the feature's max activation)."
            )
        if edit.mode == "pin" and edit.strength * multiplier < 0:
            raise SteeringError(
                f"feature {feature} cannot be pinned to a negative activation ({edit.strength * multiplier:g}); "
                "pin to 0 to switch it off, or nudge with a negative strength to push it away."
            )

    def _validate_sampling(self, sampling: SamplingConfig) -> None:
        limits = self.limits
        if (
            not _is_finite_number(sampling.temperature)
            or not 0 <= sampling.temperature <= limits.max_temperature
        ):
            raise SteeringError(
                f"temperature {sampling.temperature!r} must be between 0 and {limits.max_temperature:g}."
            )
        if not _is_finite_number(sampling.top_p) or not 0 < sampling.top_p <= 1:
            raise SteeringError(f"top_p {sampling.top_p!r} must be in (0, 1].")
        if not _is_int(sampling.max_new_tokens) or not 1 <= sampling.max_new_tokens <= limits.max_new_tokens:
            raise SteeringError(
                f"max_new_tokens {sampling.max_new_tokens!r} must be between 1 and {limits.max_new_tokens}."
            )
        if (
            not _is_int(sampling.min_new_tokens)
            or not 0 <= sampling.min_new_tokens <= sampling.max_new_tokens
        ):
            raise SteeringError(
                f"min_new_tokens {sampling.min_new_tokens!r} must be between 0 and max_new_tokens."
            )
        if sampling.seed is not None and (not _is_int(sampling.seed) or sampling.seed < 0):
            raise SteeringError(f"seed {sampling.seed!r} must be a non-negative integer or None.")

    def _validate_prompt(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> None:
        if len(prompt_ids) == 0:
            raise SteeringError("the prompt is empty; send at least one message.")
        budget, why = self.prompt_budget(sampling.max_new_tokens)
        if len(prompt_ids) > budget:
            raise SteeringError(
                f"the prompt is {len(prompt_ids)} tokens but the context budget is {budget} tokens ({why}); "
                "shorten the conversation or ask for fewer new tokens."
            )
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is not None and any(not 0 <= int(t) < vocab for t in prompt_ids):
            raise SteeringError(f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1}).")

    def prompt_budget(self, max_new_tokens: int) -> tuple[int, str]:
        """Most prompt tokens a request with ``max_new_tokens`` may have, and why."""
        budget, why = math.inf, "no limit"
        if self.max_positions:
            budget = self.max_positions - max_new_tokens
            why = f"{self.max_positions} positions - {max_new_tokens} new tokens"
        if self.limits.max_prompt_tokens is not None and self.limits.max_prompt_tokens < budget:
            budget, why = self.limits.max_prompt_tokens, "the server's max_prompt_tokens"
        return int(min(budget, 2**62)), why

    # ------------------------------------------------------------ steering vectors

    def _nudge_vector(self, nudges: Sequence[Edit], multiplier: float) -> torch.Tensor:
        ids = torch.tensor([e.feature for e in nudges])
        amounts = torch.tensor([e.strength for e in nudges]) * multiplier * self.feature_scale[ids]
        directions = self.sae.W_dec.detach()[ids.to(self.sae.W_dec.device)].float()  # (n, d_in)
        return amounts.to(directions.device) @ directions

    def _pin_solve(self, steering: RowSteering, pins: Sequence[Edit], multiplier: float) -> None:
        sae = self.sae
        ids = torch.tensor([e.feature for e in pins], device=sae.W_enc.device)
        enc = sae.W_enc.detach()[:, ids].float()  # (d_in, P)
        dec = sae.W_dec.detach()[ids].float()  # (P, d_in)
        bias = sae.b_enc.detach()[ids].float()
        if sae.cfg.apply_b_dec_to_input:
            bias = bias - sae.b_dec.detach().float() @ enc
        # pre_P(x + c·dec) = pre_P(x) + c·(dec @ enc): solve for c jointly; pinv keeps near-parallel
        # pins (contradictory targets) bounded with a least-squares answer.
        coupling = dec @ enc  # (P, P)
        steering.pin_dec = torch.linalg.pinv(coupling, rtol=1e-5) @ dec
        steering.pin_enc, steering.pin_bias = enc, bias
        values = torch.tensor([e.strength for e in pins]) * multiplier * self.feature_scale[ids.cpu()]
        steering.pin_value = values.to(enc.device)
        threshold = sae.threshold[ids].float() if sae.cfg.activation == "jumprelu" else torch.zeros_like(bias)
        steering.pin_threshold = threshold.clamp(min=0)

    def _steer_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        steering = self._active.get()
        if steering is None:
            return None
        return steer_output(output, steering)

    # ------------------------------------------------------------ batching server

    def _submit(self, request: SteeringRequest, handle_type: type[GenerationStream]) -> GenerationStream:
        prompt_ids = self.prompt_ids(request.prompt)
        self.validate(request.edits, prompt_ids, request.sampling, request.multiplier)
        steered = self.row_steering(request.edits, request.multiplier)
        steerings = [RowSteering(), steered] if request.pair and request.edits else [steered]
        if len(steerings) > self.batching.max_batch_rows:
            raise SteeringError(
                "a pair needs 2 rows but max_batch_rows is 1; raise BatchingConfig.max_batch_rows."
            )
        seed = (
            request.sampling.seed
            if request.sampling.seed is not None
            else random.SystemRandom().randrange(2**31)
        )
        handle = handle_type(self, request, seed, len(steerings))
        with self._cond:
            if self._closed:
                raise SteeringError("the steering engine is closed; create a new one.")
            self._jobs.append(_Job(request, handle, prompt_ids, steerings))
            self._cond.notify_all()
            if self._scheduler is None or not self._scheduler.is_alive():
                self._scheduler = threading.Thread(
                    target=self._schedule, name="steering-scheduler", daemon=True
                )
                self._scheduler.start()
        return handle

    def _scheduler_alive(self) -> bool:
        return self._scheduler is not None and self._scheduler.is_alive()

    def _schedule(self) -> None:
        while True:
            self._slots.acquire()
            batch = self._next_batch()
            if batch is None:
                self._slots.release()
                return
            worker = threading.Thread(target=self._serve, args=(batch,), name="steering-batch", daemon=True)
            self._running[worker] = batch
            worker.start()
            for job in batch:
                job.handle._worker = worker

    def _next_batch(self) -> list[_Job] | None:
        limit = self.batching.max_batch_rows
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.batching.window_s
            while sum(job.rows for job in self._jobs) < limit and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, rows = [], 0
            while self._jobs and rows + self._jobs[0].rows <= limit:
                job = self._jobs.popleft()
                batch.append(job)
                rows += job.rows
            return batch

    def _serve(self, jobs: list[_Job]) -> None:
        try:
            live = []
            for job in jobs:
                if job.handle.cancel_event.is_set():
                    job.handle.finish_reasons = ["cancelled"] * job.rows
                    job.handle._finish("cancelled")
                else:
                    job.handle.status = "running"
                    live.append(job)
            if live:
                self._run_batch(live)
        except BaseException as exc:  # every failure reaches the consumers, whatever its type
            logger.debug("steering batch failed", exc_info=True)
            for job in jobs:
                if not job.handle.done:
                    job.handle._fail(exc)
        finally:
            self._running.pop(threading.current_thread(), None)
            self._slots.release()

    def _run_batch(self, jobs: list[_Job]) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        rows = [
            _RowState(job, local, job.prompt_ids, steering)
            for job in jobs
            for local, steering in enumerate(job.steerings)
        ]
        input_ids, attention_mask = self._left_pad([row.prompt_ids for row in rows])
        steering = BatchSteering.build(
            [row.steering for row in rows], self._device, _hidden_dtype(self.model)
        )
        config = GenerationConfig(
            max_new_tokens=max(row.sampling.max_new_tokens for row in rows),
            do_sample=False,  # RowSampler does the sampling, seeded per row
            num_beams=1,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        sampler = RowSampler(
            [row.sampling for row in rows],
            [row.job.handle.seed for row in rows],
            input_ids.shape[1],
            self.eos_ids,
        )
        streamer = _BatchStreamer(rows, self.decode, self.eos_ids, lambda n: self._count("tokens", n))
        self._count("batches", 1)
        self._count("rows", len(rows))
        token = self._active.set(steering)
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                    stopping_criteria=StoppingCriteriaList([_RowStop(rows, input_ids.shape[1])]),
                    streamer=streamer,
                )
        finally:
            self._active.reset(token)
        streamer.end()  # idempotent: ends requests generate left open (e.g. it hit max_length)

    def _count(self, name: str, amount: int) -> None:
        with self._stats_lock:
            self.stats[name] += amount

    def _left_pad(self, prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[r, width - len(prompt) :] = 1
        device = _input_device(self.model)
        return ids.to(device), mask.to(device)


# ---------------------------------------------------------------- helpers


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hidden_mask(hidden: Any, d_sae: int) -> torch.Tensor:
    """Bool mask (d_sae,) from feature ids or from a bool mask of length d_sae."""
    if isinstance(hidden, torch.Tensor) or hasattr(hidden, "dtype"):
        values = torch.as_tensor(hidden)
        if values.dtype == torch.bool:
            if values.shape != (d_sae,):
                raise SteeringError(f"hidden mask has shape {tuple(values.shape)}; expected ({d_sae},).")
            return values.cpu()
        hidden = values.flatten().tolist()
    mask = torch.zeros(d_sae, dtype=torch.bool)
    ids = [int(i) for i in hidden]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise SteeringError(f"hidden features {bad[:5]} are out of range 0 to {d_sae - 1}.")
    mask[ids] = True
    return mask


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_ids[0] if eos_ids else 0


def _module_device(module: nn.Module, model: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else _input_device(model)


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype
