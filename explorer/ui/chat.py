"""The chat panel: each user message gets a default and a steered reply, streamed side by side.

Conversation model. The two columns are two conversations that share the user's messages: the
default column continues with its own earlier replies, the steered column with its own. When the
user sends with no edits, one reply is generated from the default conversation and the two
conversations merge into it again (there is nothing to compare).

Threads. ``send`` (a button callback, on the session's thread) validates and submits the
requests, then one worker thread per request reads its stream; every UI change goes back to the
session's thread through ``explorer.ui.background``.

After a reply, the features most active on it (``build_map.steering.text_features``, most specific
first) are listed as chips (click to select) and passed to ``on_reply_features`` (the app lights
them up on the map).
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import panel as pn
import param

from build_map.bundle.read import Bundle
from build_map.steering.engine import SteeringEngine
from build_map.steering.history import recent_turns
from build_map.steering.requests import (
    DEFAULT_SCOPE,
    Edit,
    SamplingConfig,
    SteeringError,
    SteeringRequest,
    SteeringScope,
)
from build_map.steering.streaming import GenerationStream
from build_map.steering.text_features import TextFeatures
from build_map.steering.validation import MAX_PRESENCE_PENALTY
from explorer.ui.background import Background
from explorer.ui.components import LinkedHTML, set_or_trigger
from explorer.ui.html import CSS, SPECIFIC_UNIT, message_html, muted, notice, render_chips

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_SEED = 0
# Presence penalty (build_map.steering.requests.SamplingConfig): set from bench/bench_steer_probe.py
# --presence-penalty on the dev prompts; see docs/ARCHITECTURE.md, "Repetition penalty".
DEFAULT_PRESENCE_PENALTY = 0.0
HISTORY_TOKENS = 256
"""Prompt tokens a reply sees at most: the oldest turns are left out beyond it (and the chat says
so), so a turn's cost stops growing with the conversation. A turn costs about linearly in its
prompt (8 rows × 40 new tokens on the demo, 2-core CPU: 110 prompt tokens 8.4 s, 221 11.6 s, 332
14.1 s): 256 keeps the tenth turn within 1.5× the second; ``explore --history-tokens`` trades
speed for memory of the conversation."""


# ---------------------------------------------------------------- one reply column


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
            message_html(css_class, "", streaming=True),
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
        text_features: TextFeatures | None = None,
        on_reply_features: Callable[[list[int]], None] | None = None,
        on_turn_done: Callable[[ReplyColumn, list[Edit], float], None] | None = None,
        sort_by: Callable[[], str] = lambda: "relevance",
        history_tokens: int | None = HISTORY_TOKENS,
        **params,
    ):
        super().__init__(**params)
        self.engine, self.bundle = engine, bundle
        self.history_tokens = history_tokens  # prompt tokens a reply sees at most (oldest turns go)
        self.get_edits = get_edits
        self.text_features = text_features
        self.on_reply_features = on_reply_features
        self.on_turn_done = on_turn_done  # (last column, its edits, multiplier) after a turn ends
        self.sort_by = sort_by  # the order of the reply-feature chips (explorer.ui.html.SORTS)
        self.last_edits: tuple[list[Edit], float] = ([], 1.0)
        self.history_default: list[dict] = []
        self.history_steered: list[dict] = []
        self._streams: list[GenerationStream] = []
        self.background = Background("chat-stream", on_session_gone=self.stop)
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
        self.presence_penalty = pn.widgets.FloatSlider(
            label="Repetition penalty", start=0.0, end=MAX_PRESENCE_PENALTY, step=0.1,
            value=DEFAULT_PRESENCE_PENALTY, width=140,
        )  # fmt: skip
        self.steer_prompt = pn.widgets.Checkbox(
            label="steer the prompt too", value=DEFAULT_SCOPE.prompt,
        )  # fmt: skip
        self.steer_special = pn.widgets.Checkbox(
            label="steer special tokens", value=DEFAULT_SCOPE.special_tokens,
        )  # fmt: skip
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
        # The penalty shares the row of the other steering switches: a fourth control in the row
        # above pushed the seed out of the pane.
        scope = pn.Row(
            self.presence_penalty, self.steer_prompt, self.steer_special, sizing_mode="stretch_width"
        )
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
            scope,
            sizing_mode="stretch_both",
            min_height=320,
        )

    # ------------------------------------------------------------ sending

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=float(self.temperature.value),
            presence_penalty=float(self.presence_penalty.value),
            max_new_tokens=int(self.max_new_tokens.value or DEFAULT_MAX_NEW_TOKENS),
            seed=int(self.seed.value) if self.seed.value is not None else None,
        )

    def scope(self) -> SteeringScope:
        return SteeringScope(
            prompt=bool(self.steer_prompt.value), special_tokens=bool(self.steer_special.value)
        )

    def send(self, text: str | None = None) -> list[ReplyColumn]:
        """Start a turn; returns its reply columns (empty when nothing was sent)."""
        text = (self.input.value_input if text is None else text or "").strip()
        if not text or self.busy:
            return []
        self.sent_at = time.perf_counter()
        self.background.capture()
        edits, multiplier = self.get_edits()
        self.last_edits = (list(edits), multiplier)
        user = {"role": "user", "content": text}
        default, dropped = self._window([*self.history_default, user])
        if edits:
            steered, dropped_steered = self._window([*self.history_steered, user])
            dropped = max(dropped, dropped_steered)
            columns = [
                ReplyColumn("default", "Default", default),
                ReplyColumn("steered", _steered_title(edits, multiplier), steered),
            ]
        else:
            columns = [ReplyColumn("reply", "Reply (no edits)", default)]
        parts = [pn.pane.HTML(message_html("user", text), stylesheets=[CSS], sizing_mode="stretch_width")]
        if dropped:
            note = (
                f"The model sees the newest turns only: {dropped} earlier turn(s) left out, so the "
                f"conversation fits {self.history_tokens} tokens and each turn stays fast."
            )
            parts.append(pn.pane.HTML(muted(note), stylesheets=[CSS], sizing_mode="stretch_width"))
        turn = pn.Column(
            *parts,
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
                    notice("error", f"{reason}: {exc}"), stylesheets=[CSS], sizing_mode="stretch_width"
                )
            )
            for column in columns:
                column.status = "error"
                column.pane.object = message_html(column.role, "")
            self.last_turn = columns
            return columns
        self.last_turn = columns
        self._start(jobs, columns, turn)
        return columns

    def _window(self, messages: list[dict]) -> tuple[list[dict], int]:
        """The newest turns of ``messages`` that fit ``history_tokens``; a prompt the engine cannot
        read is passed on whole, for the engine to refuse with its own message."""
        try:
            return recent_turns(messages, lambda m: len(self.engine.prompt_ids(m)), self.history_tokens)
        except SteeringError:
            return messages, 0

    def _submit(
        self, columns: list[ReplyColumn], edits: list[Edit], multiplier: float
    ) -> list[tuple[GenerationStream, dict[int, ReplyColumn]]]:
        sampling, scope = self.sampling(), self.scope()
        if len(columns) == 1:
            return [(self.engine.submit(SteeringRequest(columns[0].messages, (), sampling)), {0: columns[0]})]
        default, steered = columns
        # Validate both before submitting either, so a refusal leaves nothing running.
        for column, column_edits in ((default, []), (steered, edits)):
            self.engine.validate(column_edits, self.engine.prompt_ids(column.messages), sampling, multiplier)
        if default.messages == steered.messages:  # one batch, same noise, one request
            stream = self.engine.stream_pair(steered.messages, edits, sampling, multiplier, scope)
            return [(stream, {0: default, 1: steered})]
        return [
            (self.engine.submit(SteeringRequest(default.messages, (), sampling)), {0: default}),
            (
                self.engine.submit(
                    SteeringRequest(steered.messages, tuple(edits), sampling, multiplier, scope=scope)
                ),
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
                self.background.call(self._turn_done, columns, turn)

        for stream, rows in jobs:
            self.background.spawn(self._consume, stream, rows, finished)

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
                self.background.call(self._show, column, True)
            for column in rows.values():
                column.status = "cancelled" if stream.status == "cancelled" else "finished"
                self.background.call(self._show, column, False)
        except Exception as exc:  # every failure is shown in the chat, never a quiet stop
            logger.exception("Generation failed")
            for column in rows.values():
                column.status = "error"
                self.background.call(
                    self._show_error, column, f"Generation failed: {type(exc).__name__}: {exc}"
                )
        finally:
            self._score(rows)
            finished()

    def _score(self, rows: dict[int, ReplyColumn]) -> None:
        if self.text_features is None:
            return
        for column in rows.values():
            if not column.text.strip() or column.status == "error":
                continue
            try:
                column.features = self.text_features.on_reply(column.messages, column.text)
            except Exception as exc:
                logger.exception("Could not read the features of a reply")
                self.background.call(self._show_error, column, f"Could not read the reply's features: {exc}")
                continue
            chips = render_chips(
                self.bundle, column.features, "Most active on this reply", self.sort_by(), unit=SPECIFIC_UNIT
            )
            self.background.call(setattr, column.chips, "html", chips)

    # ------------------------------------------------------------ UI updates (session thread)

    def _show(self, column: ReplyColumn, streaming: bool) -> None:
        text = column.text
        if column.status == "cancelled":
            text += " [stopped]"
        column.pane.object = message_html(column.role, text, streaming=streaming)

    def _show_error(self, column: ReplyColumn, message: str) -> None:
        column.pane.object = message_html(column.role, column.text) + notice("error", message)

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
        self.background.wait(timeout)


def _steered_title(edits: Sequence[Edit], multiplier: float) -> str:
    shown = ", ".join(f"#{e.feature} {e.mode} {e.strength:g}" for e in edits[:3])
    more = f" +{len(edits) - 3}" if len(edits) > 3 else ""
    scale = f" ×{multiplier:g}" if multiplier != 1 else ""
    return f"Steered ({shown}{more}{scale})"
