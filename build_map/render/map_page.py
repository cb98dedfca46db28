"""Render the bundle's features as a DataMapPlot map page that works with no network.

The page shows one point per feature (hidden features are never drawn; dead ones are left out
unless ``include_dead``, then drawn grey and unlabelled), cluster names as label layers that
change with zoom (coarse names win at the default zoom), a hover card (label, cluster path,
density, max activation, top tokens), search by label, and a colour-by menu (clusters per level,
log density, max activation). static/map_bridge.js connects it to a parent page: clicks post
``{type: 'feature-click', feature: id}``; ``highlight`` and ``focus`` messages come back in.

Escaping: DataMapPlot puts hover text into the tooltip as HTML and writes title, subtitle and the
colour-menu legend (which holds cluster names) into the page unescaped. Here the tooltip template
escapes every field in the browser, title and subtitle are escaped in Python, and the inline
legend JSON is re-encoded so no ``<`` can end its <script>.
"""

from __future__ import annotations

import html
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from build_map.common.assets import asset_text
from build_map.render.offline_assets import (
    FONT_FAMILY,
    OfflineCache,
    ensure_datamapplot_css_cache,
    ensure_offline_cache,
    make_html_offline,
)

logger = logging.getLogger(__name__)

NOISE_LABEL = "Unlabelled"
PATH_SEPARATOR = " \u203a "  # " › "
BASE_COLUMNS = ("feature", "x", "y", "label", "density", "max_act", "top_tokens", "dead", "hidden")
# The map page's own scripts, in order: the first-view picture, then the bridge that uses it.
BRIDGE_FILES = ("map_preview.js", "map_bridge.js")


class MapInputError(ValueError):
    """The features table cannot be drawn as a map (missing columns, nothing visible, ...)."""


def _tooltip_template() -> str:
    """The hover card: a str.format_map template (DataMapPlot fills {{ }} -> { }) whose ${...}
    fields escape every value for HTML in the browser (DataMapPlot inserts the card as HTML)."""
    return asset_text("map_tooltip.html").strip()


def _check_columns(features: pd.DataFrame, cluster_columns: Sequence[str]) -> None:
    missing = [c for c in (*BASE_COLUMNS, *cluster_columns) if c not in features.columns]
    if missing:
        raise MapInputError(
            f"The features table lacks columns {missing}; a bundle's features.parquet has "
            f"{list(BASE_COLUMNS)} plus cluster_0..cluster_(L-1)."
        )
    if not cluster_columns:
        raise MapInputError(
            "No cluster columns given; pass e.g. ['cluster_0', 'cluster_1'] (coarse to fine)."
        )


def visible_features(features: pd.DataFrame, *, include_dead: bool = False) -> pd.DataFrame:
    """The rows the map draws, in page order: never hidden ones; dead ones only if asked."""
    keep = ~features["hidden"].astype(bool)
    if not include_dead:
        keep &= ~features["dead"].astype(bool)
    return features[keep].reset_index(drop=True)


def _cluster_names(features: pd.DataFrame, cluster_columns: Sequence[str]) -> list[np.ndarray]:
    """One array of names per level, coarse to fine; dead features are noise (grey, unlabelled)."""
    dead = features["dead"].astype(bool).to_numpy()
    levels = []
    for column in cluster_columns:
        names = features[column].fillna(NOISE_LABEL).astype(str).to_numpy(dtype=object)
        names[dead] = NOISE_LABEL
        levels.append(names)
    return levels


def _cluster_paths(levels: list[np.ndarray]) -> list[str]:
    """ "coarse › … › fine" per feature, skipping noise and a name repeated from the level above."""
    paths = []
    for names in zip(*levels, strict=True):
        parts: list[str] = []
        for name in names:
            if name != NOISE_LABEL and (not parts or parts[-1] != name):
                parts.append(name)
        paths.append(PATH_SEPARATOR.join(parts) if parts else NOISE_LABEL)
    return paths


def _format_number(value: float, fmt: str) -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, fmt)


def _token_lists(column: pd.Series, max_tokens: int) -> list[list[str]]:
    lists = []
    for tokens in column:
        if tokens is None or (isinstance(tokens, float) and np.isnan(tokens)):
            lists.append([])
        else:
            lists.append([str(t) for t in list(tokens)[:max_tokens]])
    return lists


def _hover_columns(features: pd.DataFrame, levels: list[np.ndarray], max_tokens: int) -> pd.DataFrame:
    density = features["density"].astype(float).to_numpy()
    max_act = features["max_act"].astype(float).to_numpy()
    return pd.DataFrame(
        {
            "feature": features["feature"].astype(np.int64).to_numpy(),
            "path": _cluster_paths(levels),
            "density": [_format_number(100.0 * d, ".3g") + ("%" if np.isfinite(d) else "") for d in density],
            "max_act": [_format_number(a, ".4g") for a in max_act],
            "tokens": _token_lists(features["top_tokens"], max_tokens),
        }
    )


def _colormaps(features: pd.DataFrame) -> tuple[list[np.ndarray], list[dict]]:
    """Colour-by options beyond clusters: steerability (when the output probe ran: where the
    features that steer are), log10 density (densities span decades) and max act."""
    density = features["density"].astype(float).to_numpy()
    log_density = np.log10(np.clip(np.nan_to_num(density, nan=0.0), 1e-8, None))
    max_act = np.nan_to_num(features["max_act"].astype(float).to_numpy(), nan=0.0)
    rawdata = [log_density, max_act]
    metadata = [
        {
            "field": "log_density",
            "description": "Density (log10 of firing rate)",
            "cmap": "viridis",
            "kind": "continuous",
        },
        {"field": "max_act", "description": "Max activation", "cmap": "magma", "kind": "continuous"},
    ]
    if "steerability" in features and features["steerability"].notna().any():
        steerability = np.nan_to_num(features["steerability"].astype(float).to_numpy(), nan=0.0)
        rawdata.insert(0, steerability)
        metadata.insert(
            0,
            {
                "field": "steerability",
                "description": "Steerability (share of next-token probability one click moves onto the feature's words)",
                "cmap": "viridis",
                "kind": "continuous",
            },
        )
    return rawdata, metadata


def _harden_inline_json(page: str) -> str:
    """Re-encode the colour menu's JSON (it holds cluster names) so no "<" can close its script."""

    def reencode(match: re.Match[str]) -> str:
        data = json.loads(match.group(2))
        text = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return match.group(1) + text + ";"

    return re.sub(r"(const colorMaps = )(.*);$", reencode, page, flags=re.MULTILINE)


# DataMapPlot's data workers turn base64 into bytes one character at a time, in 1 MB steps; the
# browser's own decoder (Uint8Array.fromBase64, Chromium 140+, Firefox 133+, Safari 18.2+) is
# ~20x faster, which matters for the map's start-up on a small machine. Older browsers keep theirs.
_WORKER_BASE64 = (
    "const decodedData = await decodeBase64WithProgress(encodedData);"  # found in DataMapPlot's page
)
_NATIVE_BASE64 = asset_text("map_native_base64.js").strip()


def _native_base64(page: str) -> str:
    if _WORKER_BASE64 not in page:
        logger.debug("DataMapPlot's base64 worker changed; keeping its own decoder")
    return page.replace(_WORKER_BASE64, _NATIVE_BASE64)


def _bridge_js() -> str:
    return "\n".join(asset_text(name, inline_in="script") for name in BRIDGE_FILES)


def _plot(
    shown: pd.DataFrame,
    levels: list[np.ndarray],
    *,
    title: str,
    subtitle: str,
    darkmode: bool,
    max_tokens: int,
    bridge_js: str,
    cache: OfflineCache,
) -> str:
    """DataMapPlot's page for the visible features (before the offline post-processing)."""
    import datamapplot  # heavy import (numba, sklearn, matplotlib): only when a map is drawn

    colormap_rawdata, colormap_metadata = _colormaps(shown)
    with warnings.catch_warnings():
        # DataMapPlot picks colour-menu swatches with KMeans, which warns when colours repeat.
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        figure = datamapplot.create_interactive_plot(
            shown[["x", "y"]].to_numpy(dtype=np.float64),
            *reversed(levels),  # DataMapPlot wants the finest level first
            hover_text=[str(label) if label is not None else "" for label in shown["label"]],
            noise_label=NOISE_LABEL,
            darkmode=darkmode,
            extra_point_data=_hover_columns(shown, levels, max_tokens),
            hover_text_html_template=_tooltip_template(),
            on_click=asset_text("map_on_click.js").strip(),
            enable_search=True,
            search_field="hover_text",
            colormap_rawdata=colormap_rawdata,
            colormap_metadata=colormap_metadata,
            cluster_layer_colormaps=True,
            title=html.escape(title),
            sub_title=html.escape(subtitle),
            # The map usually sits in a pane beside the chat: DataMapPlot's 36pt title is too big.
            title_font_size=22,
            sub_title_font_size=13,
            font_family=FONT_FAMILY,
            tooltip_font_family=None,  # any other family makes DataMapPlot query Google Fonts
            custom_css=asset_text("map_tooltip.css"),
            custom_js=bridge_js,
            offline_mode=True,
            offline_mode_js_data_file=str(cache.js),
            offline_mode_font_data_file=str(cache.fonts),
        )
    return str(figure)


def render_map_html(
    features: pd.DataFrame,
    cluster_columns: Sequence[str],
    *,
    title: str,
    subtitle: str = "",
    include_dead: bool = False,
    max_tokens: int = 8,
    darkmode: bool = False,
    cache_folder: Path | None = None,
) -> str:
    """The map page for ``features`` (bundle columns) as one self-contained HTML string.

    ``cluster_columns`` name the cluster-name columns from coarse to fine. ``max_tokens`` top
    tokens per feature go into the hover card. ``cache_folder`` receives DataMapPlot's offline
    cache files (default: the project cache).
    """
    _check_columns(features, cluster_columns)
    shown = visible_features(features, include_dead=include_dead)
    if shown.empty:
        raise MapInputError("Every feature is hidden or dead; there is nothing to draw on the map.")
    cache = ensure_offline_cache(cache_folder)
    ensure_datamapplot_css_cache(cache)
    levels = _cluster_names(shown, cluster_columns)
    logger.info("Rendering a map of %d features (%d cluster levels)", len(shown), len(levels))
    page = _plot(
        shown,
        levels,
        title=title,
        subtitle=subtitle,
        darkmode=darkmode,
        max_tokens=max_tokens,
        bridge_js=_bridge_js(),
        cache=cache,
    )
    page = _native_base64(_harden_inline_json(page))
    # The default placeholder is an emoji, which shows as a box where no emoji font is installed.
    page = page.replace(
        'id="text-search" placeholder="\U0001f50d"', 'id="text-search" placeholder="Search labels"'
    )
    return make_html_offline(page)
