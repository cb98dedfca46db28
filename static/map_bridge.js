// The map page's side of the parent <-> map protocol. build_map/render/map_page.py injects this file
// into the DataMapPlot page (its `custom_js`), where it runs at the end of the page's module
// script and can see the page's `datamap` object.
//
// Map -> parent:  {type: 'feature-click', feature: <feature id>}   when a point is clicked
//                 {type: 'map-ready'}                              once points and metadata are loaded
// Parent -> map:  {type: 'highlight', features: [ids], id?: name}  select these features as the
//                                                                  named set `name` ([] clears it)
//                 {type: 'focus', feature: id}                     fly to that feature, ring it
// Named sets are drawn together, as larger dots with a white edge over the map (each set in its own
// colour), and the focused feature gets a dark ring. Nothing else fades: the selected point keeps
// its neighbourhood in view. Messages that arrive before the data has loaded are queued and
// applied in order. The page is also usable standalone: window.saeMap exposes the
// same operations, and a click also fires a `sae-feature-click` event on window.
(() => {
  const LABEL_FONT = '600 16px "Roboto"';
  // Sans-serif fallbacks for characters outside the embedded Roboto subsets.
  const LABEL_FONT_STACK = '"Roboto", "Helvetica Neue", Arial, sans-serif';
  const MARK_LAYER = 'sae-marks';
  const RING_LAYER = 'sae-focus-ring';
  const FOCUS_SET = 'focus';
  const FOCUS_MIN_ZOOM_STEP = 1.5; // zoom levels past the initial view: close, with the neighbours
  const SET_COLOURS = {
    search: [255, 120, 0],
    reply: [130, 80, 223],
    attribution: [31, 136, 61],
    meaning: [0, 120, 212],
  };
  const DEFAULT_COLOUR = [255, 120, 0];

  const namedSets = new Map(); // set name -> array of row indices
  const queue = [];
  let rowOfFeature = null; // Map: feature id -> row index in the page's point arrays
  let initialZoom = null;

  const until = (condition, timeoutMs = 120000) =>
    new Promise((resolve, reject) => {
      const start = Date.now();
      const tick = () => {
        if (condition()) resolve();
        else if (Date.now() - start > timeoutMs) reject(new Error('map bridge: timed out waiting for the map'));
        else setTimeout(tick, 25);
      };
      tick();
    });

  const dataLoaded = () =>
    Boolean(datamap.pointLayer && datamap.pointData && datamap.metaData && datamap.metaData.feature);

  function postToParent(message) {
    // '*': a file:// page has an opaque origin that no target origin can name; the message only
    // carries a public feature id, and the parent checks which window sent it.
    if (window.parent !== window) window.parent.postMessage(message, '*');
  }

  function pointClicked(index, metaData = datamap.metaData) {
    if (!metaData || index == null || index < 0) return;
    const feature = metaData.feature[index];
    postToParent({ type: 'feature-click', feature: feature });
    window.dispatchEvent(new CustomEvent('sae-feature-click', { detail: { feature: feature } }));
  }

  function rowsOf(features) {
    if (!Array.isArray(features)) return [];
    const rows = [];
    for (const feature of features) {
      const row = rowOfFeature.get(Number(feature));
      if (row !== undefined) rows.push(row);
    }
    return rows;
  }

  // Marks and the ring are deck.gl layers of their own, kept in datamap.layers so that DataMapPlot's
  // own updates (colour by, search) redraw them too.
  function showNamedSets() {
    const x = datamap.pointData.x;
    const y = datamap.pointData.y;
    const marks = new Map(); // row -> colour (a row in several sets takes the first set's colour)
    for (const [name, rows] of namedSets) {
      if (name === FOCUS_SET) continue;
      const colour = SET_COLOURS[name] || DEFAULT_COLOUR;
      for (const row of rows) if (!marks.has(row)) marks.set(row, colour);
    }
    const ring = namedSets.get(FOCUS_SET) || [];
    const layers = datamap.layers.filter((layer) => layer.id !== MARK_LAYER && layer.id !== RING_LAYER);
    if (marks.size) {
      layers.push(
        new deck.ScatterplotLayer({
          id: MARK_LAYER,
          data: [...marks].map(([row, colour]) => ({ position: [x[row], y[row]], colour: colour, row: row })),
          getPosition: (d) => d.position,
          getFillColor: (d) => d.colour,
          getLineColor: [255, 255, 255, 255],
          getRadius: 1,
          radiusUnits: 'pixels',
          radiusMinPixels: 5.5,
          stroked: true,
          lineWidthUnits: 'pixels',
          getLineWidth: 1.5,
          pickable: false,
        }),
      );
    }
    if (ring.length) {
      layers.push(
        new deck.ScatterplotLayer({
          id: RING_LAYER,
          data: ring.map((row) => ({ position: [x[row], y[row]], row: row })),
          getPosition: (d) => d.position,
          getRadius: 1,
          radiusUnits: 'pixels',
          radiusMinPixels: 11,
          filled: false,
          stroked: true,
          getLineColor: [20, 20, 20, 255],
          lineWidthUnits: 'pixels',
          getLineWidth: 3,
          pickable: false,
        }),
      );
    }
    datamap.layers = layers;
    datamap.deckgl.setProps({ layers: [...layers] });
  }

  function markedRows(which) {
    const rows = new Set();
    for (const [name, members] of namedSets) if (which(name)) for (const row of members) rows.add(row);
    return [...rows].sort((a, b) => a - b);
  }

  function setNamedSet(name, rows) {
    if (rows.length === 0) namedSets.delete(name);
    else namedSets.set(name, rows);
    showNamedSets();
  }

  function highlight(message) {
    const name = typeof message.id === 'string' && message.id ? message.id : 'default';
    setNamedSet(name, rowsOf(message.features));
  }

  function focus(message) {
    const rows = rowsOf([message.feature]);
    if (rows.length === 0) return;
    const row = rows[0];
    const viewport = datamap.deckgl.getViewports()[0];
    const zoom = Math.max(viewport ? viewport.zoom : initialZoom, initialZoom + FOCUS_MIN_ZOOM_STEP);
    const viewState = {
      longitude: datamap.pointData.x[row],
      latitude: datamap.pointData.y[row],
      zoom: zoom,
      transitionDuration: 700,
      transitionInterpolator: new deck.FlyToInterpolator(),
    };
    datamap.deckgl.setProps({ initialViewState: viewState });
    datamap.notifyViewStateChange(viewState);
    setNamedSet(FOCUS_SET, [row]);
  }

  function handle(message) {
    if (message.type === 'highlight') highlight(message);
    else if (message.type === 'focus') focus(message);
  }

  function originAllowed(origin) {
    if (origin === location.origin) return true;
    // file:// pages have an opaque origin: serialised as "null" (or "file://" by some browsers).
    return location.protocol === 'file:' && (origin === 'null' || origin === 'file://');
  }

  window.addEventListener('message', (event) => {
    if (event.source !== window.parent || !originAllowed(event.origin)) return;
    const message = event.data;
    if (!message || typeof message !== 'object') return;
    if (message.type !== 'highlight' && message.type !== 'focus') return;
    if (rowOfFeature) handle(message);
    else queue.push(message);
  });

  // The first frame. Without a GPU (software WebGL) deck.gl's first frame costs seconds: each
  // shader program is translated and compiled on the CPU, and while the canvas is on screen the
  // page's main thread waits for the frame to be copied out. DataMapPlot adds labels, points and
  // hover data each as soon as its worker has decoded it, the labels before the embedded web font
  // has loaded (so in a fallback face, redone once the font is in). Instead, once all three are
  // decoded and the font is in:
  //   1. a 2D-canvas picture of the first view is drawn (map_preview.js) and reaches the screen;
  //   2. the three are handed to deck.gl in one tick (one glyph atlas, one first frame), its canvas
  //      hidden, so the main thread stays free (card data, search, clicks on the picture);
  //   3. when the GPU has finished that frame (a fence), the WebGL canvas is shown and the picture
  //      removed: `live`.
  const fontLoaded = document.fonts.load(LABEL_FONT, 'a\u0100').catch((error) => {
    console.warn('map bridge: label font did not load', error);
  });
  const FIRST = { points: 'addPoints', labels: 'addLabels', metadata: 'addMetaData' };
  const originals = {};
  const held = {}; // name -> the arguments DataMapPlot called it with
  const settled = () => {
    let resolve;
    const promise = new Promise((done) => (resolve = done));
    return [promise, resolve];
  };
  const [firstPaint, firstPainted] = settled();
  const [live, wentLive] = settled();
  const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const afterNextPaint = () => nextFrame().then(() => new Promise((resolve) => setTimeout(resolve, 0)));

  function drawPreview() {
    const start = performance.now();
    try {
      return drawMapPreview({
        canvas: datamap.deckgl.canvas,
        viewState: datamap.deckgl.props.initialViewState,
        points: held.points[0],
        pointOptions: held.points[1] || {},
        labels: held.labels[0],
        labelOptions: held.labels[1] || {},
        fontStack: LABEL_FONT_STACK,
        onPointClick: (index) => pointClicked(index, held.metadata[0]),
      });
    } catch (error) {
      console.warn('map bridge: no preview of the map', error);
      return null;
    } finally {
      window.saeMap.previewMs = performance.now() - start;
    }
  }

  function addFirstLayers() {
    for (const name of Object.keys(FIRST)) originals[name](...held[name]);
    // Same tick as addLabels, so the layer is first drawn (and its atlas built) with the stack.
    const layer = datamap.labelLayer.clone({ fontFamily: LABEL_FONT_STACK });
    datamap.layers = datamap.layers.map((other) => (other === datamap.labelLayer ? layer : other));
    datamap.labelLayer = layer;
    datamap.fontFamily = LABEL_FONT_STACK;
    datamap.deckgl.setProps({ layers: [...datamap.layers] });
  }

  function showWhenDrawn(preview) {
    const canvas = datamap.deckgl.canvas;
    const show = () => {
      canvas.style.visibility = '';
      return nextFrame()
        .then(nextFrame)
        .then(() => {
          if (preview) preview.remove();
          wentLive();
        });
    };
    if (!preview) return afterFirstRender().then(show);
    canvas.style.visibility = 'hidden';
    return afterFirstRender().then(gpuFinished).then(show);
  }

  // Resolves with the WebGL context after deck.gl has issued its first frame with the layers.
  function afterFirstRender() {
    return new Promise((resolve) => {
      const previous = datamap.deckgl.props.onAfterRender;
      datamap.deckgl.setProps({
        onAfterRender: (context) => {
          datamap.deckgl.setProps({ onAfterRender: previous });
          if (previous) previous(context);
          resolve(context && (context.gl || (context.device && context.device.gl)));
        },
      });
    });
  }

  // Resolves when the GPU has executed everything issued so far (WebGL2 fence; polled, because
  // waiting on it would block the main thread). WebGL1: two animation frames.
  function gpuFinished(gl) {
    if (!gl || typeof gl.fenceSync !== 'function') return nextFrame().then(nextFrame);
    const sync = gl.fenceSync(gl.SYNC_GPU_COMMANDS_COMPLETE, 0);
    gl.flush();
    return new Promise((resolve) => {
      const poll = () => {
        if (gl.isContextLost() || gl.getSyncParameter(sync, gl.SYNC_STATUS) === gl.SIGNALED) {
          gl.deleteSync(sync);
          resolve();
        } else setTimeout(poll, 25);
      };
      poll();
    });
  }

  function start() {
    const preview = drawPreview();
    // The picture reaches the screen before deck.gl's first frame takes the main thread.
    return afterNextPaint().then(() => {
      if (preview) firstPainted();
      addFirstLayers();
      return showWhenDrawn(preview).then(() => firstPainted());
    });
  }

  for (const [name, method] of Object.entries(FIRST)) {
    originals[name] = datamap[method].bind(datamap);
    datamap[method] = (...args) => {
      datamap[method] = originals[name]; // later calls go straight through
      held[name] = args;
      if (Object.keys(FIRST).every((key) => held[key])) {
        fontLoaded.then(start).catch((error) => console.error('map bridge:', error));
      }
    };
  }

  const ready = until(dataLoaded).then(() => {
    initialZoom = datamap.deckgl.props.initialViewState.zoom;
    const features = datamap.metaData.feature;
    rowOfFeature = new Map();
    for (let row = 0; row < features.length; row++) rowOfFeature.set(features[row], row);
    while (queue.length) handle(queue.shift());
    postToParent({ type: 'map-ready' });
  });

  window.saeMap = {
    ready: ready,
    firstPaint: firstPaint, // the map is on screen (the preview picture, or the WebGL map without one)
    live: live, // the WebGL map is on screen and interactive
    pointClicked: pointClicked,
    rowOf: (feature) => (rowOfFeature ? rowOfFeature.get(Number(feature)) : undefined),
    highlight: (features, id) => ready.then(() => highlight({ features: features, id: id })),
    // Rows drawn as marks (every named set but the focus) and rows ringed as the focus, sorted.
    marked: () => markedRows((name) => name !== FOCUS_SET),
    ringed: () => markedRows((name) => name === FOCUS_SET),
    focus: (feature) => ready.then(() => focus({ feature: feature })),
  };
})();
