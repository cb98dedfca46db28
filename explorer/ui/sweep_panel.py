"""The strength sweep of the selected feature, on request: a chart of effect and coherence and the
suggested window of strengths (``build_map.steering.sweep``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import pandas as pd
import panel as pn

from build_map.bundle.read import Bundle
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import Edit
from build_map.steering.sweep import DEFAULT_PROMPTS, sweep
from build_map.steering.sweep_plots import sweep_figure
from build_map.steering.sweep_window import SweepError, suggest_window, window_text
from explorer.ui.background import HEAVY_WORK, Background
from explorer.ui.html import CSS, esc, feature_name, notice

logger = logging.getLogger(__name__)

SWEEP_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
"""Strengths (× max activation) of the on-request sweep: few, so it answers in seconds."""
SWEEP_PROMPTS = DEFAULT_PROMPTS[:2]
SWEEP_TOKENS = 24


class SweepPanel:
    def __init__(self, bundle: Bundle, engine: SteeringEngine, selected: Callable[[], int | None]):
        self.bundle, self.engine, self.selected = bundle, engine, selected
        self.background = Background("explorer-sweep")
        self.button = pn.widgets.Button(label="Sweep strength", color="light", width=130, disabled=True)
        self.button.on_click(lambda event: self.start())
        self.status = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))
        self.plot = pn.pane.Bokeh(None, sizing_mode="stretch_width")
        self.box = pn.Column(self.plot, sizing_mode="stretch_width", margin=0, visible=False)
        self.frame: pd.DataFrame | None = None
        self.window: tuple[float, float] | None = None

    def view(self) -> pn.Column:
        return pn.Column(self.button, self.status, self.box, sizing_mode="stretch_width")

    def selection_changed(self, feature: int | None) -> None:
        hidden = feature is None or bool(self.bundle.features.iloc[feature]["hidden"])
        self.button.disabled = hidden  # a second sweep while one runs is refused in start

    def start(
        self,
        feature: int | None = None,
        strengths: Sequence[float] = SWEEP_STRENGTHS,
        prompts: Sequence[str] = SWEEP_PROMPTS,
        max_new_tokens: int = SWEEP_TOKENS,
    ) -> threading.Thread | None:
        feature = self.selected() if feature is None else feature
        if feature is None or self.background.busy:
            return None
        self.background.capture()
        self.button.disabled = True
        self.status.object = notice(
            "info", f"Sweeping {feature_name(self.bundle, feature)}: running… ({len(strengths)} strengths × "
            f"{len(prompts)} prompts × {max_new_tokens} tokens)"
        )  # fmt: skip
        return self.background.spawn(self._job, feature, list(strengths), list(prompts), max_new_tokens)

    def wait(self, timeout: float = 120.0) -> None:
        self.background.wait(timeout)

    def _job(self, feature: int, strengths: list[float], prompts: list[str], max_new_tokens: int) -> None:
        try:
            with HEAVY_WORK:
                frame = sweep(
                    self.engine, [Edit(int(feature), 1.0, "nudge")], prompts, strengths, max_new_tokens
                )
            window = suggest_window(frame)
        except Exception as exc:  # shown on the page, never a quiet stop
            if not isinstance(exc, SweepError):
                logger.exception("Sweep failed")
            self.background.call(self._failed, f"Sweep failed: {type(exc).__name__}: {exc}")
            return
        self.background.call(self._done, feature, frame, window)

    def _done(self, feature: int, frame: pd.DataFrame, window: tuple[float, float] | None) -> None:
        self.frame, self.window = frame, window
        plot = sweep_figure(frame, window, f"Sweep: {feature_name(self.bundle, feature)}", height=260,
                            sizing_mode="stretch_width", tools="pan,wheel_zoom,reset",
                            x_axis_label="strength (× max act)", y_axis_label="effect")  # fmt: skip
        plot.legend.label_text_font_size = "9pt"
        self.plot.object = plot
        self.box.visible = True
        self.status.object = f'<p class="sweep-window">Suggested window: {esc(window_text(window))}</p>'
        self.selection_changed(self.selected())

    def _failed(self, message: str) -> None:
        self.status.object = notice("error", message)
        self.selection_changed(self.selected())
