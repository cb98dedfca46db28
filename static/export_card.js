// Feature cards for the exported map page (build_map/render/export/page.py puts this file, export.css and
// the card data into the DataMapPlot page). Works from file:// with no network.
//
// - decodes the embedded card data (base91x2 text -> gzip via DecompressionStream -> typed arrays);
// - a click on a point (the map bridge's `sae-feature-click` event) sets `#feature=ID`;
// - `#feature=ID` (on load and on every hash change) opens that card in the side panel and,
//   unless the point was just clicked, flies the map to it;
// - typing in the map's search box lists matching labels; a result opens its card.
// Every string from the bundle (labels, tokens, cluster names) goes into the page through
// textContent, never as HTML.
(() => {
  'use strict';

  const DATA_ID = 'sae-card-data';
  const MAX_RESULTS = 12;
  const HASH_PREFIX = '#feature=';

  const state = {
    ready: false, // card data decoded
    mapReady: false, // the WebGL map is drawn and interactive
    error: null,
    timings: {}, // ms since navigation start; card_ms: how long opening one card took
    header: null,
    arrays: null,
    current: null, // feature id of the open card
    openFeature: (feature) => openFeature(feature, { fly: true }),
    closeCard: () => closeCard(),
    card: (feature) => cardData(feature),
    decoder: () => cardDataDecoder(), // (text, nBytes) -> Promise<ArrayBuffer>; for tests
  };
  window.saeCards = state;

  // ------------------------------------------------------------------ decoding

  // Text -> bytes -> inflated card data. Self-contained, because it is also the source of a Web
  // Worker (decoding ~30 MB then runs beside the map's own start-up instead of blocking it).
  // base91x2 (export_codec.py): 13 bits per 2 characters, little-endian bit order; characters
  // outside the alphabet (e.g. line breaks added by a mail program) are skipped.
  function cardDataDecoder() {
    const lookup = new Int16Array(65536).fill(-1);
    let symbol = 0;
    for (let c = 0x21; c < 0x7f; c++) if (!'<>&'.includes(String.fromCharCode(c))) lookup[c] = symbol++;

    function textToBytes(text, nBytes) {
      const out = new Uint8Array(nBytes);
      let acc = 0;
      let bits = 0;
      let o = 0;
      let i = 0;
      // Fast path: pairs of alphabet characters (all of an untouched page).
      for (; i + 1 < text.length; i += 2) {
        const low = lookup[text.charCodeAt(i)];
        const high = lookup[text.charCodeAt(i + 1)];
        if ((low | high) < 0) break;
        acc |= (low + 91 * high) << bits;
        out[o++] = acc & 0xff; // out-of-range writes past the padding are ignored
        acc >>>= 8;
        bits += 5;
        if (bits >= 8) {
          out[o++] = acc & 0xff;
          acc >>>= 8;
          bits -= 8;
        }
      }
      let low = -1;
      for (; i < text.length && o < nBytes; i++) {
        const value = lookup[text.charCodeAt(i)];
        if (value < 0) continue;
        if (low < 0) {
          low = value;
          continue;
        }
        acc |= (low + 91 * value) << bits;
        low = -1;
        bits += 13;
        while (bits >= 8) {
          out[o++] = acc & 0xff;
          acc >>>= 8;
          bits -= 8;
        }
      }
      if (o < nBytes) throw new Error('card data: the text is truncated');
      return out;
    }

    async function decode(text, nBytes) {
      const stream = new Blob([textToBytes(text, nBytes)]).stream().pipeThrough(new DecompressionStream('gzip'));
      return new Response(stream).arrayBuffer();
    }

    if (typeof WorkerGlobalScope !== 'undefined' && self instanceof WorkerGlobalScope) {
      self.onmessage = async (event) => {
        try {
          const buffer = await decode(event.data.text, event.data.nBytes);
          self.postMessage({ buffer }, [buffer]);
        } catch (error) {
          self.postMessage({ error: String(error) });
        }
      };
    }
    return decode;
  }

  // Decoding on the page would hold its main thread for a second: a worker does it instead.
  function startDecodingWorker() {
    const source = new Blob(['(' + cardDataDecoder.toString() + ')();'], { type: 'text/javascript' });
    const url = URL.createObjectURL(source);
    let worker;
    try {
      worker = new Worker(url); // throws where workers are not allowed: decoded on the page then
    } catch (error) {
      URL.revokeObjectURL(url);
      return { decode: () => Promise.reject(error) };
    }
    let settle = null; // the pending decode's {resolve, reject}
    let failure = null;
    const finish = () => {
      worker.terminate();
      URL.revokeObjectURL(url);
    };
    worker.onerror = (event) => {
      event.preventDefault();
      finish();
      failure = new Error(event.message || 'the decoding worker failed');
      if (settle) settle.reject(failure);
    };
    worker.onmessage = (event) => {
      finish();
      if (event.data.error) settle.reject(new Error(event.data.error));
      else settle.resolve(event.data.buffer);
    };
    const decode = (text, nBytes) =>
      new Promise((resolve, reject) => {
        if (failure) return reject(failure);
        settle = { resolve, reject };
        worker.postMessage({ text, nBytes });
      });
    return { decode };
  }

  function halfToFloat(bits) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exponent = (bits >> 10) & 0x1f;
    const fraction = bits & 0x3ff;
    if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }

  const VIEWS = {
    int32: Int32Array,
    uint32: Uint32Array,
    uint16: Uint16Array,
    float16: Uint16Array, // raw bits; read with halfToFloat
    uint8: Uint8Array,
    float32: Float32Array,
  };

  function parse(buffer) {
    const bytes = new Uint8Array(buffer);
    const magic = new TextDecoder().decode(bytes.subarray(0, 8));
    if (magic !== 'SAECARD1') throw new Error('card data: unknown format ' + JSON.stringify(magic));
    const headerLength = new DataView(buffer).getUint32(8, true);
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + headerLength)));
    const base = Math.ceil((12 + headerLength) / 8) * 8;
    const arrays = {};
    for (const [name, spec] of Object.entries(header.arrays)) {
      const View = VIEWS[spec.dtype];
      if (!View) throw new Error('card data: unsupported dtype ' + spec.dtype);
      arrays[name] = new View(buffer, base + spec.offset, spec.length);
    }
    // Derived lookups: feature id -> card index, and where each example's activations start.
    let maxId = -1;
    for (const id of arrays.feature) maxId = Math.max(maxId, id);
    const indexOf = new Int32Array(maxId + 1).fill(-1);
    arrays.feature.forEach((id, k) => (indexOf[id] = k));
    const actStart = new Uint32Array(arrays.ex_len.length + 1);
    for (let e = 0; e < arrays.ex_len.length; e++) actStart[e + 1] = actStart[e] + arrays.ex_len[e];
    arrays.indexOf = indexOf;
    const peak = arrays.ex_peak;
    arrays.peakBits = peak instanceof Float32Array ? new Uint32Array(peak.buffer, peak.byteOffset, peak.length) : peak;
    arrays.actStart = actStart;
    return { header, arrays };
  }

  async function decode() {
    const element = document.getElementById(DATA_ID);
    const text = element.textContent;
    const nBytes = Number(element.dataset.bytes);
    element.textContent = ''; // the page keeps no second copy of the text
    let buffer;
    try {
      buffer = await decodingWorker.decode(text, nBytes);
    } catch (error) {
      console.warn('feature cards: decoding on the page, not in a worker:', error);
      buffer = await cardDataDecoder()(text, nBytes);
    }
    Object.assign(state, parse(buffer));
    state.timings.cards_ms = performance.now();
  }

  // Canonical Huffman codes (zlib's puff): `counts[len]` codes of each length; symbol ids are
  // in canonical order, so no symbol table is needed.
  function readHuffman(bytes, startBit, endBit, counts) {
    const out = [];
    let code = 0;
    let first = 0;
    let index = 0;
    let len = 0;
    for (let i = startBit; i < endBit; i++) {
      code |= (bytes[i >> 3] >> (7 - (i & 7))) & 1;
      len++;
      const count = counts[len] || 0;
      if (code - count < first) {
        out.push(index + code - first);
        code = first = index = len = 0;
      } else {
        index += count;
        first = (first + count) << 1;
        code <<= 1;
      }
    }
    return out;
  }

  // Per-value floats are float16 (raw bits in a Uint16Array) unless a value needed float32.
  function floatAt(name, i) {
    const value = state.arrays[name][i];
    return state.header.arrays[name].dtype === 'float16' ? halfToFloat(value) : value;
  }

  const scratch = new DataView(new ArrayBuffer(4));

  // The focus activation is stored as the XOR of its bits with the example's peak.
  function exampleAct(e) {
    const xor = state.arrays.ex_act_xor_peak;
    if (state.header.arrays.ex_peak.dtype === 'float16') return halfToFloat(state.arrays.peakBits[e] ^ xor[e]);
    scratch.setUint32(0, (state.arrays.peakBits[e] ^ xor[e]) >>> 0, true);
    return scratch.getFloat32(0, true);
  }

  function indexOfFeature(feature) {
    const { indexOf } = state.arrays;
    return Number.isInteger(feature) && feature >= 0 && feature < indexOf.length ? indexOf[feature] : -1;
  }

  // The card of one feature as plain data (null when the feature is not in this export).
  function cardData(feature) {
    if (!state.ready) return null;
    const k = indexOfFeature(Number(feature));
    if (k < 0) return null;
    const a = state.arrays;
    const h = state.header;
    const table = h.token_table;
    const ids = readHuffman(a.tokens, a.token_bits[k], a.token_bits[k + 1], h.huffman_counts);
    const tokens = ids.map((i) => table[i]);
    let pos = 0;
    const take = (n) => tokens.slice(pos, (pos += n));
    const card = {
      feature: a.feature[k],
      label: h.labels[k],
      clusters: h.cluster_names.map((names, level) => names[a['cluster_' + level][k]]),
      density: a.density[k],
      max_act: floatAt('max_act', k),
      mean_act: floatAt('mean_act', k),
      detection: a.detection ? a.detection[k] : NaN,
      fuzzing: a.fuzzing ? a.fuzzing[k] : NaN,
      top_tokens: take(a.n_top_tokens[k]),
      top_logits: take(a.n_top_logits[k]),
      bottom_logits: take(a.n_bottom_logits[k]),
      examples: [],
      neighbors: Array.from(a.neighbors.subarray(a.neighbor_offsets[k], a.neighbor_offsets[k + 1])),
    };
    for (let e = a.ex_offsets[k]; e < a.ex_offsets[k + 1]; e++) {
      const peak = floatAt('ex_peak', e);
      const quantised = a.ex_acts.subarray(a.actStart[e], a.actStart[e + 1]);
      card.examples.push({
        act: exampleAct(e),
        tokens: take(a.ex_len[e]),
        quantised: quantised,
        acts: Array.from(quantised, (q) => (q / 255) * peak),
      });
    }
    return card;
  }

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const fmtPercent = (d) => (Number.isFinite(d) ? Number((d * 100).toPrecision(3)) + '%' : 'n/a');
  const fmtAct = (v) => (Number.isFinite(v) ? Number(v.toPrecision(3)).toString() : 'n/a');
  // Whitespace-only or newline tokens are invisible as text; show them with a visible mark.
  const visibleToken = (t) => (t === '' ? '\u2205' : t.replace(/\n/g, '\u21b5'));

  function chips(title, tokens, className) {
    const section = el('section', 'sae-section');
    section.append(el('h3', null, title));
    if (!tokens.length) section.append(el('div', 'sae-empty', 'none'));
    const list = el('div', 'sae-chips');
    for (const token of tokens) list.append(el('span', 'sae-chip ' + className, visibleToken(token)));
    section.append(list);
    return section;
  }

  function example(ex) {
    const row = el('div', 'sae-example');
    row.append(el('span', 'sae-example-act', fmtAct(ex.act)));
    const text = el('div', 'sae-example-text');
    ex.tokens.forEach((token, i) => {
      const q = ex.quantised[i];
      const span = el('span', 'sae-token', visibleToken(token));
      if (q > 0) {
        span.style.backgroundColor = `rgba(255, 112, 0, ${(0.12 + 0.78 * (q / 255)).toFixed(3)})`;
        span.title = 'activation ' + fmtAct(ex.acts[i]);
        if (q === 255) span.classList.add('sae-token-peak');
      }
      text.append(span);
    });
    row.append(text);
    return row;
  }

  function featureLink(feature) {
    const link = el('a', 'sae-link');
    link.href = HASH_PREFIX + feature;
    const k = indexOfFeature(feature);
    link.append(el('span', 'sae-id', '#' + feature), el('span', null, k >= 0 ? state.header.labels[k] : ''));
    return link;
  }

  function clusterPath(names) {
    const parts = [];
    for (const name of names) if (name && name !== 'Unlabelled' && parts[parts.length - 1] !== name) parts.push(name);
    return parts.length ? parts.join(' \u203a ') : 'Unclustered';
  }

  function stat(name, value) {
    const box = el('div', 'sae-stat');
    box.append(el('div', 'sae-stat-value', value), el('div', 'sae-stat-name', name));
    return box;
  }

  // ------------------------------------------------------------------ the panel

  let panel = null;
  let body = null;

  function ensurePanel() {
    if (panel) return;
    panel = el('aside', 'sae-panel');
    panel.id = 'sae-card-panel';
    panel.setAttribute('aria-label', 'Feature card');
    const close = el('button', 'sae-close', '\u00d7');
    close.type = 'button';
    close.title = 'Close (Esc)';
    close.addEventListener('click', () => closeCard());
    body = el('div', 'sae-panel-body');
    panel.append(close, body);
    document.body.append(panel);
  }

  function render(card) {
    const root = el('article', 'sae-card');
    root.dataset.feature = card.feature;
    const head = el('header', 'sae-card-head');
    head.append(el('div', 'sae-card-id', 'Feature #' + card.feature));
    head.append(el('h2', 'sae-card-label', card.label || 'Unlabelled feature'));
    head.append(el('div', 'sae-card-path', clusterPath(card.clusters)));
    root.append(head);

    const stats = el('div', 'sae-stats');
    stats.append(stat('density', fmtPercent(card.density)), stat('max act', fmtAct(card.max_act)));
    stats.append(stat('mean act', fmtAct(card.mean_act)));
    // label scores on held-out examples (build-map score): chance is 2.5/10 and 5/10
    if (Number.isFinite(card.detection)) stats.append(stat('detection', (10 * card.detection).toFixed(1) + '/10 (chance 2.5)'));
    if (Number.isFinite(card.fuzzing)) stats.append(stat('fuzzing', (10 * card.fuzzing).toFixed(1) + '/10 (chance 5)'));
    root.append(stats);

    if (card.top_tokens.length) root.append(chips('Fires most on', card.top_tokens, 'sae-chip-top'));
    const lens = el('div', 'sae-lens');
    lens.append(chips('Promotes (logit lens)', card.top_logits, 'sae-chip-up'));
    lens.append(chips('Suppresses', card.bottom_logits, 'sae-chip-down'));
    root.append(lens);

    const examples = el('section', 'sae-section');
    examples.append(el('h3', null, 'Top activating examples'));
    if (!card.examples.length) examples.append(el('div', 'sae-empty', 'No examples in this bundle.'));
    for (const ex of card.examples) examples.append(example(ex));
    root.append(examples);

    const neighbours = el('section', 'sae-section');
    neighbours.append(el('h3', null, 'Nearest features'));
    if (!card.neighbors.length) neighbours.append(el('div', 'sae-empty', 'none'));
    const list = el('div', 'sae-links');
    for (const feature of card.neighbors) list.append(featureLink(feature));
    neighbours.append(list);
    root.append(neighbours);
    return root;
  }

  function showMessage(text) {
    ensurePanel();
    body.replaceChildren(el('div', 'sae-message', text));
    panel.classList.add('sae-open');
  }

  function openFeature(feature, { fly }) {
    feature = Number(feature);
    if (!state.ready) return showMessage(state.error ? 'Card data could not be read: ' + state.error : 'Loading cards\u2026');
    const start = performance.now();
    const card = cardData(feature);
    if (!card) return showMessage(`Feature ${feature} is not in this export (hidden or out of range).`);
    ensurePanel();
    body.replaceChildren(render(card));
    state.timings.card_ms = performance.now() - start; // decode and build the card's DOM
    body.scrollTop = 0;
    panel.classList.add('sae-open');
    state.current = feature;
    showOnMap(feature, fly);
  }

  function closeCard() {
    if (panel) panel.classList.remove('sae-open');
    state.current = null;
    showOnMap(null, false);
    if (location.hash.startsWith(HASH_PREFIX)) history.pushState(null, '', location.pathname + location.search);
  }

  // ------------------------------------------------------------------ the map

  // The open card's point gets a ring (its own deck.gl layer) rather than the map bridge's
  // selection, which would fade every other point and clash with the search highlight.
  const MARKER_ID = 'sae-card-marker';
  const FLY_ZOOM_STEP = 3; // zoom levels past the initial view when flying to a point
  let initialZoom = null;

  function showOnMap(feature, fly) {
    mapLoaded
      .then(() => {
        const row = feature === null ? undefined : window.saeMap.rowOf(feature);
        setMarker(row);
        if (fly && row !== undefined) flyTo(row);
      })
      .catch((error) => console.warn('feature cards: map not ready', error));
  }

  function setMarker(row) {
    const layers = datamap.layers.filter((layer) => layer.id !== MARKER_ID);
    if (row !== undefined) {
      layers.push(
        new deck.ScatterplotLayer({
          id: MARKER_ID,
          data: [[datamap.pointData.x[row], datamap.pointData.y[row]]],
          getPosition: (d) => d,
          getRadius: 21,
          radiusUnits: 'pixels',
          stroked: true,
          filled: false,
          getLineColor: [255, 90, 0, 255],
          lineWidthUnits: 'pixels',
          getLineWidth: 3,
          pickable: false,
        })
      );
    }
    datamap.layers = layers;
    datamap.deckgl.setProps({ layers: [...layers] });
  }

  function flyTo(row) {
    const current = datamap.deckgl.getViewports()[0];
    const zoom = Math.max(current ? current.zoom : initialZoom, initialZoom + FLY_ZOOM_STEP);
    let longitude = datamap.pointData.x[row];
    let latitude = datamap.pointData.y[row];
    // Centre the point in the part of the map that the card panel leaves visible.
    const covered = panel && panel.classList.contains('sae-open') ? panel.getBoundingClientRect().width : 0;
    if (current && covered && covered < current.width && deck.WebMercatorViewport) {
      const target = new deck.WebMercatorViewport({ width: current.width, height: current.height, longitude, latitude, zoom });
      [longitude, latitude] = target.unproject([current.width / 2 + covered / 2, current.height / 2]);
    }
    const viewState = {
      longitude,
      latitude,
      zoom,
      transitionDuration: 700,
      transitionInterpolator: new deck.FlyToInterpolator(),
    };
    datamap.deckgl.setProps({ initialViewState: viewState });
    datamap.notifyViewStateChange(viewState);
  }

  // ------------------------------------------------------------------ hash, clicks, search

  let clicked = null; // the feature whose point was just clicked: open its card without flying

  function featureFromHash() {
    if (!location.hash.startsWith(HASH_PREFIX)) return null;
    const value = decodeURIComponent(location.hash.slice(HASH_PREFIX.length));
    return /^\d+$/.test(value) ? Number(value) : NaN;
  }

  function applyHash() {
    const feature = featureFromHash();
    if (feature === null) return;
    const fly = feature !== clicked;
    clicked = null;
    openFeature(feature, { fly });
  }

  function goTo(feature, { fromClick = false } = {}) {
    if (fromClick) clicked = feature;
    if (featureFromHash() === feature) {
      clicked = null;
      openFeature(feature, { fly: !fromClick });
    }
    else location.hash = HASH_PREFIX.slice(1) + feature;
  }

  window.addEventListener('hashchange', applyHash);
  window.addEventListener('sae-feature-click', (event) => goTo(Number(event.detail.feature), { fromClick: true }));
  window.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && panel && panel.classList.contains('sae-open')) closeCard();
  });

  function searchResults(query) {
    const q = query.trim().toLowerCase();
    if (!q || !state.ready) return [];
    const { labels } = state.header;
    const ids = state.arrays.feature;
    if (!state.lowerLabels) state.lowerLabels = labels.map((label) => label.toLowerCase());
    const results = [];
    const id = /^#?\d+$/.test(q) ? Number(q.replace('#', '')) : -1;
    if (id >= 0 && indexOfFeature(id) >= 0) results.push(indexOfFeature(id));
    for (let k = 0; k < labels.length && results.length < MAX_RESULTS; k++) {
      if (state.lowerLabels[k].includes(q) && k !== results[0]) results.push(k);
    }
    return results.map((k) => ids[k]);
  }

  function setUpSearch() {
    const input = document.getElementById('text-search');
    if (!input) return;
    const list = el('div', 'sae-search-results');
    list.setAttribute('role', 'listbox');
    input.insertAdjacentElement('afterend', list);
    const refresh = () => {
      const features = searchResults(input.value);
      list.replaceChildren(...features.map((feature) => featureLink(feature)));
      list.classList.toggle('sae-open', features.length > 0);
    };
    input.addEventListener('input', refresh);
    input.addEventListener('focus', refresh);
    input.addEventListener('keydown', (event) => {
      if (event.key !== 'Enter') return;
      const first = searchResults(input.value)[0];
      if (first !== undefined) goTo(first);
    });
    list.addEventListener('click', () => list.classList.remove('sae-open'));
  }

  // ------------------------------------------------------------------ start

  const decodingWorker = startDecodingWorker();
  // The card data comes before this script in the page (build_map/render/export/page.py), so it is decoded
  // from here on, in a worker, while the parser is still reading the map's libraries and data
  // (one core parses, the other decodes).
  const cardsReady = decode()
    .then(() => {
      state.ready = true;
    })
    .catch((error) => {
      state.error = String(error);
      console.error('feature cards:', error);
    });

  // The map page's module script (and so window.saeMap) has run by DOMContentLoaded.
  const bridge = new Promise((resolve, reject) => {
    document.addEventListener('DOMContentLoaded', () => {
      setUpSearch();
      if (window.saeMap) resolve(window.saeMap);
      else reject(new Error('the map bridge (window.saeMap) is missing'));
    });
  });
  const mapLoaded = bridge
    .then((saeMap) => saeMap.ready)
    .then(() => {
      initialZoom = datamap.deckgl.props.initialViewState.zoom;
    });
  bridge
    .then((saeMap) => saeMap.firstPaint)
    .then(() => (state.timings.first_paint_ms = performance.now()));
  mapLoaded
    .then(() => window.saeMap.live)
    .then(() => {
      state.mapReady = true;
      state.timings.map_ms = performance.now();
    })
    .catch((error) => console.error('feature cards:', error));
  Promise.all([cardsReady, bridge.catch(() => {})]).then(applyHash);
})();
