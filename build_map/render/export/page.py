"""`build-map export BUNDLE OUT.html`: one self-contained HTML file with the map and every feature card.

The page is the offline DataMapPlot map (``build_map.render.map_page``) plus a side panel
(static/export_card.js and static/export.css) and the card data of every visible feature
(``build_map.render.export.cards``), embedded once as base91x2 text in a <script> element at the
top of the body, so the browser decodes it while it parses the rest of the page.

Hidden features are left out everywhere: not drawn, no card, never listed as a neighbour.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from build_map.bundle.read import Bundle, load_bundle
from build_map.common.assets import asset_text
from build_map.common.files import write_text_atomic
from build_map.render.export.cards import DATA_ELEMENT_ID, ExportConfig, ExportError, encode_card_data
from build_map.render.export.codec import encode_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    """The HTML file written."""
    n_features: int
    """Features with a card (every feature that is not hidden)."""
    n_hidden: int
    """Features left out because they are hidden."""
    n_examples: int
    """Example contexts embedded."""
    n_token_strings: int
    """Distinct token strings in the deduplicated table."""
    card_data_bytes: int
    """Size of the embedded card data (as text in the page)."""
    html_bytes: int
    """Size of the whole file."""
    seconds: float
    """Wall time of the export."""

    def __str__(self) -> str:
        return (
            f"Wrote {self.out} ({self.html_bytes / 1e6:.1f} MB, card data {self.card_data_bytes / 1e6:.1f} MB): "
            f"{self.n_features} feature cards, {self.n_hidden} hidden features left out, "
            f"{self.n_examples} examples, {self.n_token_strings} distinct tokens, in {self.seconds:.1f} s."
        )


def export_bundle(
    bundle_path: str | Path,
    out_html: str | Path,
    *,
    overwrite: bool = False,
    config: ExportConfig | None = None,
    title: str | None = None,
) -> ExportSummary:
    """Write ``out_html``: the bundle's map, search and a card for every visible feature, offline."""
    start = time.perf_counter()
    config = config or ExportConfig()
    out = check_out(out_html, overwrite)
    bundle = load_bundle(bundle_path)
    hidden = bundle.features["hidden"].to_numpy(dtype=bool)
    if hidden.all():
        raise ExportError(f"Every feature of {bundle.path} is hidden; there is nothing to export.")
    title = title or default_title(bundle)
    logger.info("Encoding the cards of %d visible features", int((~hidden).sum()))
    blob, stats = encode_card_data(bundle, config, title=title)
    card_text = encode_text(blob)
    logger.info("Rendering the map")
    map_html = _render_map(bundle, config, title)
    html = assemble_html(map_html, card_text, len(blob))
    write_text_atomic(out, html)
    return ExportSummary(
        out=out,
        n_features=int((~hidden).sum()),
        n_hidden=int(hidden.sum()),
        n_examples=stats["n_examples"],
        n_token_strings=stats["n_token_strings"],
        card_data_bytes=len(card_text),
        html_bytes=len(html.encode("utf-8")),
        seconds=time.perf_counter() - start,
    )


def check_out(out_html: str | Path, overwrite: bool) -> Path:
    """Fail early, before any work, when ``out_html`` may not be written."""
    out = Path(out_html)
    if out.is_dir():
        raise ExportError(
            f"{out} is a folder; give the path of an .html file to write, e.g. {out / 'features.html'}."
        )
    if out.exists() and not overwrite:
        raise ExportError(
            f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose another file."
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ExportError(
            f"{blocking} is a file, not a folder, so {out} cannot be written; choose another path."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ExportError(
            f"{out} cannot be written: {exc.strerror or exc} in {out.parent}; choose a folder you can write to."
        ) from exc
    return out


def default_title(bundle: Bundle) -> str:
    model = bundle.manifest.get("model")
    if isinstance(model, dict):
        model = model.get("id") or model.get("spec") or model.get("path")
    parts = [str(part) for part in (model, bundle.manifest.get("hookpoint")) if part]
    return " · ".join(parts) + " SAE features" if parts else "SAE features"


def _render_map(bundle: Bundle, config: ExportConfig, title: str) -> str:
    from build_map.render.map_page import render_map_html  # DataMapPlot is heavy: import only when exporting

    n_visible = int((~bundle.features["hidden"].astype(bool)).sum())
    subtitle = f"{n_visible:,} features · click a point for its card"
    return render_map_html(
        bundle.features,  # render_map draws no hidden feature
        bundle.cluster_columns,
        title=title,
        subtitle=subtitle,
        include_dead=config.include_dead,
        max_tokens=config.hover_tokens,
    )


def assemble_html(map_html: str, card_text: str, n_bytes: int) -> str:
    """Add the card panel's style and script and the card data to the map page."""
    assert re.fullmatch(r"[^<>&\s]*", card_text), "card data text must not be able to end its element"
    panel = (
        f"<style>\n{asset_text('export.css', inline_in='style')}\n</style>\n"
        f'<script type="application/octet-stream" id="{DATA_ELEMENT_ID}" data-encoding="base91x2" '
        f'data-bytes="{n_bytes}">{card_text}</script>\n'
        f"<script>\n{asset_text('export_card.js', inline_in='script')}\n</script>\n"
    )
    # First in the body: the card data is decoded (in a worker) while the parser reads the rest
    # of the page, and the map's module script, which runs once the parser is done, finds the
    # panel's script already in place.
    body = re.compile(r"<body[^>]*>").search(map_html, max(map_html.find("</head>"), 0))
    if body is None:
        raise ValueError("the map page has no <body> tag to put the feature cards in")
    return map_html[: body.end()] + "\n" + panel + map_html[body.end() :]
