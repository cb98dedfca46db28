"""The offline DataMapPlot map: what the page embeds, that it reaches no other host, escaping,
and (in headless Chromium) clicks out to the parent page and highlights back in."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest
from datamapplot import offline_mode_caching

from build_map.render.map_page import render_map_html, visible_features
from build_map.render.offline_assets import (
    OfflineAssetsError,
    ensure_offline_cache,
    escape_non_ascii,
    external_references,
)
from tests.support.browser import offline_browser

CLUSTERS = ["cluster_0", "cluster_1", "cluster_2"]
SCRIPT_LABEL = "<script>alert(1)</script>"
SCRIPT_CLUSTER = "</script><script>alert(2)</script>"
WORDS = ["greetings", "weather", "food", "sport", "music", "travel", "code", "maths", "feelings", "family"]


def synthetic_features(n: int = 300, branches: tuple[int, ...] = (4, 3, 3), seed: int = 0) -> pd.DataFrame:
    """Features in nested blobs: `branches[0]` coarse clusters, each split into finer ones."""
    rng = np.random.default_rng(seed)
    path = np.zeros((n, len(branches)), dtype=int)
    xy = np.zeros((n, 2))
    spread = 12.0
    for level, k in enumerate(branches):
        path[:, level] = rng.integers(0, k, size=n)
        angle = 2 * np.pi * (path[:, level] + 0.5 * level) / k
        xy += spread * np.c_[np.cos(angle), np.sin(angle)]
        spread /= 3.2
    xy += rng.normal(scale=spread, size=xy.shape)
    columns = {}
    for level in range(len(branches)):
        ids = [tuple(p[: level + 1]) for p in path]
        columns[f"cluster_{level}"] = [
            f"{WORDS[sum(i) % len(WORDS)].title()} {'.'.join(map(str, i))}" for i in ids
        ]
    features = pd.DataFrame(
        {
            "feature": np.arange(n) * 3 + 7,  # ids differ from row numbers on purpose
            "x": xy[:, 0].astype(np.float32),
            "y": xy[:, 1].astype(np.float32),
            "label": [f"{WORDS[i % len(WORDS)]} feature {i}" for i in range(n)],
            "density": (10 ** rng.uniform(-6, -1, n)).astype(np.float32),
            "max_act": rng.gamma(2.0, 3.0, n).astype(np.float32),
            "top_tokens": [[" the", "Hello", "ing", "caf\u00e9", "\u2212"][: 1 + i % 5] for i in range(n)],
            "dead": np.arange(n) % 23 == 5,
            "hidden": np.arange(n) % 17 == 3,
            **columns,
        }
    )
    features.loc[0, ["x", "y", "label", "hidden", "dead"]] = [0.0, 0.0, SCRIPT_LABEL, False, False]
    features.loc[1, "cluster_2"] = SCRIPT_CLUSTER
    return features


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    # DataMapPlot reads one cache file from its user data folder: keep the tests out of the real one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory, data_home) -> Path:
    return tmp_path_factory.mktemp("offline-cache")


@pytest.fixture(scope="module")
def features() -> pd.DataFrame:
    return synthetic_features()


@pytest.fixture(scope="module")
def page(features, cache_folder) -> str:
    return render_map_html(
        features, CLUSTERS, title="Test <b>map</b>", subtitle="a & b", cache_folder=cache_folder
    )


def embedded(page: str, name: str) -> bytes:
    """The gzip-decoded bytes of one of the page's inline data constants."""
    match = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)";', page)
    assert match, f"{name} not found in the page"
    return gzip.decompress(base64.b64decode(match.group(1)))


def test_points_are_the_visible_features(page, features):
    points = feather.read_table(io.BytesIO(embedded(page, "pointDataEncoded")))
    hover = json.loads(embedded(page, "hoverDataEncoded"))
    shown = visible_features(features)
    assert points.num_rows == len(shown) == len(hover["feature"])
    assert hover["feature"] == shown["feature"].tolist()
    gone = features.loc[features["hidden"] | features["dead"], "feature"]
    assert not set(gone) & set(hover["feature"])
    assert hover["hover_text"][0] == SCRIPT_LABEL  # raw: escaped where it becomes HTML
    assert hover["path"][1].endswith(SCRIPT_CLUSTER)
    five = next(r for r in range(len(shown)) if len(shown["top_tokens"][r]) == 5)
    assert hover["tokens"][five] == [" the", "Hello", "ing", "caf\u00e9", "\u2212"]


def test_dead_features_drawn_grey_when_asked(features, cache_folder):
    page = render_map_html(features, CLUSTERS, title="t", include_dead=True, cache_folder=cache_folder)
    hover = json.loads(embedded(page, "hoverDataEncoded"))
    dead = features.loc[features["dead"] & ~features["hidden"], "feature"].tolist()
    assert dead and set(dead) <= set(hover["feature"])
    assert not set(features.loc[features["hidden"], "feature"]) & set(hover["feature"])
    rows = [hover["feature"].index(f) for f in dead]
    assert {hover["path"][r] for r in rows} == {"Unlabelled"}


def test_no_external_src_or_href(page):
    assert re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.IGNORECASE) == []
    assert external_references(page) == []
    assert "fonts.googleapis.com" not in page


def test_data_workers_use_the_native_base64_decoder(page):
    from build_map.render.map_page import _NATIVE_BASE64, _WORKER_BASE64

    assert page.count(_NATIVE_BASE64) == 1  # DataMapPlot's worker line was found and replaced
    assert page.count(_WORKER_BASE64) == 0


def test_untrusted_text_is_escaped(page):
    assert "<script>alert" not in page
    assert "Test &lt;b&gt;map&lt;/b&gt;" in page and "a &amp; b" in page
    tooltip = re.search(r"tooltipFunction: (.*),\n", page).group(1)
    fields = re.findall(r"\$\{(.*?\[index\][^}]*)\}", tooltip)
    assert len(fields) >= 5
    for field in fields:
        if field != "hoverData.feature[index]":  # an integer
            assert "replace(/[&<>\"']/g" in field, field


def test_missing_node_modules_says_what_to_do(features, tmp_path, monkeypatch, data_home):
    monkeypatch.setenv("SAE_MAP_STATIC_DIR", str(tmp_path / "static"))
    with pytest.raises(OfflineAssetsError, match=r"make assets.*npm ci"):
        render_map_html(features, CLUSTERS, title="t", cache_folder=tmp_path / "cache")


def test_offline_cache_covers_datamapplot(cache_folder):
    cache = ensure_offline_cache(cache_folder)
    js = json.loads(cache.js.read_text())
    assert set(js) == set(offline_mode_caching.DEFAULT_URLS)
    for entry in js.values():
        base64.b64decode(entry["encoded_content"]).decode("ascii")  # atob() needs ASCII
    fonts = json.loads(cache.fonts.read_text())["Roboto"]
    assert {f["weight"] for f in fonts} >= {"300", "400", "600"}
    assert all(f["unicode_range"] and f["type"] == "woff2" for f in fonts)


def test_escape_non_ascii():
    assert escape_non_ascii("a\u2212b") == "a\\u2212b"
    assert escape_non_ascii("\U0001f600") == "\\ud83d\\ude00"


PARENT_PAGE = """<!doctype html><html><body style="margin:0">
<iframe id="map" src="map.html" style="border:0;width:1000px;height:700px"></iframe>
<script>
  window.received = [];
  window.addEventListener('message', (e) => {
    if (e.source === document.getElementById('map').contentWindow) window.received.push(e.data);
  });
  window.send = (msg) => document.getElementById('map').contentWindow.postMessage(msg, '*');
</script></body></html>"""

# In the map frame: the on-screen pixel of row `i` if clicking there picks that very point.
FIND_PIXEL = """(i) => {
  const viewport = datamap.deckgl.getViewports()[0];
  const [x, y] = viewport.project([datamap.pointData.x[i], datamap.pointData.y[i]]);
  const picked = datamap.deckgl.pickObject({x: x, y: y, radius: 0, layerIds: ['dataPointLayer']});
  return picked && picked.index === i ? [x, y] : null;
}"""


@pytest.mark.browser
def test_map_in_browser_clicks_and_highlights(page, features, tmp_path):
    (tmp_path / "map.html").write_text(page, encoding="utf-8")
    (tmp_path / "parent.html").write_text(PARENT_PAGE, encoding="utf-8")
    shown = visible_features(features)
    with offline_browser() as browser:
        tab = browser.new_page()
        tab.goto((tmp_path / "parent.html").as_uri())
        tab.wait_for_function("window.received.some(m => m.type === 'map-ready')", timeout=120_000)
        frame = tab.locator("#map").element_handle().content_frame()
        frame.evaluate("window.saeMap.live")  # the WebGL map, not the preview picture, takes the clicks
        assert frame.evaluate("datamap.pointData.x.length") == len(shown)

        # Click a point that is not covered by another: the parent gets its feature id.
        row = next(r for r in range(5, len(shown)) if frame.evaluate(FIND_PIXEL, r))
        x, y = frame.evaluate(FIND_PIXEL, row)
        box = tab.locator("#map").bounding_box()
        tab.mouse.click(box["x"] + x, box["y"] + y)
        tab.wait_for_function("window.received.some(m => m.type === 'feature-click')", timeout=10_000)
        clicks = tab.evaluate("window.received.filter(m => m.type === 'feature-click')")
        assert clicks == [{"type": "feature-click", "feature": int(shown["feature"][row])}]

        # Hovering the <script> label shows it as text in the tooltip.
        tx, ty = frame.evaluate(FIND_PIXEL, 0)
        tab.mouse.move(box["x"] + tx, box["y"] + ty)
        tooltip = frame.locator(".sae-tip-label")
        tooltip.wait_for(timeout=10_000)
        assert tooltip.inner_text() == SCRIPT_LABEL
        assert frame.evaluate("document.querySelectorAll('.deck-tooltip script').length") == 0

        # Parent -> map: named highlight sets mark exactly those features, drawn over the map; no
        # other point fades (nothing is "selected"); [] clears.
        wanted = shown["feature"][[3, 10, 20]].tolist()
        tab.evaluate("(f) => window.send({type: 'highlight', features: f, id: 'reply'})", wanted)
        marked = "window.saeMap.marked()"
        frame.wait_for_function(f"{marked}.length === 3", timeout=10_000)
        assert frame.evaluate(marked) == [3, 10, 20]
        marks = "datamap.deckgl.props.layers.filter(l => l.id === 'sae-marks').map(l => l.props.data.length)"
        assert frame.evaluate(marks) == [3]
        assert (
            frame.evaluate("datamap.getSelectedIndices ? [...datamap.getSelectedIndices()].length : 0") == 0
        )
        tab.evaluate("window.send({type: 'highlight', features: [], id: 'reply'})")
        frame.wait_for_function(f"{marked}.length === 0", timeout=10_000)

        # Focus flies to a feature (a moderate zoom) and rings it.
        zoom_before = frame.evaluate("datamap.deckgl.getViewports()[0].zoom")
        tab.evaluate("(f) => window.send({type: 'focus', feature: f})", int(shown["feature"][7]))
        ringed = "window.saeMap.ringed()"
        frame.wait_for_function(f"{ringed}.length === 1 && {ringed}[0] === 7", timeout=10_000)
        frame.wait_for_function(f"datamap.deckgl.getViewports()[0].zoom > {zoom_before + 1}", timeout=10_000)
        ring = "datamap.deckgl.props.layers.filter(l => l.id === 'sae-focus-ring').length"
        assert frame.evaluate(ring) == 1

        # Search by label (DataMapPlot's own search box selects its matches).
        tab.evaluate("window.send({type: 'highlight', features: [], id: 'focus'})")
        selected = "[...datamap.getSelectedIndices()].sort((a, b) => a - b)"
        frame.fill("#text-search", "script")
        frame.wait_for_function(f"{selected}.length === 1 && {selected}[0] === 0", timeout=10_000)

    assert browser.blocked == []
    assert not [line for line in browser.console if line.startswith("pageerror")], browser.console


# Holds the map's WebGL canvas back (its GPU fence never signals) until window.holdGpu is false,
# so the preview picture can be looked at and clicked; records the clicks the page reports.
HOLD_WEBGL = """
window.holdGpu = true;
window.clicks = [];
window.addEventListener('sae-feature-click', (event) => window.clicks.push(event.detail.feature));
const getSyncParameter = WebGL2RenderingContext.prototype.getSyncParameter;
WebGL2RenderingContext.prototype.getSyncParameter = function (sync, name) {
  if (window.holdGpu && name === this.SYNC_STATUS) return this.UNSIGNALED;
  return getSyncParameter.call(this, sync, name);
};
"""

# A row whose point (on the preview, in the initial view) has no other point within 8 px: [row, x, y].
ISOLATED_POINT = """() => {
  const viewport = new deck.WebMercatorViewport({
    width: datamap.deckgl.canvas.clientWidth, height: datamap.deckgl.canvas.clientHeight,
    ...datamap.deckgl.props.initialViewState,
  });
  const xy = Array.from(datamap.pointData.x, (x, i) => viewport.project([x, datamap.pointData.y[i]]));
  for (let i = 5; i < xy.length; i++) {
    const near = xy.some(([x, y], j) => j !== i && Math.hypot(x - xy[i][0], y - xy[i][1]) < 8);
    if (!near) return [i, xy[i][0], xy[i][1]];
  }
  return null;
}"""


# What is not points, as [x0, y0, x1, y1] boxes: the page's panels (title, search, colour menu),
# and every label's text (initial view; sizes clamped as the page draws them).
NOT_POINTS = """() => {
  const viewport = new deck.WebMercatorViewport({
    width: datamap.deckgl.canvas.clientWidth, height: datamap.deckgl.canvas.clientHeight,
    ...datamap.deckgl.props.initialViewState,
  });
  const labels = datamap.labelLayer.props.data.map((d) => {
    const [x, y] = viewport.project([d.x, d.y]);
    const size = Math.min(datamap.textMaxPixelSize, Math.max(datamap.textMinPixelSize, d.size));
    const halfWidth = 0.3 * String(d.label).length * size + 4;
    return [x - halfWidth, y - 0.7 * size, x + halfWidth, y + 0.7 * size];
  });
  const panels = [...document.querySelectorAll('.container-box')].map((element) => {
    const r = element.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom];
  });
  return labels.concat(panels);
}"""


def _point_ink(png: bytes, not_points: list[list[float]], size: int = 20) -> np.ndarray:
    """The screenshot as a grid of size x size blocks: each block's mean darkness (0: the white
    page), NaN for blocks under a label (the preview's labels approximate deck.gl's) or a panel."""
    from PIL import Image

    ink = 1 - np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32) / 255
    for x0, y0, x1, y1 in not_points:
        ink[max(int(y0), 0) : max(int(y1), 0), max(int(x0), 0) : max(int(x1), 0)] = np.nan
    h, w = (ink.shape[0] // size) * size, (ink.shape[1] // size) * size
    return ink[:h, :w].reshape(h // size, size, w // size, size).mean(axis=(1, 3))


@pytest.mark.browser
def test_preview_shows_the_map_until_webgl_has_drawn_it(page, features, tmp_path):
    (tmp_path / "map.html").write_text(page, encoding="utf-8")
    shown = visible_features(features)
    with offline_browser() as browser:
        tab = browser.new_page((1000, 700))
        tab.add_init_script(HOLD_WEBGL)
        tab.goto((tmp_path / "map.html").as_uri())
        tab.wait_for_function("window.saeMap", timeout=120_000)
        tab.evaluate("window.saeMap.firstPaint")

        # The picture is up, the WebGL canvas hidden behind it.
        assert tab.evaluate("document.querySelectorAll('canvas.sae-map-preview').length") == 1
        assert tab.evaluate("datamap.deckgl.canvas.style.visibility") == "hidden"
        preview = tab.screenshot()
        not_points = tab.evaluate(NOT_POINTS)

        # A click on the picture picks the point under it, as a click on the WebGL map would.
        row, x, y = tab.evaluate(ISOLATED_POINT)
        tab.mouse.click(x, y)
        tab.wait_for_function("window.clicks.length === 1", timeout=10_000)
        assert tab.evaluate("window.clicks") == [int(shown["feature"].iloc[row])]
        tab.mouse.click(5, 690)  # empty corner: no point, no event
        assert tab.evaluate("window.clicks.length") == 1

        # Once the GPU has finished deck.gl's first frame, the WebGL map replaces the picture.
        tab.evaluate("window.holdGpu = false")
        tab.evaluate("window.saeMap.live")
        assert tab.evaluate("document.querySelectorAll('canvas.sae-map-preview').length") == 0
        assert tab.evaluate("datamap.deckgl.canvas.style.visibility") == ""
        live = tab.screenshot()

    # The same points in the same places and colours (NaN: blocks under labels, left out).
    before, after = _point_ink(preview, not_points), _point_ink(live, not_points)
    compared = ~np.isnan(before)
    assert compared.mean() > 0.3
    before, after = before[compared], after[compared]
    # (Measured: 0.02% apart; drawing the discs twice as wide puts them 6% apart.)
    assert after.sum() > 0.05  # the WebGL map drew points outside the labels
    assert np.abs(before - after).sum() < 0.02 * after.sum(), (np.abs(before - after).sum(), after.sum())
    assert browser.blocked == []
    assert not [line for line in browser.console if line.startswith("pageerror")], browser.console


def test_the_map_can_be_coloured_by_steerability_once_probed(features, page, cache_folder):
    assert "Steerability" not in page  # not probed: no such colour option
    probed = features.assign(steerability=np.linspace(0.0, 0.6, len(features)))
    coloured = render_map_html(probed, CLUSTERS, title="t", cache_folder=cache_folder)
    assert "Steerability (share of next-token probability" in coloured
