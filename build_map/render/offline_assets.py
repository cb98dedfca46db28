"""DataMapPlot's CDN files, taken from npm packages, so the map renders with no network.

DataMapPlot (0.7.3) inlines its JavaScript, CSS and fonts when ``offline_mode=True``, reading
them from three JSON cache files that its own tool fills from CDNs. This module fills the same
three files from ``static/node_modules`` (installed by ``make assets``, i.e. ``npm ci`` in
static/) into the project cache, and post-processes the rendered page so that no ``src=`` or
``href=`` points outside it.

Cache file shapes (what DataMapPlot reads):
  datamapplot_js_encoded.json    {url: {"encoded_content": base64(utf-8 text), "name": var}}
  datamapplot_css_encoded.json   the same shape
  datamapplot_fonts_encoded.json {family: [{"style", "weight", "unicode_range", "type", "content"}]}
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import platformdirs

from build_map.common.assets import STATIC_DIR_ENV, asset_text, static_dir
from build_map.common.files import write_json_atomic
from build_map.common.paths import cache_dir

logger = logging.getLogger(__name__)

JS_CACHE = "datamapplot_js_encoded.json"
CSS_CACHE = "datamapplot_css_encoded.json"
FONTS_CACHE = "datamapplot_fonts_encoded.json"
STAMP = "stamp.json"
# Bump when the cache layout or its content rules change, so old caches are rebuilt.
_BUILDER_VERSION = 1

# The exact URLs DataMapPlot asks for -> the same file inside an npm package (static/package.json).
JS_FILES = {
    "https://unpkg.com/deck.gl@9.1/dist.min.js": "deck.gl/dist.min.js",
    "https://unpkg.com/apache-arrow@latest/Arrow.es2015.min.js": "apache-arrow/Arrow.es2015.min.js",
    "https://unpkg.com/d3@latest/dist/d3.min.js": "d3/dist/d3.min.js",
    "https://unpkg.com/jquery@3.7.1/dist/jquery.min.js": "jquery/dist/jquery.min.js",
    "https://unpkg.com/d3-cloud@1.2.7/build/d3.layout.cloud.js": "d3-cloud/build/d3.layout.cloud.js",
    "https://cdn.datatables.net/1.13.8/js/jquery.dataTables.min.js": "datatables.net/js/jquery.dataTables.min.js",
}
CSS_FILES = {
    "https://cdn.datatables.net/1.13.8/css/jquery.dataTables.min.css": "datatables.net-dt/css/jquery.dataTables.min.css",
}
# The page template always links these two stylesheets from a CDN; they are inlined instead.
PAGE_STYLESHEETS = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/3.2.0/css/bootstrap-theme.min.css": "bootstrap/dist/css/bootstrap-theme.min.css",
    "https://maxcdn.bootstrapcdn.com/font-awesome/4.6.3/css/font-awesome.min.css": "font-awesome/css/font-awesome.min.css",
}
FONT_AWESOME_WOFF2 = "font-awesome/fonts/fontawesome-webfont.woff2"
FONT_FAMILY = "Roboto"
# Tooltips use 300, labels 600, bold text 700; latin-ext covers accented Latin scripts.
FONT_WEIGHTS = (300, 400, 600, 700)
FONT_SUBSETS = ("latin", "latin-ext")

_EXTERNAL_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


class OfflineAssetsError(ValueError):
    """The npm packages that hold the map's JS/CSS/fonts are missing or do not match."""


@dataclass(frozen=True)
class OfflineCache:
    """Paths of the three cache files DataMapPlot reads in offline mode."""

    folder: Path
    js: Path
    css: Path
    fonts: Path


def node_modules_dir() -> Path:
    """static/node_modules, or a clear error saying how to install it."""
    static = static_dir()
    modules = static / "node_modules"
    if not (modules / "deck.gl" / "dist.min.js").is_file():
        raise OfflineAssetsError(
            f"The map's JavaScript libraries are not installed: {modules} is missing or incomplete. "
            f"Run `make assets` (or `npm ci` in {static}) once; it needs only the npm registry. "
            f"Set {STATIC_DIR_ENV} if static/ lives elsewhere."
        )
    return modules


def escape_non_ascii(text: str) -> str:
    r"""Write every non-ASCII character as ``\uXXXX`` (UTF-16 units).

    DataMapPlot's page decodes its inlined scripts with ``atob()``, which yields Latin-1, so
    raw UTF-8 in a script (d3's minus sign, DataTables' arrows) would come out garbled.
    """

    def escape(match: re.Match[str]) -> str:
        units = match.group(0).encode("utf-16-be")
        return "".join(f"\\u{int.from_bytes(units[i : i + 2], 'big'):04x}" for i in range(0, len(units), 2))

    return re.sub(r"[^\x00-\x7f]", escape, text)


def _encoded_entry(url: str, text: str) -> dict[str, str]:
    parsed = urlparse(url)
    # The variable name DataMapPlot's own cache tool derives from the URL.
    name = f"{parsed.netloc.replace('.', '_')}_{parsed.path.split('/')[-1].replace('.', '_')}"
    return {"encoded_content": base64.b64encode(text.encode("ascii")).decode("ascii"), "name": name}


def _check_urls_covered() -> None:
    """Fail loudly if DataMapPlot asks for a URL this table does not know (a DataMapPlot upgrade)."""
    from datamapplot import offline_mode_caching  # heavy import (numba, sklearn): only when building

    unknown = set(offline_mode_caching.DEFAULT_URLS) - set(JS_FILES)
    unknown |= set(offline_mode_caching.DEFAULT_CSS_URLS) - set(CSS_FILES)
    if unknown:
        raise OfflineAssetsError(
            f"DataMapPlot {version('datamapplot')} loads {sorted(unknown)}, which "
            "build_map/render/offline_assets.py does not map to an npm file; add them to JS_FILES/CSS_FILES "
            "and static/package.json."
        )


def _read(modules: Path, relative: str) -> str:
    path = modules / relative
    if not path.is_file():
        raise OfflineAssetsError(f"{path} is missing; run `make assets` (or `npm ci` in {modules.parent}).")
    return path.read_text(encoding="utf-8")


def build_js_cache(modules: Path) -> dict[str, dict[str, str]]:
    return {url: _encoded_entry(url, escape_non_ascii(_read(modules, rel))) for url, rel in JS_FILES.items()}


def build_css_cache(modules: Path) -> dict[str, dict[str, str]]:
    return {url: _encoded_entry(url, escape_non_ascii(_read(modules, rel))) for url, rel in CSS_FILES.items()}


def _font_faces(css: str) -> dict[str, str]:
    """@fontsource CSS -> {woff2 file name: unicode-range}."""
    faces = {}
    for block in re.findall(r"@font-face\s*{[^}]+}", css):
        src = re.search(r"url\(\./files/([^)]+\.woff2)\)", block)
        ranges = re.search(r"unicode-range:\s*([^;]+);", block)
        if src:
            faces[src.group(1)] = ranges.group(1).strip() if ranges else ""
    return faces


def build_fonts_cache(modules: Path) -> dict[str, list[dict[str, str]]]:
    package = modules / "@fontsource" / "roboto"
    entries = []
    for weight in FONT_WEIGHTS:
        faces = _font_faces(_read(modules, f"@fontsource/roboto/{weight}.css"))
        for subset in FONT_SUBSETS:
            name = f"roboto-{subset}-{weight}-normal.woff2"
            if name not in faces:
                raise OfflineAssetsError(
                    f"{package / f'{weight}.css'} declares no {name}; is @fontsource/roboto 5.x installed?"
                )
            content = (package / "files" / name).read_bytes()
            entries.append(
                {
                    "style": "normal",
                    "weight": str(weight),
                    "unicode_range": faces[name],
                    "type": "woff2",
                    "content": base64.b64encode(content).decode("ascii"),
                }
            )
    return {FONT_FAMILY: entries}


def _stamp() -> dict[str, object]:
    lock = static_dir() / "package-lock.json"
    lock_hash = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "no-lock"
    return {"builder": _BUILDER_VERSION, "datamapplot": version("datamapplot"), "package_lock": lock_hash}


def ensure_offline_cache(folder: Path | None = None) -> OfflineCache:
    """Build (or reuse) the three DataMapPlot cache files from static/node_modules.

    Rebuilt when static/package-lock.json, DataMapPlot's version or this builder changes.
    """
    folder = folder or cache_dir("datamapplot-offline")
    folder.mkdir(parents=True, exist_ok=True)
    cache = OfflineCache(folder, folder / JS_CACHE, folder / CSS_CACHE, folder / FONTS_CACHE)
    stamp = _stamp()
    stamp_path = folder / STAMP
    fresh = stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
    if fresh and all(p.is_file() for p in (cache.js, cache.css, cache.fonts)):
        return cache
    modules = node_modules_dir()
    _check_urls_covered()
    logger.info("Building DataMapPlot's offline cache in %s from %s", folder, modules)
    write_json_atomic(cache.js, build_js_cache(modules))
    write_json_atomic(cache.css, build_css_cache(modules))
    write_json_atomic(cache.fonts, build_fonts_cache(modules))
    write_json_atomic(stamp_path, stamp)
    return cache


def ensure_datamapplot_css_cache(cache: OfflineCache) -> None:
    """Give DataMapPlot a CSS cache where it looks for one, so it never goes to a CDN.

    ``create_interactive_plot`` has no parameter for the CSS cache: it reads
    ``platformdirs.user_data_dir("datamapplot")``, and if that file is missing it tries the CDN
    (and writes an empty one). Only selection handlers use that CSS, and this map uses none, so
    an existing file is left alone; a missing one is filled with the same content DataMapPlot's
    own cache tool would fetch.
    """
    target = Path(platformdirs.user_data_dir("datamapplot")) / CSS_CACHE
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, json.loads(cache.css.read_text(encoding="utf-8")))


def _style_tag(css: str) -> str:
    # A stylesheet cannot end a <style> element early unless it contains "</"; none of ours do.
    return "<style>\n" + css.replace("</", "<\\/") + "\n</style>"


def _page_stylesheets(modules: Path) -> dict[str, str]:
    sheets = {url: _read(modules, rel) for url, rel in PAGE_STYLESHEETS.items()}
    fa_url = next(url for url in PAGE_STYLESHEETS if "font-awesome" in url)
    woff2 = base64.b64encode((modules / FONT_AWESOME_WOFF2).read_bytes()).decode("ascii")
    # Point Font Awesome's @font-face at the embedded woff2 instead of its relative font files.
    face = asset_text("font_awesome_face.css").strip().replace("WOFF2_BASE64", woff2)
    sheets[fa_url] = re.sub(r"@font-face\s*{[^}]*}", lambda _match: face, sheets[fa_url], count=1)
    return sheets


def make_html_offline(html: str) -> str:
    """Inline the stylesheets DataMapPlot links from CDNs and drop Google Fonts links.

    Raises OfflineAssetsError if any ``src=``/``href=`` to another host is left, so a page that
    would reach the network is never written.
    """
    modules = node_modules_dir()
    for url, css in _page_stylesheets(modules).items():
        link = re.compile(r"<link\s+href=\"" + re.escape(url) + r"\"\s+rel=\"stylesheet\"\s*/?>")
        html = link.sub(lambda _m, css=css: _style_tag(css), html)
    # The fonts are embedded as @font-face data: URLs; the Google Fonts links are redundant.
    html = re.sub(r"<link[^>]*href=\"https://fonts\.(?:googleapis|gstatic)\.com[^\"]*\"[^>]*>\s*", "", html)
    if "offlineDataTablesScript" in html and "window.offlineDataTablesScript =" not in html:
        # Only selection handlers fetch DataTables at run time; give them the inlined copy.
        entry = build_js_cache(modules)["https://cdn.datatables.net/1.13.8/js/jquery.dataTables.min.js"]
        script = asset_text("offline_datatables.js", inline_in="script").strip()
        script = script.replace("BASE64_OF_DATATABLES", entry["encoded_content"])
        html = html.replace("</head>", f"<script>{script}</script>\n</head>", 1)
    leftover = external_references(html)
    if leftover:
        raise OfflineAssetsError(f"The map page still references other hosts: {leftover[:5]}")
    return html


def external_references(html: str) -> list[str]:
    """Every ``src=``/``href=`` in ``html`` that points at another host (http(s):// or //)."""
    return [html[m.start() : m.start() + 120] for m in _EXTERNAL_REF.finditer(html)]
