"""Steering tools of one explorer session: recipes (save/load/link), strength sweeps, attribution.

Heavy work (a sweep, one attribution) runs in a worker thread; like the chat, workers never touch
widgets directly but go through ``_ui`` (the session's document, captured on the click). One
heavy job runs at a time per server (``_HEAVY``) so a sweep cannot starve the chat of the CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import panel as pn
import param
from panel.custom import JSComponent

from explorer.card import CSS, LinkedHTML, esc, feature_name, render_chips, set_or_trigger, show_token
from explorer.recipes import RecipeError, load_recipe, make_recipe, recipe_to_query
from explorer.steering import Edit, SamplingConfig
from explorer.sweep import DEFAULT_PROMPTS, SweepError, suggest_window, sweep, sweep_summary

logger = logging.getLogger(__name__)

SWEEP_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
"""Strengths (× max activation) of the on-request sweep: few, so it answers in seconds."""
SWEEP_PROMPTS = DEFAULT_PROMPTS[:2]
SWEEP_TOKENS = 24
N_ATTRIBUTION = 10
"""Features listed for a clicked token."""
_HEAVY = threading.Lock()


def _notice(kind: str, text: str) -> str:
    return f'<div class="notice {kind}">{esc(text)}</div>' if text else ""


class TokenPicker(JSComponent):
    """HTML whose ``[data-token]`` elements report clicks to Python as ``clicked``."""

    html = param.String(default="", doc="Trusted HTML: tokens are escaped by render_tokens.")
    clicked = param.Integer(default=None, allow_None=True, doc="Index of the token last clicked.")

    _stylesheets = [CSS]

    _esm = """
    export function render({ model, el }) {
      const box = document.createElement('div');
      box.className = 'token-picker';
      box.innerHTML = model.html;
      box.addEventListener('click', (e) => {
        const target = e.target.closest('[data-token]');
        if (!target || !box.contains(target)) return;
        for (const t of box.querySelectorAll('.picked')) t.classList.remove('picked');
        target.classList.add('picked');
        model.send_msg({type: 'token', index: Number(target.dataset.token)});
      });
      model.on('html', () => { box.innerHTML = model.html; });
      el.appendChild(box);
    }
    """

    def _handle_msg(self, msg: dict) -> None:
        if not isinstance(msg, dict) or msg.get("type") != "token":
            return
        index = msg.get("index")
        if isinstance(index, (int, float)) and float(index).is_integer():
            set_or_trigger(self, "clicked", int(index))


def render_tokens(pieces: Sequence[str]) -> str:
    spans = "".join(
        f'<span class="tok pick" data-token="{i}" title="token {i}">{show_token(p)}</span>'
        for i, p in enumerate(pieces)
    )
    return f'<div class="tok-pick-row">{spans}</div>'


def sweep_figure(frame, window: tuple[float, float] | None, title: str):
    """Effect and coherence (means over prompts) vs strength, the suggested window shaded."""
    from bokeh.models import BoxAnnotation, LinearAxis, Range1d
    from bokeh.plotting import figure

    summary = sweep_summary(frame).reset_index()
    plot = figure(
        title=title, height=260, sizing_mode="stretch_width", tools="pan,wheel_zoom,reset",
        x_axis_label="strength (× max act)", y_axis_label="effect",
    )  # fmt: skip
    coherence = summary["coherence"].to_numpy(float)
    finite = coherence[np.isfinite(coherence)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 0.0)
    pad = max(0.05 * (hi - lo), 0.1)
    plot.extra_y_ranges = {"coherence": Range1d(lo - pad, hi + pad)}
    plot.add_layout(LinearAxis(y_range_name="coherence", axis_label="coherence (nats/token)"), "right")
    if window is not None:
        plot.add_layout(BoxAnnotation(left=window[0], right=window[1], fill_color="#2ca02c", fill_alpha=0.15))
    plot.line(summary["strength"], summary["effect"], color="#1f77b4", line_width=2, legend_label="effect")
    plot.scatter(summary["strength"], summary["effect"], color="#1f77b4", size=6)
    plot.line(summary["strength"], summary["coherence"], color="#d62728", line_width=2,
              y_range_name="coherence", legend_label="coherence")  # fmt: skip
    plot.legend.location = "top_left"
    plot.legend.label_text_font_size = "9pt"
    return plot


def window_text(window: tuple[float, float] | None) -> str:
    if window is None:
        return "Suggested window: none (no strength raised the effect before coherence collapsed)."
    return f"Suggested window: {window[0]:g} to {window[1]:g} × max activation."


class ToolsPanel(param.Parameterized):
    """Recipes, sweep and attribution for one ``ExplorerSession`` (see the module docstring)."""

    clicked = param.Integer(default=None, allow_None=True, doc="Feature chip last clicked.")

    def __init__(self, session, **params):
        super().__init__(**params)
        self.session = session
        self.bundle, self.engine = session.bundle, session.engine
        self._doc = None
        self._workers: list[threading.Thread] = []
        # recipes
        self.save = pn.widgets.FileDownload(
            callback=self._recipe_file, filename="recipe.json", label="Save recipe", color="light",
            embed=False, width=120,
        )  # fmt: skip
        self.load = pn.widgets.FileInput(accept=".json", multiple=False, width=200)
        self.load.param.watch(lambda event: self.load_bytes(event.new), "value")
        self.link_button = pn.widgets.Button(label="Copy link", color="light", width=90)
        self.link_button.on_click(lambda event: self.update_link())
        self.link = pn.widgets.TextInput(
            placeholder="Press “Copy link”, then copy this", sizing_mode="stretch_width"
        )
        self.recipe_notice = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))
        # sweep
        self.sweep_button = pn.widgets.Button(label="Sweep strength", color="light", width=130, disabled=True)
        self.sweep_button.on_click(lambda event: self.start_sweep())
        self.sweep_status = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))
        self.sweep_plot = pn.pane.Bokeh(None, sizing_mode="stretch_width")
        self.sweep_box = pn.Column(self.sweep_plot, sizing_mode="stretch_width", margin=0, visible=False)
        self.sweep_frame = None
        self.sweep_window: tuple[float, float] | None = None
        # attribution
        self.tokens = TokenPicker(html="", sizing_mode="stretch_width")
        self.tokens.param.watch(lambda event: self.start_attribution(event.new), "clicked")
        self.attr_status = pn.pane.HTML(
            '<p class="muted">After a reply, click one of its tokens to see which features made the model '
            "write it.</p>",
            stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5),
        )  # fmt: skip
        self.attr_chips = LinkedHTML(html="", sizing_mode="stretch_width")
        self.attr_chips.param.watch(lambda event: set_or_trigger(self, "clicked", event.new), "clicked")
        self.attr_frame = None
        self._reply: dict | None = None  # ids, prompt length, edits, multiplier of the reply shown

    # ------------------------------------------------------------ layout

    def recipe_view(self) -> pn.Column:
        return pn.Column(
            pn.Row(self.save, self.load, sizing_mode="stretch_width"),
            pn.Row(self.link_button, self.link, sizing_mode="stretch_width"),
            self.recipe_notice,
            sizing_mode="stretch_width",
            margin=0,
        )

    def sweep_view(self) -> pn.Column:
        return pn.Column(self.sweep_button, self.sweep_status, self.sweep_box, sizing_mode="stretch_width")

    def attribution_view(self) -> pn.Column:
        return pn.Column(
            self.attr_status, self.tokens, self.attr_chips, sizing_mode="stretch_width", margin=0
        )

    def selection_changed(self, feature: int | None) -> None:
        hidden = feature is None or bool(self.bundle.features.iloc[feature]["hidden"])
        self.sweep_button.disabled = hidden  # a second sweep while one runs is refused in start_sweep

    def _busy(self) -> bool:
        return any(w.is_alive() for w in self._workers)

    # ------------------------------------------------------------ recipes

    def current_recipe(self) -> dict:
        edits, multiplier = self.session.edits.current()
        sampling = self.session.chat.sampling()
        return make_recipe(self.bundle, edits, multiplier, sampling)

    def _recipe_file(self):
        try:
            text = json.dumps(self.current_recipe(), indent=2) + "\n"
        except RecipeError as exc:
            self.recipe_notice.object = _notice("error", f"Cannot save: {exc}")
            return io.StringIO("")
        self.recipe_notice.object = ""
        return io.StringIO(text)

    def load_bytes(self, data: bytes | None) -> bool:
        """Replace the edits and sampling with a recipe file's; False (notice shown) when refused."""
        if not data:
            return False
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"The file is not JSON ({exc.msg}); load a recipe saved here.") from None
            recipe = load_recipe(parsed, self.bundle, self.engine.limits)
        except (RecipeError, UnicodeDecodeError) as exc:
            self.recipe_notice.object = _notice("error", f"Recipe not loaded: {exc}")
            return False
        self.apply(recipe.edits, recipe.multiplier, recipe.sampling)
        self.recipe_notice.object = _notice("info", f"Loaded a recipe with {len(recipe.edits)} edit(s).")
        return True

    def apply(self, edits: Sequence[Edit], multiplier: float, sampling: SamplingConfig | None) -> None:
        panel = self.session.edits
        panel.reset()
        for edit in edits:
            panel.add(edit)
        panel.multiplier.value = float(multiplier)
        if sampling is not None:
            chat = self.session.chat
            chat.temperature.value = min(float(sampling.temperature), chat.temperature.end)
            chat.max_new_tokens.value = int(sampling.max_new_tokens)
            chat.seed.value = sampling.seed
        self.update_link()

    def update_link(self) -> str:
        try:
            query = recipe_to_query(self.current_recipe())
        except RecipeError as exc:
            self.recipe_notice.object = _notice("error", f"No link: {exc}")
            return ""
        base = ""
        location = pn.state.location if pn.state.curdoc is not None else None
        if location is not None and getattr(location, "href", ""):
            base = str(location.href).split("?")[0]
        self.link.value = f"{base}?{query}" if query else base
        return query

    # ------------------------------------------------------------ sweep

    def start_sweep(
        self,
        feature: int | None = None,
        strengths: Sequence[float] = SWEEP_STRENGTHS,
        prompts: Sequence[str] = SWEEP_PROMPTS,
        max_new_tokens: int = SWEEP_TOKENS,
    ) -> threading.Thread | None:
        feature = self.session.selected if feature is None else feature
        if feature is None or self._busy():
            return None
        self._doc = pn.state.curdoc
        self.sweep_button.disabled = True
        self.sweep_status.object = _notice(
            "info", f"Sweeping {feature_name(self.bundle, feature)}: running… ({len(strengths)} strengths × "
            f"{len(prompts)} prompts × {max_new_tokens} tokens)"
        )  # fmt: skip
        return self._spawn(self._sweep_job, feature, list(strengths), list(prompts), max_new_tokens)

    def _sweep_job(
        self, feature: int, strengths: list[float], prompts: list[str], max_new_tokens: int
    ) -> None:
        try:
            with _HEAVY:
                frame = sweep(
                    self.engine, [Edit(int(feature), 1.0, "nudge")], prompts, strengths, max_new_tokens
                )
            window = suggest_window(frame)
        except Exception as exc:  # shown on the page, never a quiet stop
            if not isinstance(exc, SweepError):
                logger.exception("Sweep failed")
            self._ui(self._sweep_failed, f"Sweep failed: {type(exc).__name__}: {exc}")
            return
        self._ui(self._sweep_done, feature, frame, window)

    def _sweep_done(self, feature: int, frame, window) -> None:
        self.sweep_frame, self.sweep_window = frame, window
        self.sweep_plot.object = sweep_figure(frame, window, f"Sweep: {feature_name(self.bundle, feature)}")
        self.sweep_box.visible = True
        self.sweep_status.object = f'<p class="sweep-window">{esc(window_text(window))}</p>'
        self.selection_changed(self.session.selected)

    def _sweep_failed(self, message: str) -> None:
        self.sweep_status.object = _notice("error", message)
        self.selection_changed(self.session.selected)

    # ------------------------------------------------------------ attribution

    def show_reply(
        self, messages: list[dict], text: str, edits: Sequence[Edit] = (), multiplier: float = 1.0
    ):
        """Show a finished reply's tokens for attribution (``edits``: the steering it was made with)."""
        if not text.strip():
            self.tokens.html = ""
            self._reply = None
            return
        prompt = self.engine.prompt_ids(list(messages))
        lock = getattr(self.engine, "_tokenizer_lock", None) or contextlib.nullcontext()
        with lock:
            reply = list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        pieces = [self.engine.decode([t]) for t in reply]
        self._reply = {
            "ids": prompt + reply,
            "start": len(prompt),
            "edits": list(edits),
            "multiplier": multiplier,
        }
        self.tokens.html = render_tokens(pieces)
        self.attr_chips.html = ""
        self.attr_status.object = '<p class="muted">Click a token of the last reply to explain it.</p>'

    def start_attribution(self, index: int | None, background: bool = True):
        if index is None or self._reply is None:
            return None
        n_reply = len(self._reply["ids"]) - self._reply["start"]
        if not 0 <= index < n_reply:
            self.attr_status.object = _notice(
                "error", f"Token {index} is not in the reply (0 to {n_reply - 1})."
            )
            return None
        self._doc = pn.state.curdoc
        self.attr_status.object = _notice("info", f"Attributing token {index}: running…")
        if background:
            return self._spawn(self._attribution_job, index)
        self._attribution_job(index)
        return None

    def _attribution_job(self, index: int) -> None:
        from explorer.attribution import attribute_token

        reply = self._reply
        position = reply["start"] + index  # explain the token at this position: its prediction comes before
        hidden = self.bundle.features["hidden"].to_numpy(bool) | self.bundle.features["dead"].to_numpy(bool)
        try:
            steer = (
                self.engine.steered([reply["edits"]], reply["multiplier"])
                if reply["edits"]
                else contextlib.nullcontext()
            )
            with _HEAVY, steer:
                frame = attribute_token(
                    self.engine.model, self.engine.sae, self.engine.hookpoint, reply["ids"],
                    position=position - 1, top_k=N_ATTRIBUTION, hidden=hidden,
                )  # fmt: skip
        except Exception as exc:
            logger.exception("Attribution failed")
            self._ui(setattr, self.attr_status, "object", _notice("error", f"Attribution failed: {exc}"))
            return
        self._ui(self._attribution_done, index, frame)

    def _attribution_done(self, index: int, frame) -> None:
        self.attr_frame = frame
        token = self.engine.decode([int(frame.attrs["target_token"])])
        scored = [(int(f), float(s)) for f, s in zip(frame["feature"], frame["attribution"], strict=True)]
        self.attr_status.object = (
            f'<p class="muted">Token {index} “{show_token(token)}” (log p {frame.attrs["logprob"]:.2f}): '
            "features by activation × gradient (positive = made it more likely).</p>"
        )
        self.attr_chips.html = (
            render_chips(self.bundle, scored, "Attribution") or '<p class="muted">No feature.</p>'
        )
        self.session.map.highlight("attribution", [f for f, _ in scored])

    def clear_attribution(self) -> None:
        self._reply = None
        self.tokens.html = self.attr_chips.html = ""
        self.session.map.highlight("attribution", [])

    # ------------------------------------------------------------ threads

    def _spawn(self, target: Callable, *args) -> threading.Thread:
        worker = threading.Thread(target=target, args=args, daemon=True, name="explorer-tools")
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()
        return worker

    def _ui(self, fn: Callable, *args) -> None:
        doc = self._doc
        if doc is None or doc.session_context is None:
            fn(*args)
            return
        with contextlib.suppress(Exception):  # the session is gone: nothing to show
            doc.add_next_tick_callback(lambda: fn(*args))

    def wait(self, timeout: float = 120.0) -> None:
        """Block until running workers end (tests)."""
        for worker in list(self._workers):
            worker.join(timeout)
