// A 2D-canvas picture of the map's first view, shown while deck.gl prepares its first WebGL frame.
// build_map/render/map_page.py puts this file before map_bridge.js in the page's module script.
//
// Without a GPU (software WebGL) deck.gl's first frame takes seconds: every shader program is
// translated and compiled on the CPU. Drawing the same points (positions, colours, radii) and the
// labels that deck.gl's collision filter would keep, from the decoded data and for the same
// initial view, is quick (saeMap.previewMs), so the map is on screen while that work goes on. The
// WebGL canvas replaces the picture once its first frame is complete (map_bridge.js). A click on
// the picture picks the nearest point, as a click on the WebGL map would.

// eslint-disable-next-line no-unused-vars
function drawMapPreview({ canvas, viewState, points, pointOptions, labels, labelOptions, fontStack, onPointClick }) {
  const DEFAULT_RADIUS_MIN = 0.2;
  const DEFAULT_RADIUS_MAX = 16;
  const CLICK_SLOP_PX = 4; // a click this far outside a point's disc still picks it
  const SDF_FONT_SIZE = 64; // deck.gl's font atlas size: outline widths are in its pixels
  const COLLISION_BOX_EM = { height: 1.25, side: 0.1 }; // see drawLabels

  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return null;
  const ratio = window.devicePixelRatio || 1;
  const preview = document.createElement('canvas');
  preview.className = 'sae-map-preview';
  preview.width = Math.round(width * ratio);
  preview.height = Math.round(height * ratio);
  Object.assign(preview.style, {
    position: 'absolute',
    left: canvas.offsetLeft + 'px',
    top: canvas.offsetTop + 'px',
    width: width + 'px',
    height: height + 'px',
    cursor: 'progress',
    zIndex: getComputedStyle(canvas).zIndex,
  });
  const context = preview.getContext('2d');
  if (!context) return null;

  // deck.gl's default view is Web Mercator, with the data's x, y as longitude, latitude.
  const viewport = new deck.WebMercatorViewport({ width, height, ...viewState });
  const n = points.x.length;
  const px = new Float32Array(n);
  const py = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const [x, y] = viewport.project([points.x[i], points.y[i]]);
    px[i] = x;
    py[i] = y;
  }

  // ScatterplotLayer with radiusUnits 'common': pixels = common units x 2^zoom, clamped.
  const scale = 2 ** viewState.zoom;
  const radiusMin = pointOptions.pointRadiusMinPixels ?? DEFAULT_RADIUS_MIN;
  const radiusMax = pointOptions.pointRadiusMaxPixels ?? DEFAULT_RADIUS_MAX;
  const radiusOf = (i) => {
    const common = pointOptions.pointSize < 0 && points.size ? points.size[i] : pointOptions.pointSize;
    return Math.min(radiusMax, Math.max(radiusMin, common * scale));
  };
  const radii = new Float32Array(n);
  for (let i = 0; i < n; i++) radii[i] = radiusOf(i);

  drawPoints(context.createImageData(preview.width, preview.height));
  drawLabels();

  function drawPoints(image) {
    // Discs written straight into the pixels (no canvas path per point), shaded as deck.gl's
    // scatterplot shader does: a smooth edge one pixel wide, where the fill colour turns into the
    // outline colour (DataMapPlot strokes every point with a hairline), blended "source over".
    const outline = pointOptions.pointOutlineColor || [250, 250, 250, 128];
    const data = image.data;
    const w = image.width;
    const h = image.height;
    const smoothstep = (x) => (x <= 0 ? 0 : x >= 1 ? 1 : x * x * (3 - 2 * x));
    for (let i = 0; i < n; i++) {
      const fillAlpha = (points.a ? points.a[i] : 255) / 255;
      const cx = px[i] * ratio;
      const cy = py[i] * ratio;
      const r = radii[i] * ratio;
      const x0 = Math.max(0, Math.floor(cx - r - 0.5));
      const x1 = Math.min(w - 1, Math.ceil(cx + r + 0.5));
      const y0 = Math.max(0, Math.floor(cy - r - 0.5));
      const y1 = Math.min(h - 1, Math.ceil(cy + r + 0.5));
      for (let y = y0; y <= y1; y++) {
        for (let x = x0; x <= x1; x++) {
          const edge = smoothstep(Math.hypot(x + 0.5 - cx, y + 0.5 - cy) - r + 0.5);
          if (edge >= 1) continue;
          const source = (fillAlpha * (1 - edge) + (outline[3] / 255) * edge) * (1 - edge);
          if (!(source > 0)) continue;
          const k = (y * w + x) * 4;
          const below = data[k + 3] / 255;
          const out = source + below * (1 - source);
          const mine = source / out;
          const keep = (below * (1 - source)) / out;
          data[k] = (points.r[i] * (1 - edge) + outline[0] * edge) * mine + data[k] * keep;
          data[k + 1] = (points.g[i] * (1 - edge) + outline[1] * edge) * mine + data[k + 1] * keep;
          data[k + 2] = (points.b[i] * (1 - edge) + outline[2] * edge) * mine + data[k + 2] * keep;
          data[k + 3] = out * 255;
        }
      }
    }
    context.putImageData(image, 0, 0);
  }

  function drawLabels() {
    // The labels deck.gl's CollisionFilterExtension shows, as it shows them.
    const minSize = labelOptions.textMinPixelSize ?? 18;
    const maxSize = labelOptions.textMaxPixelSize ?? 36;
    const collisionScale = labelOptions.textCollisionSizeScale ?? 3;
    const weight = labelOptions.fontWeight ?? 900;
    const lineSpacing = labelOptions.lineSpacing ?? 0.95;
    const colorOf = typeof labelOptions.labelTextColor === 'function' ? labelOptions.labelTextColor : (d) => [d.r, d.g, d.b];
    const noise = labelOptions.noiseLabel ?? 'Unlabelled';
    const clamp = (value, low, high) => Math.min(high, Math.max(low, value));
    const rgba = (c, alpha = 1) => `rgba(${c[0]},${c[1]},${c[2]},${(c.length > 3 ? c[3] / 255 : 1) * alpha})`;

    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.textAlign = 'center';
    context.textBaseline = 'middle';
    const box = (d, size) => {
      context.font = `${weight} ${size}px ${fontStack}`;
      const lines = String(d.label).split('\n');
      const textWidth = Math.max(...lines.map((line) => context.measureText(line).width));
      return { lines, width: textWidth, height: lines.length * size * lineSpacing };
    };
    const candidates = labels
      .filter((d) => d.label && d.label !== noise)
      .map((d) => {
        const [x, y] = viewport.project([d.x, d.y]);
        return { d, x, y, priority: d.collision_priority ?? d.size };
      })
      .filter(({ x, y }) => x >= 0 && y >= 0 && x <= width && y <= height);
    // deck.gl draws every label into a collision map at the enlarged collisionTestProps size,
    // higher priority in front, and shows a label by the share of the 5 x 5 pixels around its
    // anchor where it is in front, raised to the power 2.2: a label under a more important one
    // fades or disappears. The box each label takes in that map (COLLISION_BOX_EM: its glyph
    // cells, which are taller than the text and not clamped at sizeMaxPixels) is fitted to what
    // deck.gl 9.1 shows on a 65k-point map; a label or two may still differ until the swap.
    const rects = candidates.map(({ d, x, y }) => {
      const size = Math.max(d.size * collisionScale, minSize * 2);
      const test = box(d, size);
      const halfWidth = test.width / 2 + COLLISION_BOX_EM.side * size;
      const halfHeight = (COLLISION_BOX_EM.height * size * test.lines.length) / 2;
      return [x - halfWidth, y - halfHeight, x + halfWidth, y + halfHeight];
    });
    const order = candidates.map((_, k) => k).sort((a, b) => candidates[b].priority - candidates[a].priority);
    order.forEach((k, rank) => {
      const { x, y } = candidates[k];
      const above = order
        .slice(0, rank)
        .map((j) => rects[j])
        .filter((r) => r[0] <= x + 2 && x - 2 <= r[2] && r[1] <= y + 2 && y - 2 <= r[3]);
      let inFront = 0;
      for (let dy = -2; dy <= 2; dy++) {
        for (let dx = -2; dx <= 2; dx++) {
          const sx = x + dx;
          const sy = y + dy;
          if (!above.some((r) => r[0] <= sx && sx <= r[2] && r[1] <= sy && sy <= r[3])) inFront++;
        }
      }
      const alpha = (inFront / 25) ** 2.2;
      if (alpha < 0.01) return;
      context.globalAlpha = alpha;
      drawLabel(candidates[k], clamp(candidates[k].d.size, minSize, maxSize));
    });
    context.globalAlpha = 1;

    function drawLabel({ d, x, y }, size) {
      const { lines, width: textWidth, height: textHeight } = box(d, size);
      if (labelOptions.textBackgroundColor) {
        context.fillStyle = rgba(labelOptions.textBackgroundColor);
        context.fillRect(x - textWidth / 2, y - textHeight / 2, textWidth, textHeight);
      }
      const outline = ((labelOptions.textOutlineWidth ?? 0) * size) / SDF_FONT_SIZE;
      context.lineJoin = 'round';
      lines.forEach((line, k) => {
        const lineY = y + (k - (lines.length - 1) / 2) * size * lineSpacing;
        if (outline > 0 && labelOptions.textOutlineColor) {
          context.lineWidth = 2 * outline;
          context.strokeStyle = rgba(labelOptions.textOutlineColor);
          context.strokeText(line, x, lineY);
        }
        context.fillStyle = rgba(colorOf(d));
        context.fillText(line, x, lineY);
      });
    }
  }

  function pointAt(x, y) {
    let best = -1;
    let bestDistance = Infinity;
    for (let i = 0; i < n; i++) {
      const distance = Math.hypot(px[i] - x, py[i] - y) - radii[i];
      if (distance < bestDistance) {
        bestDistance = distance;
        best = i;
      }
    }
    return bestDistance <= CLICK_SLOP_PX ? best : -1;
  }

  preview.addEventListener('click', (event) => {
    const bounds = preview.getBoundingClientRect();
    const index = pointAt(event.clientX - bounds.left, event.clientY - bounds.top);
    if (index >= 0 && onPointClick) onPointClick(index);
  });
  canvas.insertAdjacentElement('afterend', preview);
  return { remove: () => preview.remove() };
}
