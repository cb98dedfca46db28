"""The steering engine: generate with SAE features steered, batching concurrent requests.

One forward hook, installed once on the hookpoint module and registered first (``prepend=True``),
so observers (attribution, reply features) see the steered stream. Per-request edits are never
global state: the hook reads a per-batch-row steering spec (``build_map.steering.vectors``) from a
``ContextVar`` that the generating thread sets for the duration of its ``generate`` call, so every
row of a batch (row 0 unsteered, row 1 steered, rows of other users) gets its own vector.

Sampling is seeded per row (``build_map.steering.sampling``), batching is the scheduler's
(``build_map.steering.scheduler``), streaming the streamer's (``build_map.steering.streaming``).
No UI here: the server calls this module, and tests drive it without a server.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from build_map.common.memory import trim_freed_memory
from build_map.lm.hookpoints import (
    hidden_dtype,
    input_device,
    module_device,
    normalize_hookpoint,
    resolve_hookpoint,
)
from build_map.lm.hooks import install_dispatch
from build_map.lm.tokens import chat_prompt_ids, eos_token_ids, left_pad, pad_token_id
from build_map.sae.model import SparseAutoencoder
from build_map.steering.requests import (
    DEFAULT_SCOPE,
    BatchingConfig,
    Edit,
    Prompt,
    SamplingConfig,
    SteeringError,
    SteeringLimits,
    SteeringRequest,
    SteeringScope,
)
from build_map.steering.sampling import RowSampler
from build_map.steering.scheduler import BatchScheduler
from build_map.steering.streaming import BatchStreamer, GenerationStream, Job, RowState, RowStop, TextStream
from build_map.steering.validation import check_edits, check_messages, check_sampling
from build_map.steering.vectors import (
    BatchSteering,
    RowSteering,
    effective_scales,
    hidden_mask,
    row_steering,
    scope_positions,
    steer_output,
)


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
        generator: Any = None,
    ):
        self.model = model
        # None: this engine generates (batched HF generate, forward hook). Else an object whose
        # ``run(engine, jobs)`` does (``interp_backend.InterpGenerator``); the rest stays here.
        self.generator = generator
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
        self.hidden = hidden_mask(hidden, sae.d_sae)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self.special_ids = sorted(
            {int(i) for i in getattr(tokenizer, "all_special_ids", [])} | set(self.eos_ids)
        )
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.stats = {"batches": 0, "rows": 0, "tokens": 0}  # generate calls, rows, generated tokens
        self._stats_lock = threading.Lock()
        self._module = resolve_hookpoint(model, self.hookpoint)
        self._device = module_device(self._module, model)
        self._active: contextvars.ContextVar[BatchSteering | None] = contextvars.ContextVar(
            f"steering_{id(self)}", default=None
        )
        # First among the module's hooks, so observers (attribution, reply scoring) see the steered
        # residual stream whatever order the hooks were added in.
        self._hook = self._module.register_forward_hook(self._steer_hook, prepend=True)
        # Attribution, sweeps and reply scoring hook this module per request: install their
        # dispatcher now, never while other threads are generating (build_map.lm.hooks).
        install_dispatch(self._module)
        self._tokenizer_lock = threading.Lock()
        self._scheduler = BatchScheduler(self.batching, self._run_batch)

    # ------------------------------------------------------------ requests

    def validate(
        self,
        edits: Sequence[Edit],
        prompt_ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
    ) -> None:
        """Raise SteeringError with a clear message if the request cannot be served."""
        sampling = sampling or SamplingConfig()
        check_sampling(sampling, self.limits)
        self.check_edits(edits, multiplier)
        pins = [e.feature for e in edits if e.mode == "pin"]
        if pins and self.generator is not None:
            raise SteeringError(
                f"pin (features {pins}) needs the SAE encoder inside the forward pass, which the "
                f"{self.generator.backend} backend cannot run; use --backend hf for pins, or nudge instead."
            )
        self._check_prompt(prompt_ids, sampling)

    def check_edits(self, edits: Sequence[Edit], multiplier: float = 1.0) -> None:
        check_edits(edits, multiplier, self.sae.d_sae, self.hidden, self.limits)

    def submit(self, request: SteeringRequest) -> GenerationStream:
        """Queue a request; it is batched with others arriving within the batching window."""
        return self._submit(request, GenerationStream)

    def stream(
        self,
        prompt: Prompt,
        edits: Sequence[Edit] = (),
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
        scope: SteeringScope = DEFAULT_SCOPE,
    ) -> TextStream:
        """Stream the steered reply; iterating yields text pieces."""
        request = SteeringRequest(prompt, tuple(edits), sampling or SamplingConfig(), multiplier, scope=scope)
        return self._submit(request, TextStream)

    def stream_pair(
        self,
        prompt: Prompt,
        edits: Sequence[Edit],
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
        scope: SteeringScope = DEFAULT_SCOPE,
    ) -> GenerationStream:
        """Default (row 0) and steered (row 1) replies in one batch with the same noise; yields
        (row, piece). With no edits only row 0 is generated (the steered reply equals it)."""
        request = SteeringRequest(
            prompt, tuple(edits), sampling or SamplingConfig(), multiplier, pair=True, scope=scope
        )
        return self.submit(request)

    def generate(
        self,
        prompt: Prompt,
        edits: Sequence[Edit] = (),
        sampling: SamplingConfig | None = None,
        multiplier: float = 1.0,
        timeout: float | None = None,
        scope: SteeringScope = DEFAULT_SCOPE,
    ) -> str:
        """The steered reply as one string (the concatenation of what ``stream`` yields)."""
        return self.stream(prompt, edits, sampling, multiplier, scope).result(timeout)[0]

    @contextlib.contextmanager
    def steered(
        self,
        rows: Sequence[Sequence[Edit]],
        multiplier: float = 1.0,
        scope: SteeringScope = DEFAULT_SCOPE,
        prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Steer plain forward calls in this thread: ``rows[b]`` are the edits of batch row b.
        ``prompts``: the left-padded prompt ids and mask (``left_pad``) that the passes start with,
        for ``scope`` to leave their positions unsteered; without them every position is steered."""
        for edits in rows:
            self.check_edits(edits, multiplier)
        positions = None if prompts is None else self.scope_positions(*prompts, [scope] * len(rows))
        steering = BatchSteering.build(
            [self.row_steering(edits, multiplier) for edits in rows], self._device, hidden_dtype(self.model),
            positions,
        )  # fmt: skip
        token = self._active.set(steering)
        try:
            yield
        finally:
            self._active.reset(token)

    def scope_positions(
        self, padded_ids: torch.Tensor, mask: torch.Tensor, scopes: Sequence[SteeringScope]
    ) -> torch.Tensor | None:
        return scope_positions(padded_ids, mask, scopes, self.special_ids)

    def row_steering(self, edits: Sequence[Edit], multiplier: float = 1.0) -> RowSteering:
        """Precompute one row's nudge vector and pin solve (edits must be valid)."""
        return row_steering(self.sae, self.feature_scale, edits, multiplier)

    # ------------------------------------------------------------ text

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages go through the chat template with the generation
        prompt appended; a str is one user message; ids pass through."""
        if isinstance(prompt, torch.Tensor):
            prompt = [int(t) for t in prompt.flatten().tolist()]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, (list, tuple)):
            raise SteeringError(
                "A prompt is chat messages ({'role': ..., 'content': ...}), a string or token ids; "
                f"got {type(prompt).__name__}."
            )
        prompt = list(prompt)
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(self.tokenizer)
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise SteeringError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1}).")
            return prompt
        check_messages(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            raise SteeringError("This tokenizer has no chat template; pass token ids instead of messages.")
        with self._tokenizer_lock:
            return chat_prompt_ids(self.tokenizer, prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens), e.g. a reply to read back."""
        # A fast tokenizer must not be used from two threads at once; decoding runs in workers.
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prompt_budget(self, max_new_tokens: int) -> tuple[int, str]:
        """Most prompt tokens a request with ``max_new_tokens`` may have, and why."""
        budget, why = math.inf, "no limit"
        if self.max_positions:
            budget = self.max_positions - max_new_tokens
            why = f"{self.max_positions} positions - {max_new_tokens} new tokens"
        if self.limits.max_prompt_tokens is not None and self.limits.max_prompt_tokens < budget:
            budget, why = self.limits.max_prompt_tokens, "the server's max_prompt_tokens"
        return int(min(budget, 2**62)), why

    # ------------------------------------------------------------ lifetime

    def scheduler_alive(self) -> bool:
        return self._scheduler.alive()

    def close(self, timeout: float | None = 60.0) -> None:
        """Refuse new requests, serve the queued ones, wait for running batches, then remove the
        hook (removing it earlier would un-steer a batch mid-reply). Requests still running after
        ``timeout`` seconds are cancelled first."""
        self._scheduler.close(timeout)
        self._hook.remove()

    # ------------------------------------------------------------ internals

    def _check_prompt(self, prompt_ids: Sequence[int], sampling: SamplingConfig) -> None:
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

    def _steer_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        steering = self._active.get()
        if steering is None:
            return None
        return steer_output(output, steering)

    def _submit(self, request: SteeringRequest, handle_type: type[GenerationStream]) -> GenerationStream:
        prompt_ids = self.prompt_ids(request.prompt)
        self.validate(request.edits, prompt_ids, request.sampling, request.multiplier)
        steered = self.row_steering(request.edits, request.multiplier)
        steerings = [RowSteering(), steered] if request.pair and request.edits else [steered]
        if len(steerings) > self.batching.max_batch_rows:
            raise SteeringError(
                "a pair needs 2 rows but max_batch_rows is 1; raise BatchingConfig.max_batch_rows."
            )
        seed = request.sampling.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        handle = handle_type(self, request, seed, len(steerings))
        self._scheduler.submit(Job(request, handle, prompt_ids, steerings))
        return handle

    def _run_batch(self, jobs: list[Job]) -> None:
        if self.generator is not None:
            self.generator.run(self, jobs)
            if self.batching.trim_memory:
                trim_freed_memory()
            return
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        rows = [
            RowState(job, local, job.prompt_ids, steering)
            for job in jobs
            for local, steering in enumerate(job.steerings)
        ]
        ids, mask = left_pad([row.prompt_ids for row in rows], self.pad_id)
        input_ids, attention_mask = ids.to(input_device(self.model)), mask.to(input_device(self.model))
        positions = self.scope_positions(ids, mask, [row.job.request.scope for row in rows])
        steering = BatchSteering.build(
            [row.steering for row in rows], self._device, hidden_dtype(self.model), positions
        )
        config = GenerationConfig(
            max_new_tokens=max(row.sampling.max_new_tokens for row in rows),
            do_sample=False,  # RowSampler does the sampling, seeded per row
            num_beams=1,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        seeds = [row.job.handle.seed for row in rows]
        sampler = RowSampler([row.sampling for row in rows], seeds, input_ids.shape[1], self.eos_ids)
        streamer = BatchStreamer(rows, self.decode, self.eos_ids, lambda n: self._count("tokens", n))
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
                    stopping_criteria=StoppingCriteriaList([RowStop(rows, input_ids.shape[1])]),
                    streamer=streamer,
                )
        finally:
            self._active.reset(token)
            del steering, sampler, input_ids, attention_mask  # unreferenced, so the trim can free them
            if self.batching.trim_memory:
                trim_freed_memory()  # a reply frees far more than it keeps: hand it back
        streamer.end()  # idempotent: ends requests generate left open (e.g. it hit max_length)

    def _count(self, name: str, amount: int) -> None:
        with self._stats_lock:
            self.stats[name] += amount
