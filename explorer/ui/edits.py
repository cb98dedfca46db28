"""The session's edits: one row per edited feature (strength, mode, remove) and the global multiplier."""

from __future__ import annotations

import panel as pn
import param

from build_map.bundle.read import Bundle
from build_map.steering.click import click_strength, is_calibrated
from build_map.steering.requests import MODES, Edit, SteeringLimits
from explorer.ui.components import LinkedHTML, set_or_trigger
from explorer.ui.html import CSS, feature_link

SLIDER_RANGE = 5.0
"""The strength slider spans ±this; the box next to it accepts up to the engine's limit."""
MULTIPLIER_RANGE = (0.0, 3.0)


class EditRow:
    """One edit: strength (× max activation), mode, remove. The feature's click strength is the
    slider's marked default: named in its label, and one press of ↺ away."""

    def __init__(self, bundle: Bundle, edit: Edit, limits: SteeringLimits, on_remove, on_select):
        self.feature = edit.feature
        bound = limits.max_abs_strength
        self.default = click_strength(bundle, edit.feature)
        calibrated = is_calibrated(bundle, edit.feature)
        span = min(bound, max(SLIDER_RANGE, 2 * abs(self.default), abs(edit.strength)))
        self.label = LinkedHTML(
            html=feature_link(bundle, edit.feature), sizing_mode="stretch_width", margin=(4, 5)
        )
        self.label.param.watch(lambda event: on_select(event.new), "clicked")
        mark = (
            f"calibrated {self.default:.3g}" if calibrated else f"default {self.default:.3g}, not calibrated"
        )
        self.strength = pn.widgets.EditableFloatSlider(
            label=f"{'coefficient (1 = unchanged)' if edit.mode == 'orthogonal' else 'strength (× max act)'} · {mark}",
            start=-span,
            end=span,
            step=0.05,
            fixed_start=0.0 if edit.mode == "pin" else -bound,
            fixed_end=bound,
            value=edit.strength,
            sizing_mode="stretch_width",
            min_width=180,
        )
        self.mode = pn.widgets.Select(label="mode", options=list(MODES), value=edit.mode, width=80)
        self.mode.param.watch(self._mode_changed, "value")
        self.to_default = pn.widgets.Button(
            label="↺", width=36, color="light", description=f"Back to the click strength {self.default:.3g}"
        )
        self.to_default.on_click(lambda event: self.reset_strength())
        self.remove = pn.widgets.Button(label="✕", width=36, color="light", description="Remove this edit")
        self.remove.on_click(lambda event: on_remove(self))
        self.view = pn.Column(
            pn.Row(self.label, self.remove, sizing_mode="stretch_width", margin=0),
            pn.Row(self.strength, self.to_default, self.mode, sizing_mode="stretch_width", margin=0),
            sizing_mode="stretch_width",
            css_classes=["edit-row"],
            styles={"border-bottom": "1px solid #eaeef2"},
        )

    def _mode_changed(self, event: param.parameterized.Event) -> None:
        # A pin clamps an activation, which cannot be negative.
        self.strength.fixed_start = 0.0 if event.new == "pin" else -self.strength.fixed_end
        if event.new == "pin" and self.strength.value < 0:
            self.strength.value = 0.0
        # orthogonal's strength is a coefficient (1 = unchanged), not a multiple of the max activation
        self.strength.name = self.strength.name.replace(
            "strength (× max act)" if event.new == "orthogonal" else "coefficient (1 = unchanged)",
            "coefficient (1 = unchanged)" if event.new == "orthogonal" else "strength (× max act)",
        )

    def reset_strength(self) -> None:
        self.strength.value = self.default if self.mode.value == "nudge" else max(0.0, self.default)

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
