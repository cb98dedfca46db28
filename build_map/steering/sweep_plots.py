"""Plots of a strength sweep: effect and coherence against strength, the suggested window shaded.

Three back-ends share one picture: a PNG (matplotlib) and an offline interactive HTML page (Bokeh,
resources inlined) for ``build-map sweep``, and the Bokeh figure the explorer shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from build_map.steering.sweep_window import suggest_window, sweep_summary

EFFECT_COLOUR, COHERENCE_COLOUR, WINDOW_COLOUR = "#1f77b4", "#d62728", "#2ca02c"


def plot_sweep(
    frame: pd.DataFrame,
    out_png: str | Path | None,
    out_html: str | Path | None,
    window: tuple[float, float] | None = None,
    title: str = "Strength sweep",
) -> None:
    """Effect and coherence vs strength (means as lines, prompts as dots), the window shaded; a
    PNG (matplotlib) and an offline interactive HTML page (Bokeh, resources inlined)."""
    if window is None:
        window = suggest_window(frame)
    if out_png is not None:
        _plot_png(frame, Path(out_png), window, title)
    if out_html is not None:
        _plot_html(frame, Path(out_html), window, title)


def _plot_png(frame: pd.DataFrame, path: Path, window: tuple[float, float] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    summary = sweep_summary(frame)
    figure = Figure(figsize=(7, 4.4), dpi=120)
    ax = figure.subplots()
    right = ax.twinx()
    if window is not None:
        ax.axvspan(window[0], window[1], color=WINDOW_COLOUR, alpha=0.15, label="suggested window")
    ax.scatter(frame["strength"], frame["effect"], s=10, color=EFFECT_COLOUR, alpha=0.35)
    ax.plot(summary.index, summary["effect"], "-o", color=EFFECT_COLOUR, label="effect (× max act)")
    right.scatter(frame["strength"], frame["coherence"], s=10, color=COHERENCE_COLOUR, alpha=0.35)
    right.plot(
        summary.index, summary["coherence"], "-s", color=COHERENCE_COLOUR, label="coherence (nats/token)"
    )
    ax.set_xlabel("strength (× max activation)")
    ax.set_ylabel("effect: re-read activation / max act", color=EFFECT_COLOUR)
    right.set_ylabel("coherence: mean log p per token", color=COHERENCE_COLOUR)
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False
    )
    figure.tight_layout()
    figure.savefig(path)


def _plot_html(frame: pd.DataFrame, path: Path, window: tuple[float, float] | None, title: str) -> None:
    from bokeh.embed import file_html
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.resources import INLINE

    plot = sweep_figure(frame, window, title, per_prompt=True, width=820, height=420,
                        tools="pan,wheel_zoom,box_zoom,reset,save")  # fmt: skip
    rows = ColumnDataSource(
        {
            "strength": frame["strength"].to_numpy(),
            "effect": frame["effect"].to_numpy(),
            "coherence": frame["coherence"].to_numpy(),
            "perplexity": frame["perplexity"].to_numpy(),
            "prompt": frame["prompt"].map(_short).to_list(),  # Bokeh escapes @field values
            "reply": frame["reply"].map(_short).to_list(),
        }
    )
    dots = [
        plot.scatter("strength", "effect", source=rows, size=7, color=EFFECT_COLOUR, alpha=0.5),
        plot.scatter("strength", "coherence", source=rows, size=7, color=COHERENCE_COLOUR, alpha=0.5,
                     marker="square", y_range_name="coherence"),
    ]  # fmt: skip
    plot.add_tools(
        HoverTool(
            renderers=dots,
            tooltips=[
                ("strength", "@strength"), ("effect", "@effect{0.000}"), ("coherence", "@coherence{0.00}"),
                ("perplexity", "@perplexity{0.0}"), ("prompt", "@prompt"), ("reply", "@reply"),
            ],
        )
    )  # fmt: skip
    path.write_text(file_html(plot, resources=INLINE, title=title), encoding="utf-8")  # escapes the title


def sweep_figure(
    frame: pd.DataFrame,
    window: tuple[float, float] | None,
    title: str,
    *,
    per_prompt: bool = False,
    **figure_options: object,
):
    """A Bokeh figure of the means per strength: effect on the left axis, coherence on the right,
    the suggested window shaded. ``per_prompt``: the coherence axis spans every prompt's value (the
    caller adds their dots), else only the means (the explorer's compact view, which marks them)."""
    from bokeh.models import BoxAnnotation, LinearAxis, Range1d
    from bokeh.plotting import figure

    summary = sweep_summary(frame).reset_index()
    figure_options.setdefault("x_axis_label", "strength (× max activation)")
    figure_options.setdefault("y_axis_label", "effect (re-read activation / max act)")
    plot = figure(title=title, **figure_options)
    span = frame["coherence"] if per_prompt else summary["coherence"]
    plot.extra_y_ranges = {"coherence": Range1d(*_padded_range(span))}
    plot.add_layout(
        LinearAxis(y_range_name="coherence", axis_label="coherence (mean log p per token)"), "right"
    )
    if window is not None:
        plot.add_layout(
            BoxAnnotation(left=window[0], right=window[1], fill_color=WINDOW_COLOUR, fill_alpha=0.15)
        )
    plot.line(
        summary["strength"], summary["effect"], color=EFFECT_COLOUR, line_width=2, legend_label="effect"
    )
    if not per_prompt:
        plot.scatter(summary["strength"], summary["effect"], color=EFFECT_COLOUR, size=6)
    plot.line(summary["strength"], summary["coherence"], color=COHERENCE_COLOUR, line_width=2,
              y_range_name="coherence", legend_label="coherence")  # fmt: skip
    plot.legend.location = "top_left"
    return plot


def _padded_range(values: pd.Series) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.empty:
        return -1.0, 0.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(0.05 * (hi - lo), 0.1)
    return lo - pad, hi + pad


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
