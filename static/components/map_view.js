// The explorer's map pane (explorer.ui.components.MapView): an <iframe> on the bundle's map.html,
// bridged to Python. Clicks come up from the map as {type: 'feature-click', feature}; highlight
// sets and focus go down as postMessage to the map's own window (static/map_bridge.js).
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
