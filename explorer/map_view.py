"""The map pane: an <iframe> on the bundle's map.html, bridged to Python with postMessage.

The map page (build_map/render_map.py) posts ``{type: 'feature-click', feature: id}`` to its
parent and listens for ``{type: 'highlight', features: [ids], id}`` and ``{type: 'focus',
feature: id}``. The iframe is created inside this component (not in a separate pane): each
Panel component lives in its own shadow DOM, so another one could not find it.
"""

from __future__ import annotations

import logging

import param
from panel.custom import JSComponent

from explorer.card import set_or_trigger

logger = logging.getLogger(__name__)


class MapView(JSComponent):
    """The feature map; ``selected`` follows clicks, ``highlights`` and ``focus`` drive the map."""

    src = param.String(default="", doc="URL of map.html (served from the same origin as the app).")
    selected = param.Integer(default=None, allow_None=True, doc="The feature last clicked on the map.")
    highlights = param.Dict(
        default={}, doc="Named highlight sets, e.g. {'search': [3, 7], 'reply': [12]}; [] clears one."
    )
    focus = param.Integer(default=None, allow_None=True, doc="Feature the map should centre on.")

    _esm = """
    export function render({ model, el }) {
      const frame = document.createElement('iframe');
      frame.src = model.src;
      frame.title = 'Feature map';
      frame.style.cssText = 'width:100%;height:100%;border:0;display:block;';
      const post = (msg) => {
        if (frame.contentWindow) frame.contentWindow.postMessage(msg, window.location.origin);
      };
      const pushHighlights = () => {
        for (const [id, features] of Object.entries(model.highlights || {})) {
          post({type: 'highlight', features: features, id: id});
        }
      };
      const onMessage = (e) => {
        // Only the map we created may select features; ignore every other window.
        if (e.source !== frame.contentWindow) return;
        const msg = e.data;
        if (!msg || msg.type !== 'feature-click') return;
        if (!Number.isInteger(msg.feature)) return;
        model.send_msg({type: 'feature-click', feature: msg.feature});
      };
      window.addEventListener('message', onMessage);
      frame.addEventListener('load', () => {
        pushHighlights();
        if (model.focus !== null) post({type: 'focus', feature: model.focus});
      });
      model.on('highlights', pushHighlights);
      model.on('focus', () => { if (model.focus !== null) post({type: 'focus', feature: model.focus}); });
      model.on('src', () => { frame.src = model.src; });
      model.on('remove', () => window.removeEventListener('message', onMessage));
      el.style.height = '100%';
      el.appendChild(frame);
    }
    """

    def _handle_msg(self, msg: dict) -> None:
        if not isinstance(msg, dict) or msg.get("type") != "feature-click":
            return
        feature = msg.get("feature")
        if not isinstance(feature, (int, float)) or not float(feature).is_integer():
            logger.debug("Ignoring map message with a non-integer feature: %r", msg)
            return
        set_or_trigger(self, "selected", int(feature))

    def highlight(self, name: str, features: list[int]) -> None:
        """Replace the highlight set ``name`` (search results, reply features) on the map."""
        self.highlights = {**self.highlights, name: [int(f) for f in features]}

    def focus_on(self, feature: int) -> None:
        set_or_trigger(self, "focus", int(feature))
