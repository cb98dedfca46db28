"""Streaming replies out of one batched ``generate`` call, and the handle a consumer reads.

``BatchStreamer`` is a transformers streamer for a whole batch (transformers' own ones take one
row): it decodes each row's new tokens and sends the new text to that row's request, and ends a
request as soon as its own rows stop (end of turn, its max_new_tokens, or cancel). The consumer's
``GenerationStream`` yields ``(row, text_piece)`` events; an error in the worker is raised there,
never a quiet end of text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers.generation.streamers import BaseStreamer

from build_map.steering.requests import (
    BatchingConfig,
    GenerationError,
    SamplingConfig,
    SteeringRequest,
    StreamTimeout,
)
from build_map.steering.vectors import RowSteering

logger = logging.getLogger(__name__)


class StepStreamer(BaseStreamer):
    """A streamer that skips the prompt ``generate`` passes first and hands each decoding step's
    new tokens, (batch,) or (batch, 1), to ``step``; ``end`` is called once generation stops."""

    def __init__(self) -> None:
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.step(value)

    def step(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


class RowState:
    """One batch row: the tokens it produced, the text already sent, and why it stopped."""

    def __init__(self, job: Job, local_row: int, prompt_ids: list[int], steering: RowSteering):
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


class RowStop:
    """Per-row stopping: a row is done at its own max_new_tokens or when its request is cancelled."""

    def __init__(self, rows: Sequence[RowState], prompt_length: int):
        self.rows = rows
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        done = [
            step >= row.sampling.max_new_tokens or row.job.handle.cancel_event.is_set() for row in self.rows
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class BatchStreamer(StepStreamer):
    """Streamer for a whole batch: decodes each row's new tokens and sends the new text to the
    row's request; ends a request as soon as its rows stop."""

    def __init__(
        self,
        rows: Sequence[RowState],
        decode: Callable[[Sequence[int]], str],
        eos_ids: Iterable[int],
        count_tokens: Callable[[int], None],
    ):
        super().__init__()
        self.rows = rows
        self.decode = decode
        self.count_tokens = count_tokens  # called with each row's token count when it stops
        self.eos_ids = set(eos_ids)
        self._lock = threading.Lock()  # ``accept`` from several worker threads

    def step(self, value: torch.Tensor) -> None:
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist(), strict=True):
            self._accept(row, int(token))
        self._finish_jobs()

    def accept(self, row: RowState, token: int) -> None:
        """One row's next token, for generators that run rows one by one (``interp_backend``)."""
        with self._lock:
            self._accept(row, int(token))
            self._finish_jobs()

    def end(self) -> None:
        with self._lock:
            for row in self.rows:
                if row.reason is None:
                    self._close(row, "cancelled" if row.job.handle.cancel_event.is_set() else "length")
            self._finish_jobs()

    def _accept(self, row: RowState, token: int) -> None:
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

    def _send(self, row: RowState, final: bool) -> None:
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

    def _close(self, row: RowState, reason: str) -> None:
        self._send(row, final=True)
        self.count_tokens(len(row.tokens))  # before the request ends, so its consumer sees it
        row.reason = reason
        row.job.handle.finish_reasons[row.local_row] = reason
        row.job.handle.token_ids[row.local_row] = list(row.tokens)

    def _finish_jobs(self) -> None:
        for job in {id(row.job): row.job for row in self.rows}.values():
            reasons = [row.reason for row in self.rows if row.job is job]
            if not job.handle.done and None not in reasons:
                job.handle._finish("cancelled" if "cancelled" in reasons else "finished")


class StreamOwner(Protocol):
    """What a stream asks of the engine that serves it."""

    batching: BatchingConfig

    def scheduler_alive(self) -> bool: ...


class GenerationStream:
    """What ``submit`` returns: iterate for ``(row, text_piece)`` events (row 0 default, row 1
    steered for a pair); ``cancel()`` stops it early and the stream then ends with status
    ``cancelled``; an error in the worker is raised here, never a quiet end of text."""

    def __init__(self, engine: StreamOwner, request: SteeringRequest, seed: int, rows: int):
        self.engine = engine
        self.request = request
        self.seed = seed
        self.rows = rows
        self.texts = [""] * rows
        self.finish_reasons: list[str | None] = [None] * rows
        self.token_ids: list[list[int]] = [[] for _ in range(rows)]  # each row's reply, end of turn excluded
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
        return worker.is_alive() if worker is not None else self.engine.scheduler_alive()

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
class Job:
    """One submitted request: its handle, prompt and the steering of each of its rows."""

    request: SteeringRequest
    handle: GenerationStream
    prompt_ids: list[int]
    steerings: list[RowSteering]

    @property
    def rows(self) -> int:
        return len(self.steerings)
