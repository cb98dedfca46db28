"""Serve the explorer with Panel: one page per browser session, the bundle as a static folder.

Safety defaults: listen on 127.0.0.1, accept websocket connections only from the page's own
host:port (so another site open in the browser cannot drive the model).

Offline: the page uses no Panel template (FastListTemplate pulls Open Sans from Google Fonts)
and no icon buttons (Bokeh's TablerIcon loads its font from a CDN); Bokeh and Panel's own JS/CSS
come from this server. The map (map.html) is self-contained (see build_map/offline_assets.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import panel as pn

from explorer.app import MAP_ROUTE, SharedState, create_app

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5006
LOCAL_ALIASES = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}


def websocket_origins(host: str, port: int) -> list[str]:
    """The page's own host:port, plus the other spelling of loopback (127.0.0.1 ↔ localhost)."""
    origins = [f"{host}:{port}"]
    if host in LOCAL_ALIASES:
        origins.append(f"{LOCAL_ALIASES[host]}:{port}")
    return origins


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def make_server(
    shared: SharedState,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    show: bool = True,
    **kwargs,
):
    """A Bokeh server for the explorer, bound to host:port but not started (see ``run``);
    ``port=0`` picks a free port (read it back from ``server.port``)."""
    if port == 0:
        port = free_port(host)

    def app() -> pn.viewable.Viewable:  # a plain function: Panel renders a partial as text
        return create_app(shared)

    return pn.serve(
        app,
        address=host,
        port=port,
        websocket_origin=websocket_origins(host, port),
        static_dirs={MAP_ROUTE: str(shared.bundle.path)},
        title=shared.title,
        show=show,
        start=False,
        verbose=False,
        **kwargs,
    )


def run(server) -> None:
    """Run a server from ``make_server`` until Ctrl+C."""
    server.start()
    with contextlib.suppress(KeyboardInterrupt):
        server.io_loop.start()
