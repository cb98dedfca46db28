"""The chat panel: each user message gets a default and a steered reply, streamed side by side.

Conversation model. The two columns are two conversations that share the user's messages: the
default column continues with its own earlier replies, the steered column with its own. When the
user sends with no edits, one reply is generated from the default conversation and the two
conversations merge into it again (there is nothing to compare).

Threads. ``send`` (a button callback, on the session's thread) validates and submits the
requests, then one worker thread per reply column reads its stream. Workers never touch widgets
directly: every UI change goes through ``_ui``, which schedules it on the session's document
(captured in ``send``; ``pn.state.curdoc`` is not reliable inside a thread).

After a reply, the features most active on it are listed as chips (click to select) and passed
to ``on_reply_features`` (the app lights them up on the map). They are read without steering:
"what the model sees in this text", so a steered feature appears only if the text carries it.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import panel as pn
import param
import torch

from build_map.bundle import Bundle
from build_map.hooks import install_dispatch, scoped_forward_hook
from build_map.models import resolve_hookpoint
from explorer.card import CSS, LinkedHTML, render_chips, set_or_trigger
from explorer.steering import (
    Edit,
    GenerationStream,
    SamplingConfig,
    SteeringEngine,
    SteeringError,
    SteeringRequest,
)

logger = logging.getLogger(__name__)

N_REPLY_FEATURES = 8
"""Chips shown under each reply."""
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_SEED = 0
_SCORE_CHUNK = 256  # reply tokens encoded at once (d_sae can be 65,536 wide)


# ---------------------------------------------------------------- features active on a reply


class _Captured(Exception):
    """Raised by the capture hook to end a scoring forward pass at the hookpoint."""


class ReplyFeatures:
    """Reads the hookpoint activations of a conversation and ranks SAE features on the reply.

    Records through a scoped forward hook (``build_map.hooks``: only this thread's forward pass,
    no hook added while other threads generate), then ends that forward pass (the layers above
    the hookpoint are not needed).
    Score of a feature = sum over reply tokens of activation / max activation, i.e. "how many
    strongest firings' worth" (comparable across features, the unit of steering strengths).
    """

    def __init__(self, engine: SteeringEngine, bundle: Bundle):
        self.engine = engine
        self.excluded = torch.as_tensor(
            bundle.features["hidden"].to_numpy(bool) | bundle.features["dead"].to_numpy(bool)
        )
        self._module = resolve_hookpoint(engine.model, engine.hookpoint)
        install_dispatch(self._module)  # now, not while other threads run the model

    def top(self, messages: Sequence[dict], reply: str, n: int = N_REPLY_FEATURES) -> list[tuple[int, float]]:
        """[(feature, score)] of the ``n`` highest-scoring visible features on ``reply``."""
        prompt_ids = self.engine.prompt_ids(list(messages))
        reply_ids = self._tokenize(reply)
        if not reply_ids:
            return []
        ids = torch.tensor(
            [prompt_ids + reply_ids], device=self.engine.model.get_input_embeddings().weight.device
        )
        seen: list = []

        def record(_module, _args, output) -> None:
            seen.append(output if isinstance(output, torch.Tensor) else output[0])
            raise _Captured  # the layers after the hookpoint are not needed: stop the forward here

        try:
            with scoped_forward_hook(self._module, record), torch.inference_mode():
                self.engine.model(input_ids=ids)
        except _Captured:
            pass
        if not seen:
            raise RuntimeError(f"the hookpoint {self.engine.hookpoint} did not run in the forward pass")
        hidden = seen[0][0, len(prompt_ids) :]  # (reply tokens, d_model)
        return self._rank(hidden, n)

    def _rank(self, hidden: torch.Tensor, n: int) -> list[tuple[int, float]]:
        sae = self.engine.sae
        scale = self.engine.feature_scale.to(sae.W_dec.device)
        total = torch.zeros(sae.d_sae, device=sae.W_dec.device)
        with torch.inference_mode():
            for start in range(0, hidden.shape[0], _SCORE_CHUNK):
                chunk = hidden[start : start + _SCORE_CHUNK].to(sae.W_dec.device, sae.W_dec.dtype)
                total += (sae.encode(chunk).float() / scale).sum(0)
        total = total.cpu()
        total[self.excluded] = 0.0
        values, indices = total.topk(min(n, sae.d_sae))
        return [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]

    def _tokenize(self, text: str) -> list[int]:
        # The engine decodes under this lock; a fast tokenizer must not be used from two threads.
        lock = getattr(self.engine, "_tokenizer_lock", None) or contextlib.nullcontext()
        with lock:
            return list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- one reply column


def _message_html(role: str, text: str, streaming: bool = False) -> str:
    cursor = " cursor" if streaming else ""
    return f'<div class="msg {role}{cursor}">{html.escape(text)}</div>'


def _notice_html(kind: str, text: str) -> str:
    return f'<div class="notice {kind}">{html.escape(text)}</div>'


@dataclass
class ReplyColumn:
    """One streamed reply: its pane, its conversation, and what happened to it."""

    name: str  # "default" | "steered" | "reply"
    title: str
    messages: list[dict]  # the conversation this reply continues, ending with the user message
    pane: pn.pane.HTML = field(init=False)
    chips: LinkedHTML = field(init=False)
    text: str = ""
    status: str = "queued"  # queued | streaming | finished | cancelled | error
    first_token_at: float | None = None  # perf_counter() of the first and last text received
    last_token_at: float | None = None
    features: list[tuple[int, float]] | None = None  # most active features, once scored

    def __post_init__(self) -> None:
        css_class = "reply steered" if self.name == "steered" else "reply"
        self.role = css_class
        self.pane = pn.pane.HTML(
            _message_html(css_class, "", streaming=True),
            stylesheets=[CSS],
            sizing_mode="stretch_width",
            css_classes=[f"reply-{self.name}"],
        )
        self.chips = LinkedHTML(html="", sizing_mode="stretch_width")

    def view(self) -> pn.Column:
        head = pn.pane.HTML(
            f'<div class="reply-head">{html.escape(self.title)}</div>', stylesheets=[CSS], margin=0
        )
        return pn.Column(head, self.pane, self.chips, sizing_mode="stretch_width", margin=(0, 4))


# ---------------------------------------------------------------- the panel


class ChatPanel(param.Parameterized):
    """Multi-turn chat with default | steered replies; see the module docstring."""

    clicked = param.Integer(default=None, allow_None=True, doc="Feature chip last clicked.")
    busy = param.Boolean(default=False)

    def __init__(
        self,
        engine: SteeringEngine,
        bundle: Bundle,
        get_edits: Callable[[], tuple[list[Edit], float]],
        reply_features: ReplyFeatures | None = None,
        on_reply_features: Callable[[list[int]], None] | None = None,
        on_turn_done: Callable[[ReplyColumn, list[Edit], float], None] | None = None,
        **params,
    ):
        super().__init__(**params)
        self.engine, self.bundle = engine, bundle
        self.get_edits = get_edits
        self.reply_features = reply_features
        self.on_reply_features = on_reply_features
        self.on_turn_done = on_turn_done  # (last column, its edits, multiplier) after a turn ends
        self.last_edits: tuple[list[Edit], float] = ([], 1.0)
        self.history_default: list[dict] = []
        self.history_steered: list[dict] = []
        self._streams: list[GenerationStream] = []
        self._workers: list[threading.Thread] = []
        self._doc = None
        self.last_turn: list[ReplyColumn] = []
        self.sent_at: float | None = None
        self._build_widgets()

    def _build_widgets(self) -> None:
        limits = self.engine.limits
        self.temperature = pn.widgets.FloatSlider(
            label="Temperature",
            start=0.0,
            end=min(2.0, limits.max_temperature),
            step=0.05,
            value=DEFAULT_TEMPERATURE,
            width=140,
        )
        self.max_new_tokens = pn.widgets.IntInput(
            label="Max new tokens",
            start=1,
            end=limits.max_new_tokens,
            value=DEFAULT_MAX_NEW_TOKENS,
            width=110,
        )
        self.seed = pn.widgets.IntInput(label="Seed", start=0, value=DEFAULT_SEED, width=90)
        # Enter sends (Shift+Enter: new line); the typed text is in value_input until then.
        self.input = pn.chat.ChatAreaInput(
            placeholder="Message the model…  (Enter sends, Shift+Enter: new line)",
            sizing_mode="stretch_width",
            css_classes=["chat-input"],
        )
        self.input.param.watch(lambda event: self.send(event.new) if event.new else None, "value")
        self.send_button = pn.widgets.Button(label="Send", color="primary", width=80)
        self.stop_button = pn.widgets.Button(label="Stop", color="warning", width=70, disabled=True)
        self.clear_button = pn.widgets.Button(label="Clear chat", color="light", width=90)
        self.history = pn.Column(
            sizing_mode="stretch_both",
            scroll=True,
            auto_scroll_limit=400,
            view_latest=True,
            css_classes=["chat-history"],
        )
        self.send_button.on_click(lambda event: self.send())
        self.stop_button.on_click(lambda event: self.stop())
        self.clear_button.on_click(lambda event: self.clear())

    def view(self) -> pn.Column:
        controls = pn.Row(self.temperature, self.max_new_tokens, self.seed, sizing_mode="stretch_width")
        buttons = pn.Row(
            self.send_button,
            self.stop_button,
            pn.layout.HSpacer(),
            self.clear_button,
            sizing_mode="stretch_width",
        )
        return pn.Column(
            self.history,
            self.input,
            buttons,
            controls,
            sizing_mode="stretch_both",
            min_height=320,
        )

    # ------------------------------------------------------------ sending

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=float(self.temperature.value),
            max_new_tokens=int(self.max_new_tokens.value or DEFAULT_MAX_NEW_TOKENS),
            seed=int(self.seed.value) if self.seed.value is not None else None,
        )

    def send(self, text: str | None = None) -> list[ReplyColumn]:
        """Start a turn; returns its reply columns (empty when nothing was sent)."""
        text = (self.input.value_input if text is None else text or "").strip()
        if not text or self.busy:
            return []
        self.sent_at = time.perf_counter()
        self._doc = pn.state.curdoc
        edits, multiplier = self.get_edits()
        self.last_edits = (list(edits), multiplier)
        user = {"role": "user", "content": text}
        if edits:
            columns = [
                ReplyColumn("default", "Default", [*self.history_default, user]),
                ReplyColumn("steered", _steered_title(edits, multiplier), [*self.history_steered, user]),
            ]
        else:
            columns = [ReplyColumn("reply", "Reply (no edits)", [*self.history_default, user])]
        turn = pn.Column(
            pn.pane.HTML(_message_html("user", text), stylesheets=[CSS], sizing_mode="stretch_width"),
            pn.Row(*(c.view() for c in columns), sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
            css_classes=["chat-turn"],
        )
        for column in columns:
            column.chips.param.watch(lambda event: set_or_trigger(self, "clicked", event.new), "clicked")
        self.history.append(turn)
        self.input.value_input = ""
        try:
            jobs = self._submit(columns, edits, multiplier)
        except Exception as exc:  # refused (SteeringError) or broken: shown in the chat either way
            if not isinstance(exc, SteeringError):
                logger.exception("Could not submit a chat request")
            reason = (
                "Request refused"
                if isinstance(exc, SteeringError)
                else f"Request failed ({type(exc).__name__})"
            )
            turn.append(
                pn.pane.HTML(
                    _notice_html("error", f"{reason}: {exc}"),
                    stylesheets=[CSS],
                    sizing_mode="stretch_width",
                )
            )
            for column in columns:
                column.status = "error"
                column.pane.object = _message_html(column.role, "")
            self.last_turn = columns
            return columns
        self.last_turn = columns
        self._start(jobs, columns, turn)
        return columns

    def _submit(
        self, columns: list[ReplyColumn], edits: list[Edit], multiplier: float
    ) -> list[tuple[GenerationStream, dict[int, ReplyColumn]]]:
        sampling = self.sampling()
        if len(columns) == 1:
            return [(self.engine.submit(SteeringRequest(columns[0].messages, (), sampling)), {0: columns[0]})]
        default, steered = columns
        # Validate both before submitting either, so a refusal leaves nothing running.
        for column, column_edits in ((default, []), (steered, edits)):
            self.engine.validate(column_edits, self.engine.prompt_ids(column.messages), sampling, multiplier)
        if default.messages == steered.messages:  # one batch, same noise, one request
            stream = self.engine.submit(
                SteeringRequest(steered.messages, tuple(edits), sampling, multiplier, pair=True)
            )
            return [(stream, {0: default, 1: steered})]
        return [
            (self.engine.submit(SteeringRequest(default.messages, (), sampling)), {0: default}),
            (
                self.engine.submit(SteeringRequest(steered.messages, tuple(edits), sampling, multiplier)),
                {0: steered},
            ),
        ]

    def _start(self, jobs, columns: list[ReplyColumn], turn: pn.Column) -> None:
        self.busy = True
        self.send_button.disabled = self.input.disabled_enter = True
        self.stop_button.disabled = False
        self._streams = [stream for stream, _ in jobs]
        remaining = [len(jobs)]
        lock = threading.Lock()

        def finished() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._ui(self._turn_done, columns, turn)

        self._workers = [
            threading.Thread(
                target=self._consume, args=(stream, rows, finished), daemon=True, name="chat-stream"
            )
            for stream, rows in jobs
        ]
        for worker in self._workers:
            worker.start()

    def _consume(self, stream: GenerationStream, rows: dict[int, ReplyColumn], finished: Callable) -> None:
        try:
            for column in rows.values():
                column.status = "streaming"
            for row, piece in stream.events():
                column = rows[row]
                column.last_token_at = time.perf_counter()
                if column.first_token_at is None:
                    column.first_token_at = column.last_token_at
                column.text += piece
                self._ui(self._show, column, True)
            for column in rows.values():
                column.status = "cancelled" if stream.status == "cancelled" else "finished"
                self._ui(self._show, column, False)
        except Exception as exc:  # every failure is shown in the chat, never a quiet stop
            logger.exception("Generation failed")
            for column in rows.values():
                column.status = "error"
                self._ui(self._show_error, column, f"Generation failed: {type(exc).__name__}: {exc}")
        finally:
            self._score(rows)
            finished()

    def _score(self, rows: dict[int, ReplyColumn]) -> None:
        if self.reply_features is None:
            return
        for column in rows.values():
            if not column.text.strip() or column.status == "error":
                continue
            try:
                column.features = self.reply_features.top(column.messages, column.text)
            except Exception as exc:
                logger.exception("Could not read the features of a reply")
                self._ui(self._show_error, column, f"Could not read the reply's features: {exc}")
                continue
            chips = render_chips(self.bundle, column.features, "Most active on this reply")
            self._ui(setattr, column.chips, "html", chips)

    # ------------------------------------------------------------ UI updates (session thread)

    def _ui(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the session's thread (directly when there is no server session)."""
        doc = self._doc
        if doc is None or doc.session_context is None:
            fn(*args)
            return
        try:
            doc.add_next_tick_callback(lambda: fn(*args))
        except Exception:  # the session is gone (tab closed): stop generating for nobody
            logger.debug("Session closed; cancelling its generation", exc_info=True)
            self.stop()

    def _show(self, column: ReplyColumn, streaming: bool) -> None:
        text = column.text
        if column.status == "cancelled":
            text += " [stopped]"
        column.pane.object = _message_html(column.role, text, streaming=streaming)

    def _show_error(self, column: ReplyColumn, message: str) -> None:
        column.pane.object = _message_html(column.role, column.text) + _notice_html("error", message)

    def _turn_done(self, columns: list[ReplyColumn], turn: pn.Column) -> None:
        if len(columns) == 1:
            reply = columns[0]
            if reply.status != "error":
                self.history_default = [*reply.messages, {"role": "assistant", "content": reply.text}]
                self.history_steered = list(self.history_default)
        else:
            default, steered = columns
            if default.status != "error":
                self.history_default = [*default.messages, {"role": "assistant", "content": default.text}]
            if steered.status != "error":
                self.history_steered = [*steered.messages, {"role": "assistant", "content": steered.text}]
        self.busy = False
        self.send_button.disabled = self.input.disabled_enter = False
        self.stop_button.disabled = True
        self._streams = []
        features = columns[-1].features
        if features is not None and self.on_reply_features is not None:
            self.on_reply_features([f for f, _ in features])
        last = columns[-1]
        if self.on_turn_done is not None and last.status != "error" and last.text.strip():
            edits, multiplier = self.last_edits if last.name == "steered" else ([], 1.0)
            try:
                self.on_turn_done(last, edits, multiplier)
            except Exception:
                logger.exception("on_turn_done failed")

    # ------------------------------------------------------------ other controls

    def stop(self) -> None:
        for stream in self._streams:
            stream.cancel()

    def clear(self) -> None:
        self.stop()
        self.history.clear()
        self.history_default, self.history_steered = [], []
        if self.on_reply_features is not None:
            self.on_reply_features([])

    def wait(self, timeout: float = 60.0) -> None:
        """Block until the current turn's workers end (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))


def _steered_title(edits: Sequence[Edit], multiplier: float) -> str:
    shown = ", ".join(f"#{e.feature} {e.mode} {e.strength:g}" for e in edits[:3])
    more = f" +{len(edits) - 3}" if len(edits) > 3 else ""
    scale = f" ×{multiplier:g}" if multiplier != 1 else ""
    return f"Steered ({shown}{more}{scale})"
