"""The explorer page for one browser session: map | feature card | edits and chat.

Shared across sessions (built once by the CLI): the bundle, the steering engine (model + SAE)
and the reply-feature reader. Per session (built in ``create_app``): the selection, the edits,
the chat history. Nothing session-specific is global, so two users never see each other's edits.

Strength units (the engine's): multiples of the feature's max activation in the corpus; 1.0 =
"as strong as it ever fires". "Add to edits" uses ``DEFAULT_STRENGTH`` in ``DEFAULT_MODE``.

Deep links: ``/?feature=12&strength=0.5&mode=pin&feature=40`` preselects edits; ``strength`` and
``mode`` pair with ``feature`` by position (missing ones take the defaults). Bad values are
reported on the page and skipped.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import panel as pn
import param

from build_map.bundle import Bundle
from explorer.card import CSS, LinkedHTML, esc, feature_link, feature_name, render_card, set_or_trigger
from explorer.chat import ChatPanel, ReplyFeatures
from explorer.map_view import MapView
from explorer.recipes import RecipeError, recipe_from_query
from explorer.steering import MODES, Edit, SteeringEngine, SteeringLimits
from explorer.tools_panel import ToolsPanel

logger = logging.getLogger(__name__)

DEFAULT_STRENGTH = 1.0
"""Strength of a feature added with one click: as strong as the feature ever fires, added on top
of what the model already does. Enough to show on a chat reply for most features without
derailing it; raise it (or the global multiplier) for subtle features."""
DEFAULT_MODE = "nudge"
SLIDER_RANGE = 5.0
"""The strength slider spans ±this; the box next to it accepts up to the engine's limit."""
MULTIPLIER_RANGE = (0.0, 3.0)
N_SEARCH_RESULTS = 30
"""Matches listed under the search box."""
MAX_SEARCH_HIGHLIGHT = 5000
"""Matches lit on the map (a one-letter query on 65k features would otherwise send them all)."""
FEATURE_COLUMN_WIDTH, STEER_COLUMN_WIDTH = 370, 450
"""Pixels; the map takes the rest of the window."""
MAP_ROUTE = "bundle"
"""The bundle folder is served at /bundle/ (server.py); the map at /bundle/map.html."""

WELCOME = (
    '<div class="card"><h3>Pick a feature</h3><p class="muted">Click a point on the map, search the '
    "labels above, or click a feature under a chat reply.</p></div>"
)


@dataclass
class SharedState:
    """What every session shares: built once at server start."""

    bundle: Bundle
    engine: SteeringEngine
    reply_features: ReplyFeatures | None = None
    map_url: str = f"/{MAP_ROUTE}/map.html"
    title: str = "SAE feature explorer"


# ---------------------------------------------------------------- deep links


@dataclass
class DeepLink:
    edits: list[Edit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _text_values(args: Mapping[str, Sequence[str | bytes]], key: str) -> list[str]:
    values = args.get(key) or []
    if isinstance(values, (str, bytes)):
        values = [values]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def parse_deep_link(
    args: Mapping[str, Sequence[str | bytes]], bundle: Bundle, limits: SteeringLimits | None = None
) -> DeepLink:
    """Edits from ``feature`` / ``strength`` / ``mode`` query parameters, with a message per bad one."""
    limits = limits or SteeringLimits()
    features, strengths, modes = (_text_values(args, k) for k in ("feature", "strength", "mode"))
    link = DeepLink()
    for i, raw in enumerate(features):
        strength_raw = strengths[i] if i < len(strengths) else None
        mode = modes[i].strip().lower() if i < len(modes) else DEFAULT_MODE
        try:
            edit = _deep_link_edit(raw, strength_raw, mode, bundle, limits)
        except ValueError as exc:
            link.errors.append(str(exc))
            continue
        if any(e.feature == edit.feature for e in link.edits):
            link.errors.append(f"Link: feature {edit.feature} is listed twice; kept the first.")
        elif len(link.edits) >= limits.max_edits:
            link.errors.append(f"Link: more than {limits.max_edits} edits; the rest were skipped.")
            break
        else:
            link.edits.append(edit)
    if len(strengths) > len(features) or len(modes) > len(features):
        link.errors.append("Link: more strength/mode values than features; the extra ones were ignored.")
    return link


def _deep_link_edit(
    raw: str, strength_raw: str | None, mode: str, bundle: Bundle, limits: SteeringLimits
) -> Edit:
    try:
        feature = int(raw.strip())
    except ValueError:
        raise ValueError(f"Link: feature={raw!r} is not a feature id (a whole number).") from None
    if not 0 <= feature < bundle.n_features:
        raise ValueError(
            f"Link: feature {feature} does not exist; this bundle has features 0 to {bundle.n_features - 1}."
        )
    if bool(bundle.features.iloc[feature]["hidden"]):
        raise ValueError(f"Link: feature {feature} is hidden in this bundle and cannot be steered.")
    strength = DEFAULT_STRENGTH
    if strength_raw is not None:
        try:
            strength = float(strength_raw)
        except ValueError:
            raise ValueError(
                f"Link: strength={strength_raw!r} for feature {feature} is not a number."
            ) from None
        if not math.isfinite(strength) or abs(strength) > limits.max_abs_strength:
            raise ValueError(
                f"Link: strength {strength_raw} for feature {feature} is outside ±{limits.max_abs_strength:g} "
                "(units of the feature's max activation)."
            )
    if mode not in MODES:
        raise ValueError(f"Link: mode={mode!r} for feature {feature}; choose one of {', '.join(MODES)}.")
    if mode == "pin" and strength < 0:
        raise ValueError(f"Link: feature {feature} cannot be pinned to a negative strength ({strength:g}).")
    return Edit(feature, strength, mode)


# ---------------------------------------------------------------- search


def search_labels(bundle: Bundle, query: str) -> list[int]:
    """Visible features whose label contains ``query`` (case-insensitive), in feature order."""
    query = query.strip().casefold()
    if not query:
        return []
    features = bundle.features
    labels = features["label"].fillna("").astype(str).str.casefold()
    match = labels.str.contains(query, regex=False).to_numpy() & ~features["hidden"].to_numpy(bool)
    return [int(i) for i in np.flatnonzero(match)]


def _search_html(bundle: Bundle, query: str, matches: list[int]) -> str:
    if not query.strip():
        return ""
    if not matches:
        return f'<p class="muted">No label contains “{esc(query.strip())}”.</p>'
    shown = "".join(feature_link(bundle, f) for f in matches[:N_SEARCH_RESULTS])
    more = (
        f'<p class="muted">… and {len(matches) - N_SEARCH_RESULTS} more (lit on the map)</p>'
        if len(matches) > N_SEARCH_RESULTS
        else ""
    )
    count = f'<p class="muted">{len(matches)} match{"es" if len(matches) != 1 else ""}</p>'
    return f'{count}<div class="search-results">{shown}</div>{more}'


# ---------------------------------------------------------------- edits


class EditRow:
    """One edit: strength (× max activation), mode, remove."""

    def __init__(self, bundle: Bundle, edit: Edit, limits: SteeringLimits, on_remove, on_select):
        self.feature = edit.feature
        bound = limits.max_abs_strength
        self.label = LinkedHTML(
            html=feature_link(bundle, edit.feature), sizing_mode="stretch_width", margin=(4, 5)
        )
        self.label.param.watch(lambda event: on_select(event.new), "clicked")
        self.strength = pn.widgets.EditableFloatSlider(
            label="strength (× max act)",
            start=-SLIDER_RANGE,
            end=SLIDER_RANGE,
            step=0.05,
            fixed_start=0.0 if edit.mode == "pin" else -bound,
            fixed_end=bound,
            value=edit.strength,
            sizing_mode="stretch_width",
            min_width=180,
        )
        self.mode = pn.widgets.Select(label="mode", options=list(MODES), value=edit.mode, width=80)
        self.mode.param.watch(self._mode_changed, "value")
        self.remove = pn.widgets.Button(label="✕", width=36, color="light", description="Remove this edit")
        self.remove.on_click(lambda event: on_remove(self))
        self.view = pn.Column(
            pn.Row(self.label, self.remove, sizing_mode="stretch_width", margin=0),
            pn.Row(self.strength, self.mode, sizing_mode="stretch_width", margin=0),
            sizing_mode="stretch_width",
            css_classes=["edit-row"],
            styles={"border-bottom": "1px solid #eaeef2"},
        )

    def _mode_changed(self, event: param.parameterized.Event) -> None:
        # A pin clamps an activation, which cannot be negative.
        self.strength.fixed_start = 0.0 if event.new == "pin" else -self.strength.fixed_end
        if event.new == "pin" and self.strength.value < 0:
            self.strength.value = 0.0

    def edit(self) -> Edit:
        return Edit(self.feature, float(self.strength.value), self.mode.value)


class EditsPanel(param.Parameterized):
    """The session's edits and global multiplier."""

    clicked = param.Integer(default=None, allow_None=True, doc="Feature label last clicked in the list.")
    count = param.Integer(default=0)

    def __init__(self, bundle: Bundle, limits: SteeringLimits, **params):
        super().__init__(**params)
        self.bundle, self.limits = bundle, limits
        self.rows: list[EditRow] = []
        self.list = pn.Column(sizing_mode="stretch_width", margin=0)
        self.empty = pn.pane.HTML(
            '<p class="muted">No edits: replies are unsteered. Select a feature and press “Add to edits”.</p>',
            stylesheets=[CSS],
            margin=(0, 5),
        )
        self.multiplier = pn.widgets.EditableFloatSlider(
            label="Global multiplier",
            start=MULTIPLIER_RANGE[0],
            end=MULTIPLIER_RANGE[1],
            step=0.05,
            value=1.0,
            fixed_start=-limits.max_abs_strength,
            fixed_end=limits.max_abs_strength,
            sizing_mode="stretch_width",
        )
        self.reset_button = pn.widgets.Button(
            label="Reset",
            color="light",
            width=70,
            description="Remove every edit and set the multiplier to 1",
        )
        self.reset_button.on_click(lambda event: self.reset())

    def view(self) -> pn.Column:
        return pn.Column(
            self.empty,
            self.list,
            pn.Row(self.multiplier, self.reset_button, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
            margin=0,
        )

    def has(self, feature: int) -> bool:
        return any(row.feature == feature for row in self.rows)

    def add(self, edit: Edit) -> None:
        if self.has(edit.feature):
            return
        row = EditRow(self.bundle, edit, self.limits, self.remove, self._select)
        self.rows.append(row)
        self.list.append(row.view)
        self._changed()

    def remove(self, row: EditRow) -> None:
        if row in self.rows:
            self.rows.remove(row)
            self.list.remove(row.view)
            self._changed()

    def reset(self) -> None:
        self.rows = []
        self.list.clear()
        self.multiplier.value = 1.0
        self._changed()

    def current(self) -> tuple[list[Edit], float]:
        return [row.edit() for row in self.rows], float(self.multiplier.value)

    def _select(self, feature: int) -> None:
        set_or_trigger(self, "clicked", feature)

    def _changed(self) -> None:
        self.empty.visible = not self.rows
        self.count = len(self.rows)


# ---------------------------------------------------------------- the session


class ExplorerSession:
    """Everything one browser session sees and owns."""

    def __init__(self, shared: SharedState, query_args: Mapping[str, Sequence[str | bytes]] | None = None):
        self.shared = shared
        self.bundle, self.engine = shared.bundle, shared.engine
        self.selected: int | None = None
        self.map = MapView(src=shared.map_url, sizing_mode="stretch_both", min_height=300, min_width=300)
        self.card = LinkedHTML(html=WELCOME, sizing_mode="stretch_width")
        self.notice = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))
        self.add_button = pn.widgets.Button(label="Add to edits", color="primary", disabled=True, width=130)
        self.add_hint = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(8, 5))
        self.search = pn.widgets.TextInput(placeholder="Search feature labels…", sizing_mode="stretch_width")
        self.search_results = LinkedHTML(html="", sizing_mode="stretch_width")
        self.edits = EditsPanel(self.bundle, self.engine.limits)
        self.chat = ChatPanel(
            self.engine,
            self.bundle,
            self.edits.current,
            shared.reply_features,
            on_reply_features=lambda features: self.map.highlight("reply", features),
            on_turn_done=lambda column, edits, multiplier: self.tools.show_reply(
                column.messages, column.text, edits, multiplier
            ),
        )
        self.tools = ToolsPanel(self)
        self._wire()
        if query_args:
            self.apply_deep_link(query_args)
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            pn.state.on_session_destroyed(lambda context: self.chat.stop())

    def _wire(self) -> None:
        self.map.param.watch(lambda event: self.select(event.new), "selected")
        for source in (self.card, self.search_results, self.edits, self.chat, self.tools):
            source.param.watch(lambda event: self.select(event.new, focus=True), "clicked")
        self.add_button.on_click(lambda event: self.add_selected())
        self.search.param.watch(lambda event: self.run_search(event.new), "value_input")
        self.edits.param.watch(lambda event: self._update_add_button(), "count")
        self.chat.clear_button.on_click(lambda event: self.tools.clear_attribution())

    # ------------------------------------------------------------ actions

    def select(self, feature: int | None, focus: bool = False) -> None:
        if feature is None:
            return
        if not 0 <= feature < self.bundle.n_features:
            self.show_notice([f"Feature {feature} does not exist in this bundle."])
            return
        self.selected = int(feature)
        self.card.html = render_card(self.bundle, self.selected)
        self._update_add_button()
        self.tools.selection_changed(self.selected)
        if focus and not bool(self.bundle.features.iloc[self.selected]["hidden"]):
            self.map.focus_on(self.selected)

    def add_selected(self, strength: float = DEFAULT_STRENGTH, mode: str = DEFAULT_MODE) -> bool:
        """Add the selected feature to the edits; False (with the reason shown) when refused."""
        reason = self._cannot_add(self.selected)
        if reason:
            self.add_hint.object = f'<span class="muted">{esc(reason)}</span>'
            return False
        self.edits.add(Edit(int(self.selected), strength, mode))
        return True

    def run_search(self, query: str) -> list[int]:
        matches = search_labels(self.bundle, query or "")
        self.search_results.html = _search_html(self.bundle, query or "", matches)
        self.map.highlight("search", matches[:MAX_SEARCH_HIGHLIGHT])
        return matches

    def apply_deep_link(self, args: Mapping[str, Sequence[str | bytes]]) -> DeepLink:
        link = parse_deep_link(args, self.bundle, self.engine.limits)
        for edit in link.edits:
            self.edits.add(edit)
        self._apply_link_settings(args)
        if link.edits:
            self.select(link.edits[0].feature, focus=True)
        self.show_notice(link.errors)
        return link

    def _apply_link_settings(self, args: Mapping[str, Sequence[str | bytes]]) -> None:
        """Multiplier and sampling of a link made by "Copy link" (recipe_to_query); the edits
        themselves come from parse_deep_link, which reports bad ones one by one."""
        keys = ("multiplier", "temperature", "top_p", "max_new_tokens", "seed")
        if not any(key in args for key in keys):
            return
        settings = {key: args[key] for key in keys if key in args}
        try:
            recipe = recipe_from_query(settings, self.bundle)
        except RecipeError as exc:
            self.show_notice([f"Link settings ignored: {exc}"])
            return
        self.edits.multiplier.value = recipe.multiplier
        chat = self.chat
        if "temperature" in args:
            chat.temperature.value = min(recipe.sampling.temperature, chat.temperature.end)
        if "max_new_tokens" in args:
            chat.max_new_tokens.value = recipe.sampling.max_new_tokens
        if "seed" in args:
            chat.seed.value = recipe.sampling.seed

    def show_notice(self, messages: Sequence[str]) -> None:
        self.notice.object = "".join(f'<div class="notice error">{esc(m)}</div>' for m in messages)

    # ------------------------------------------------------------ state

    def _cannot_add(self, feature: int | None) -> str:
        if feature is None:
            return "Select a feature first."
        if bool(self.bundle.features.iloc[feature]["hidden"]):
            return "Hidden features cannot be steered."
        if self.edits.has(feature):
            return "Already in the edits below."
        if len(self.edits.rows) >= self.engine.limits.max_edits:
            return f"At most {self.engine.limits.max_edits} edits at once; remove one first."
        return ""

    def _update_add_button(self) -> None:
        reason = self._cannot_add(self.selected)
        self.add_button.disabled = bool(reason)
        if self.selected is None:
            self.add_hint.object = ""
        elif reason:
            self.add_hint.object = f'<span class="muted">{esc(reason)}</span>'
        else:
            self.add_hint.object = (
                f'<span class="muted">{esc(feature_name(self.bundle, self.selected))}: nudge at '
                f"{DEFAULT_STRENGTH:g}× max act</span>"
            )

    # ------------------------------------------------------------ layout

    def view(self) -> pn.Row:
        manifest = self.bundle.manifest
        model = (
            (manifest.get("model") or {}).get("name") or (manifest.get("model") or {}).get("spec") or "model"
        )
        header = pn.pane.HTML(
            f'<div class="app-head"><b>{html.escape(self.shared.title)}</b><br><span class="muted">'
            f"{html.escape(str(model))} · {html.escape(str(manifest.get('hookpoint', '')))} · "
            f"{self.bundle.n_features:,} features</span></div>",
            stylesheets=[CSS],
            sizing_mode="stretch_width",
            margin=(5, 5, 0, 5),
        )
        feature_column = pn.Column(
            header,
            self.search,
            self.search_results,
            self.notice,
            pn.Row(self.add_button, self.add_hint, sizing_mode="stretch_width"),
            self.card,
            width=FEATURE_COLUMN_WIDTH,
            sizing_mode="stretch_height",
            scroll=True,
            css_classes=["feature-column"],
            styles={"border-left": "1px solid #d0d7de"},
        )
        units = pn.pane.HTML(
            '<span class="muted">Strength is in multiples of the feature\'s max activation (1 = as strong as '
            "it ever fires). <b>nudge</b> adds the feature's direction; <b>pin</b> clamps its activation.</span>",
            stylesheets=[CSS],
            sizing_mode="stretch_width",
            margin=(2, 5),
        )
        steer_column = pn.Column(
            _section("Edits"),
            units,
            self.edits.view(),
            self.tools.recipe_view(),
            pn.Card(
                self.tools.sweep_view(),
                title="Strength sweep (selected feature)",
                collapsed=True,
                sizing_mode="stretch_width",
                margin=(4, 5),
            ),
            _section("Chat: default | steered"),
            self.chat.view(),
            pn.Card(
                self.tools.attribution_view(),
                title="Why this token? (last reply)",
                collapsed=False,
                sizing_mode="stretch_width",
                margin=(4, 5),
            ),
            width=STEER_COLUMN_WIDTH,
            sizing_mode="stretch_height",
            scroll=True,
            css_classes=["steer-column"],
            styles={"border-left": "1px solid #d0d7de"},
        )
        return pn.Row(
            self.map,
            feature_column,
            steer_column,
            sizing_mode="stretch_both",
            margin=0,
            styles={"height": "100vh"},
        )


def _section(title: str) -> pn.pane.HTML:
    return pn.pane.HTML(
        f'<div class="section">{html.escape(title)}</div>',
        stylesheets=[CSS],
        sizing_mode="stretch_width",
        margin=(8, 5, 0, 5),
    )


def create_app(shared: SharedState) -> pn.viewable.Viewable:
    """The page for the current session (called by the server once per browser session)."""
    args = pn.state.session_args if pn.state.curdoc is not None else {}
    return ExplorerSession(shared, args or None).view()
