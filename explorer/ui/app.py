"""The explorer page for one browser session: map | feature card | edits and chat.

Shared across sessions (built once by the CLI): the bundle, the steering engine (model + SAE)
and the reply-feature reader. Per session (built in ``create_app``): the selection, the edits,
the chat history. Nothing session-specific is global, so two users never see each other's edits.

Strength units (the engine's): multiples of the feature's max activation in the corpus; 1.0 =
"as strong as it ever fires". "Add to edits" uses the feature's click strength (its calibrated
``steer_strength``, ``build_map.steering.click``) in ``DEFAULT_MODE``.

Deep links: ``/?feature=12&strength=0.5&mode=pin&feature=40`` preselects edits
(``build_map.steering.links``); bad values are reported on the page and skipped.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import panel as pn

from build_map.bundle.label_edits import EDITED, LabelEditsError, label_edits_path
from build_map.bundle.read import Bundle
from build_map.labels.text import MAX_LABEL_CHARS, clean_label
from build_map.steering.click import click_strength, is_calibrated
from build_map.steering.engine import SteeringEngine
from build_map.steering.links import DeepLink, open_link
from build_map.steering.requests import DEFAULT_MODE, Edit, SamplingConfig
from build_map.steering.text_features import TextFeatures
from explorer.ui.attribution_panel import AttributionPanel
from explorer.ui.background import Background
from explorer.ui.chat import HISTORY_TOKENS, ChatPanel
from explorer.ui.components import LinkedHTML, MapView
from explorer.ui.edits import EditsPanel
from explorer.ui.html import (
    CSS,
    SORTS,
    SPECIFIC_UNIT,
    esc,
    feature_link,
    feature_name,
    muted,
    notice,
    render_card,
    render_chips,
    sort_features,
)
from explorer.ui.recipe_panel import RecipePanel, Settings
from explorer.ui.sweep_panel import SweepPanel

logger = logging.getLogger(__name__)

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
    "labels above (Enter or “By meaning”: the features the model reads in your text), or click a "
    "feature under a chat reply.</p></div>"
)
UNITS = (
    '<span class="muted">Strength is in multiples of the feature\'s max activation (1 = as strong as '
    "it ever fires). <b>nudge</b> adds the feature's direction; <b>pin</b> clamps its activation; "
    "<b>orthogonal</b> multiplies the residual's component along the direction by the strength (0 removes it); "
    "<b>cap</b> caps that component at what the feature writes at the strength.</span>"
)


@dataclass
class SharedState:
    """What every session shares: built once at server start."""

    bundle: Bundle
    engine: SteeringEngine
    text_features: TextFeatures | None = None
    map_url: str = f"/{MAP_ROUTE}/map.html"
    title: str = "SAE feature explorer"
    history_tokens: int | None = HISTORY_TOKENS
    """Prompt tokens a chat reply sees at most (``explore --history-tokens``)."""


def _search_html(bundle: Bundle, query: str, matches: list[int], by: str = "relevance") -> str:
    if not query.strip():
        return ""
    if not matches:
        return f'<p class="muted">No label contains “{esc(query.strip())}”.</p>'
    shown = "".join(feature_link(bundle, f) for f in sort_features(bundle, matches, by)[:N_SEARCH_RESULTS])
    more = (
        f'<p class="muted">… and {len(matches) - N_SEARCH_RESULTS} more (lit on the map)</p>'
        if len(matches) > N_SEARCH_RESULTS
        else ""
    )
    count = f'<p class="muted">{len(matches)} match{"es" if len(matches) != 1 else ""}</p>'
    return f'{count}<div class="search-results">{shown}</div>{more}'


def _meaning_html(bundle: Bundle, query: str, scored: list[tuple[int, float]], left_out: int) -> str:
    """Most specific first whatever the sort: the order is the answer (sorting the top 30 by
    steerability would bury "weather" under "If" for "the weather is cold")."""
    if not scored:
        return muted(f"No feature of this SAE is active on “{query.strip()}”.")
    chips = render_chips(bundle, scored, "By meaning", unit=SPECIFIC_UNIT)
    note = "most specific first; × = times the feature's usual activation, read by the model"
    if left_out:
        note += f"; the last {left_out} tokens were left out"
    return f"{chips}{muted(note + '.')}"


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
        self.label_input = pn.widgets.TextInput(
            placeholder="Your label (empty: the built one)", max_length=MAX_LABEL_CHARS,
            sizing_mode="stretch_width", disabled=True,
        )  # fmt: skip
        self.label_save = pn.widgets.Button(label="Save label", disabled=True, width=100)
        self.label_hint = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))
        self.search = pn.widgets.TextInput(
            placeholder="Search labels; Enter: by meaning…", sizing_mode="stretch_width"
        )
        self.search_results = LinkedHTML(html="", sizing_mode="stretch_width")
        self.meaning_button = pn.widgets.Button(
            label="By meaning", width=100, disabled=shared.text_features is None,
            description="List the features the model reads in this text, most specific first",
        )  # fmt: skip
        self.meaning_results = LinkedHTML(html="", sizing_mode="stretch_width")
        self.meaning_worker = Background("meaning-search")
        self._meaning_query = ""  # the newest query: an older one's answer is dropped
        self.sort_by = pn.widgets.RadioButtonGroup(
            options=list(SORTS), value="steerability" if self.bundle.probed else "relevance",
            color="light", description="Order of search results and of a reply's features",
        )  # fmt: skip
        self.edits = EditsPanel(self.bundle, self.engine.limits)
        self.attribution = AttributionPanel(self.bundle, self.engine, self.map.highlight)
        self.chat = ChatPanel(
            self.engine,
            self.bundle,
            self.edits.current,
            shared.text_features,
            sort_by=lambda: self.sort_by.value,
            history_tokens=shared.history_tokens,
            on_reply_features=lambda features: self.map.highlight("reply", features),
            on_turn_done=lambda column, edits, multiplier: self.attribution.show_reply(
                column.messages, column.text, edits, multiplier, self.chat.scope()
            ),
        )
        self.recipes = RecipePanel(
            self.bundle, self.engine.limits, self.current_settings, self.apply_settings
        )
        self.sweep = SweepPanel(self.bundle, self.engine, lambda: self.selected)
        self._wire()
        if query_args:
            self.apply_deep_link(query_args)
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            pn.state.on_session_destroyed(lambda context: self.chat.stop())

    def _wire(self) -> None:
        self.map.param.watch(lambda event: self.select(event.new), "selected")
        for source in (
            self.card,
            self.search_results,
            self.meaning_results,
            self.edits,
            self.chat,
            self.attribution,
        ):
            source.param.watch(lambda event: self.select(event.new, focus=True), "clicked")
        self.add_button.on_click(lambda event: self.add_selected())
        self.label_save.on_click(lambda event: self.save_label())
        self.label_input.param.watch(lambda event: self.save_label(), "enter_pressed")
        self.search.param.watch(lambda event: self.run_search(event.new), "value_input")
        self.search.param.watch(lambda event: self.search_meaning(self.search.value_input), "enter_pressed")
        self.meaning_button.on_click(lambda event: self.search_meaning(self.search.value_input))
        self.sort_by.param.watch(lambda event: self.run_search(self.search.value_input), "value")
        self.edits.param.watch(lambda event: self._update_add_button(), "count")
        self.chat.clear_button.on_click(lambda event: self.attribution.clear())

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
        self._update_label_editor()
        self.sweep.selection_changed(self.selected)
        if focus and not bool(self.bundle.features.iloc[self.selected]["hidden"]):
            self.map.focus_on(self.selected)

    def add_selected(self, strength: float | None = None, mode: str = DEFAULT_MODE) -> bool:
        """Add the selected feature to the edits, at its click strength unless ``strength`` is
        given; False (with the reason shown) when refused."""
        reason = self._cannot_add(self.selected)
        if reason:
            self.add_hint.object = f'<span class="muted">{esc(reason)}</span>'
            return False
        if strength is None:
            strength = click_strength(self.bundle, int(self.selected))
        self.edits.add(Edit(int(self.selected), strength, mode))
        return True

    def save_label(self, text: str | None = None) -> bool:
        """Save ``text`` (default: the label box) as the selected feature's label, beside the
        bundle; "" restores the built label. The card, search results and names show it at once;
        False (with the reason shown) when refused or the file cannot be written."""
        feature = self.selected
        if feature is None or bool(self.bundle.features["hidden"].iat[feature]):
            reason = "Select a feature first." if feature is None else "Hidden features cannot be edited."
            self.label_hint.object = muted(reason)
            return False
        text = self.label_input.value_input if text is None else text
        try:
            shown = self.bundle.edit_label(feature, clean_label(text or ""))
        except (LabelEditsError, OSError) as exc:
            self.label_hint.object = notice("error", f"Label not saved: {exc}")
            return False
        self.card.html = render_card(self.bundle, feature)
        self.run_search(self.search.value_input or "")
        self._update_add_button()
        self._update_label_editor()
        where = label_edits_path(self.bundle.path).name
        done = f"Saved in {where}." if feature in self.bundle.built_labels else "Built label restored."
        self.label_hint.object = muted(f"{done} Now: {shown or '(no label)'}")
        return True

    def run_search(self, query: str) -> list[int]:
        matches = self.bundle.search_labels(query or "")
        self.search_results.html = _search_html(self.bundle, query or "", matches, self.sort_by.value)
        self.map.highlight("search", matches[:MAX_SEARCH_HIGHLIGHT])
        return matches

    def search_meaning(self, query: str | None) -> None:
        """List (and light on the map) the features most specific to ``query`` as the model reads it
        (``TextFeatures.on_text``), in a worker thread; a newer query replaces an older one."""
        reader = self.shared.text_features
        query = (query or "").strip()
        self._meaning_query = query
        if reader is None or not query:
            self.meaning_results.html = ""
            self.map.highlight("meaning", [])
            return
        self.meaning_results.html = muted(f"Reading “{query}”…")
        self.meaning_button.disabled = True
        self.meaning_worker.capture()
        self.meaning_worker.spawn(self._read_meaning, reader, query)

    def _read_meaning(self, reader: TextFeatures, query: str) -> None:
        try:
            scored, left_out = reader.on_text(query, N_SEARCH_RESULTS)
        except Exception as exc:  # shown where the results would be, never a quiet stop
            logger.exception("Search by meaning failed")
            error = notice("error", f"Could not read the text: {type(exc).__name__}: {exc}")
            self.meaning_worker.call(self._show_meaning, query, None, error)
            return
        self.meaning_worker.call(self._show_meaning, query, (scored, left_out), "")

    def _show_meaning(
        self, query: str, found: tuple[list[tuple[int, float]], int] | None, error: str
    ) -> None:
        self.meaning_button.disabled = self.shared.text_features is None
        if query != self._meaning_query:
            return
        self.meaning_results.html = error or _meaning_html(self.bundle, query, *found)
        self.map.highlight("meaning", [f for f, _ in found[0]] if found else [])

    def apply_deep_link(self, args: Mapping[str, Sequence[str | bytes]]) -> DeepLink:
        link = open_link(args, self.bundle, self.engine.limits)
        for edit in link.edits:
            self.edits.add(edit)
        self._apply_link_settings(link.settings)
        if link.edits:
            self.select(link.edits[0].feature, focus=True)
        self.show_notice(link.errors)
        return link

    def _apply_link_settings(self, settings: Mapping[str, object]) -> None:
        """Multiplier and sampling of a link made by "Copy link" (only the values it gives)."""
        chat = self.chat
        if "multiplier" in settings:
            self.edits.multiplier.value = float(settings["multiplier"])
        if "temperature" in settings:
            chat.temperature.value = min(float(settings["temperature"]), chat.temperature.end)
        if "presence_penalty" in settings:
            chat.presence_penalty.value = float(settings["presence_penalty"])
        if "max_new_tokens" in settings:
            chat.max_new_tokens.value = int(settings["max_new_tokens"])
        if "seed" in settings:
            chat.seed.value = int(settings["seed"])

    def current_settings(self) -> Settings:
        edits, multiplier = self.edits.current()
        return edits, multiplier, self.chat.sampling()

    def apply_settings(
        self, edits: Sequence[Edit], multiplier: float, sampling: SamplingConfig | None
    ) -> None:
        """Replace the edits, the multiplier and (if given) the sampling, e.g. with a recipe's."""
        self.edits.reset()
        for edit in edits:
            self.edits.add(edit)
        self.edits.multiplier.value = float(multiplier)
        if sampling is not None:
            self.chat.temperature.value = min(float(sampling.temperature), self.chat.temperature.end)
            self.chat.presence_penalty.value = float(sampling.presence_penalty)
            self.chat.max_new_tokens.value = int(sampling.max_new_tokens)
            self.chat.seed.value = sampling.seed

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

    def _update_label_editor(self) -> None:
        feature = self.selected
        editable = feature is not None and not bool(self.bundle.features["hidden"].iat[feature])
        self.label_input.disabled = self.label_save.disabled = not editable
        label = str(self.bundle.features["label"].iat[feature] or "") if editable else ""
        self.label_input.value = self.label_input.value_input = label  # value_input: what Save reads
        if not editable:
            self.label_hint.object = ""
        elif self.bundle.features["label_source"].iat[feature] == EDITED:
            built = self.bundle.built_labels[feature][0] or "(no label)"
            self.label_hint.object = muted(f"Edited by you; empty and save to restore “{built}”.")
        else:
            self.label_hint.object = muted("Edit the label and save; it is kept beside the bundle.")

    def _update_add_button(self) -> None:
        reason = self._cannot_add(self.selected)
        self.add_button.disabled = bool(reason)
        if self.selected is None:
            self.add_hint.object = ""
        elif reason:
            self.add_hint.object = f'<span class="muted">{esc(reason)}</span>'
        else:
            strength = click_strength(self.bundle, self.selected)
            how = "calibrated" if is_calibrated(self.bundle, self.selected) else "default, not calibrated"
            self.add_hint.object = (
                f'<span class="muted">{esc(feature_name(self.bundle, self.selected))}: nudge at '
                f"{strength:.3g}× max act ({how})</span>"
            )

    # ------------------------------------------------------------ layout

    def view(self) -> pn.Row:
        return pn.Row(
            self.map,
            self._feature_column(),
            self._steer_column(),
            sizing_mode="stretch_both",
            margin=0,
            styles={"height": "100vh"},
        )

    def _header(self) -> pn.pane.HTML:
        model = self.bundle.manifest.get("model") or {}
        name = model.get("name") or model.get("spec") or "model"
        return pn.pane.HTML(
            f'<div class="app-head"><b>{html.escape(self.shared.title)}</b><br><span class="muted">'
            f"{html.escape(str(name))} · {html.escape(str(self.bundle.manifest.get('hookpoint', '')))} · "
            f"{self.bundle.n_features:,} features</span></div>",
            stylesheets=[CSS],
            sizing_mode="stretch_width",
            margin=(5, 5, 0, 5),
        )

    def _feature_column(self) -> pn.Column:
        return pn.Column(
            self._header(),
            pn.Row(self.search, self.meaning_button, sizing_mode="stretch_width"),
            pn.Row(
                pn.pane.HTML('<span class="muted">sort by</span>', stylesheets=[CSS], margin=(8, 5)),
                self.sort_by,
                sizing_mode="stretch_width",
            ),  # fmt: skip
            self.search_results,
            self.meaning_results,
            self.notice,
            pn.Row(self.add_button, self.add_hint, sizing_mode="stretch_width"),
            pn.Row(self.label_input, self.label_save, sizing_mode="stretch_width"),
            self.label_hint,
            self.card,
            width=FEATURE_COLUMN_WIDTH,
            sizing_mode="stretch_height",
            scroll=True,
            css_classes=["feature-column"],
            styles={"border-left": "1px solid #d0d7de"},
        )

    def _steer_column(self) -> pn.Column:
        units = pn.pane.HTML(UNITS, stylesheets=[CSS], sizing_mode="stretch_width", margin=(2, 5))
        return pn.Column(
            _section("Edits"),
            units,
            self.edits.view(),
            self.recipes.view(),
            _card("Strength sweep (selected feature)", self.sweep.view(), collapsed=True),
            _section("Chat: default | steered"),
            self.chat.view(),
            _card("Why this token? (last reply)", self.attribution.view(), collapsed=False),
            width=STEER_COLUMN_WIDTH,
            sizing_mode="stretch_height",
            scroll=True,
            css_classes=["steer-column"],
            styles={"border-left": "1px solid #d0d7de"},
        )


def _section(title: str) -> pn.pane.HTML:
    return pn.pane.HTML(
        f'<div class="section">{html.escape(title)}</div>',
        stylesheets=[CSS],
        sizing_mode="stretch_width",
        margin=(8, 5, 0, 5),
    )


def _card(title: str, body: pn.viewable.Viewable, collapsed: bool) -> pn.Card:
    return pn.Card(body, title=title, collapsed=collapsed, sizing_mode="stretch_width", margin=(4, 5))


def create_app(shared: SharedState) -> pn.viewable.Viewable:
    """The page for the current session (called by the server once per browser session)."""
    args = pn.state.session_args if pn.state.curdoc is not None else {}
    return ExplorerSession(shared, args or None).view()
