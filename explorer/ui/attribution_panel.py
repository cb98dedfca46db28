"""“Why this token?”: click a token of the last reply to see which features made the model write it
(activation × gradient, ``build_map.steering.attribution``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import pandas as pd
import panel as pn
import param

from build_map.bundle.read import Bundle
from build_map.steering.attribution import ReplyTokens, attribute_with_engine, reply_tokens
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import DEFAULT_SCOPE, Edit, SteeringScope
from explorer.ui.background import HEAVY_WORK, Background
from explorer.ui.components import LinkedHTML, TokenPicker, set_or_trigger
from explorer.ui.html import CSS, muted, notice, render_chips, render_tokens, show_token

logger = logging.getLogger(__name__)

N_ATTRIBUTION = 10
"""Features listed for a clicked token."""


class AttributionPanel(param.Parameterized):
    clicked = param.Integer(default=None, allow_None=True, doc="Feature chip last clicked.")

    def __init__(
        self, bundle: Bundle, engine: SteeringEngine, highlight: Callable[[str, list[int]], None], **params
    ):
        super().__init__(**params)
        self.bundle, self.engine, self.highlight = bundle, engine, highlight
        self.background = Background("explorer-attribution")
        self.scope = DEFAULT_SCOPE
        # Hidden features are never shown; dead ones cannot explain anything.
        self.excluded = bundle.features["hidden"].to_numpy(bool) | bundle.features["dead"].to_numpy(bool)
        self.tokens = TokenPicker(html="", sizing_mode="stretch_width")
        self.tokens.param.watch(lambda event: self.start(event.new), "clicked")
        self.status = pn.pane.HTML(
            muted("After a reply, click one of its tokens to see which features made the model write it."),
            stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5),
        )  # fmt: skip
        self.chips = LinkedHTML(html="", sizing_mode="stretch_width")
        self.chips.param.watch(lambda event: set_or_trigger(self, "clicked", event.new), "clicked")
        self.frame: pd.DataFrame | None = None
        self._reply: tuple[ReplyTokens, list[Edit], float] | None = None  # shown reply, its steering

    def view(self) -> pn.Column:
        return pn.Column(self.status, self.tokens, self.chips, sizing_mode="stretch_width", margin=0)

    def show_reply(
        self,
        messages: list[dict],
        text: str,
        edits: Sequence[Edit] = (),
        multiplier: float = 1.0,
        scope: SteeringScope = DEFAULT_SCOPE,
    ) -> None:
        """Show a finished reply's tokens for attribution (``edits``, ``scope``: the steering it
        was made with)."""
        self.scope = scope
        if not text.strip():
            self.tokens.html = ""
            self._reply = None
            return
        tokens = reply_tokens(self.engine, messages, text)
        self._reply = (tokens, list(edits), multiplier)
        self.tokens.html = render_tokens(tokens.pieces)
        self.chips.html = ""
        self.status.object = muted("Click a token of the last reply to explain it.")

    def start(self, index: int | None, background: bool = True) -> threading.Thread | None:
        if index is None or self._reply is None:
            return None
        n_reply = len(self._reply[0].pieces)
        if not 0 <= index < n_reply:
            self.status.object = notice("error", f"Token {index} is not in the reply (0 to {n_reply - 1}).")
            return None
        self.background.capture()
        self.status.object = notice("info", f"Attributing token {index}: running…")
        if background:
            return self.background.spawn(self._job, index)
        self._job(index)
        return None

    def clear(self) -> None:
        self._reply = None
        self.tokens.html = self.chips.html = ""
        self.highlight("attribution", [])

    def wait(self, timeout: float = 120.0) -> None:
        self.background.wait(timeout)

    def _job(self, index: int) -> None:
        tokens, edits, multiplier = self._reply
        position = tokens.start + index - 1  # the token at start + index is predicted one position before
        try:
            with HEAVY_WORK:
                frame = attribute_with_engine(self.engine, tokens.ids, position, edits, multiplier,
                                              prompt_length=tokens.start, scope=self.scope,
                                              top_k=N_ATTRIBUTION, hidden=self.excluded)  # fmt: skip
        except Exception as exc:
            logger.exception("Attribution failed")
            self.background.call(
                setattr, self.status, "object", notice("error", f"Attribution failed: {exc}")
            )
            return
        self.background.call(self._done, index, frame)

    def _done(self, index: int, frame: pd.DataFrame) -> None:
        self.frame = frame
        token = self.engine.decode([int(frame.attrs["target_token"])])
        scored = [(int(f), float(s)) for f, s in zip(frame["feature"], frame["attribution"], strict=True)]
        self.status.object = (
            f'<p class="muted">Token {index} “{show_token(token)}” (log p {frame.attrs["logprob"]:.2f}): '
            "features by activation × gradient (positive = made it more likely).</p>"
        )
        self.chips.html = render_chips(self.bundle, scored, "Attribution") or muted("No feature.")
        self.highlight("attribution", [f for f, _ in scored])
