"""The explorer's custom browser components; their JavaScript is in static/components/.

- ``MapView``: an <iframe> on the bundle's map.html, bridged to Python with postMessage. The map
  page (static/map_bridge.js) posts ``{type: 'feature-click', feature: id}`` to its parent and
  listens for ``{type: 'highlight', features: [ids], id}`` and ``{type: 'focus', feature: id}``.
  The iframe is created inside this component (not in a separate pane): each Panel component
  lives in its own shadow DOM, so another one could not find it.
- ``LinkedHTML``: HTML whose ``[data-feature]`` elements report clicks as ``clicked``.
- ``TokenPicker``: HTML whose ``[data-token]`` elements report clicks as ``clicked``.
"""

from __future__ import annotations

import logging

import param
from panel.custom import JSComponent

from build_map.common.assets import asset_path
from explorer.ui.html import CSS

logger = logging.getLogger(__name__)


def set_or_trigger(obj: param.Parameterized, name: str, value: object) -> None:
    """Set a param, firing its watchers even when the value is unchanged (a repeated click)."""
    if getattr(obj, name) == value:
        obj.param.trigger(name)
    else:
        setattr(obj, name, value)


def _whole_number(value: object) -> int | None:
    """A message's number as an int when it is whole (the browser sends JSON numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    return None


class MapView(JSComponent):
    """The feature map; ``selected`` follows clicks, ``highlights`` and ``focus`` drive the map."""

    src = param.String(default="", doc="URL of map.html (served from the same origin as the app).")
    selected = param.Integer(default=None, allow_None=True, doc="The feature last clicked on the map.")
    highlights = param.Dict(
        default={}, doc="Named highlight sets, e.g. {'search': [3, 7], 'reply': [12]}; [] clears one."
    )
    focus = param.Integer(default=None, allow_None=True, doc="Feature the map should centre on.")

    _esm = asset_path("components/map_view.js")

    def _handle_msg(self, msg: dict) -> None:
        if not isinstance(msg, dict) or msg.get("type") != "feature-click":
            return
        feature = _whole_number(msg.get("feature"))
        if feature is None:
            logger.debug("Ignoring map message with a non-integer feature: %r", msg)
            return
        set_or_trigger(self, "selected", feature)

    def highlight(self, name: str, features: list[int]) -> None:
        """Replace the highlight set ``name`` (search results, reply features) on the map."""
        self.highlights = {**self.highlights, name: [int(f) for f in features]}

    def focus_on(self, feature: int) -> None:
        set_or_trigger(self, "focus", int(feature))


class _ClickableHTML(JSComponent):
    """HTML whose marked elements report clicks to Python as ``clicked`` (an int)."""

    html = param.String(default="", doc="Trusted HTML: callers escape untrusted text (see explorer.ui.html).")
    clicked = param.Integer(default=None, allow_None=True, doc="The number the last clicked element carries.")

    _stylesheets = [CSS]
    _message: tuple[str, str] = ("", "")  # (type, field) of the browser's click message

    def _handle_msg(self, msg: dict) -> None:
        kind, field = self._message
        if isinstance(msg, dict) and msg.get("type") == kind:
            number = _whole_number(msg.get(field))
            if number is not None:
                set_or_trigger(self, "clicked", number)


class LinkedHTML(_ClickableHTML):
    """HTML whose ``[data-feature]`` elements select that feature: ``clicked`` is its id."""

    _esm = asset_path("components/linked_html.js")
    _message = ("select", "feature")


class TokenPicker(_ClickableHTML):
    """HTML whose ``[data-token]`` elements pick a token: ``clicked`` is its index."""

    _esm = asset_path("components/token_picker.js")
    _message = ("token", "index")
