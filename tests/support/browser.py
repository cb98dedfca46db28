"""Headless Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright, offline.

Every request that is neither file:// nor data:/blob: nor to localhost is aborted and recorded,
so a test can assert that a page made no outside request. Usage::

    with offline_browser() as browser:
        page = browser.new_page()
        page.goto(path.as_uri())
        ...
        assert browser.blocked == []
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # WebGL (deck.gl) through software rendering.
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
]
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
LOCAL_SCHEMES = {"file", "data", "blob", "about", "chrome-extension", "devtools"}


def skip_without_chromium() -> None:
    """pytest.skip (with the fix) when Debian's chromium or the playwright package is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: browser tests need Debian's chromium (`make chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[dev]')")


def is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in LOCAL_SCHEMES or (parsed.hostname or "") in LOCAL_HOSTS


@dataclass
class OfflineBrowser:
    """A browser context whose outside requests are aborted and listed in ``blocked``."""

    context: object
    blocked: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def new_page(self, viewport: tuple[int, int] = (1280, 800)):
        page = self.context.new_page()
        page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        return page


@contextmanager
def offline_browser(*, headless: bool = True) -> Iterator[OfflineBrowser]:
    """Launch /usr/bin/chromium with a fresh profile; skip the test if it is not installed."""
    skip_without_chromium()
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="sae-map-chromium-"))
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=headless, args=CHROMIUM_ARGS
            )
            browser = OfflineBrowser(context)

            def route(route_, request) -> None:
                if is_local(request.url):
                    route_.continue_()
                else:
                    browser.blocked.append(request.url)
                    route_.abort()

            context.route("**/*", route)
            try:
                yield browser
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
