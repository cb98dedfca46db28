"""Serve the explorer with Panel: one page per browser session, the bundle as a static folder.

Safety defaults: listen on 127.0.0.1, accept websocket connections only from the page's own
host:port (so another site open in the browser cannot drive the model). Listening on every
interface (``--host 0.0.0.0``) accepts this machine's own names and addresses; a page reached
under any other name (a proxy, a DNS alias) needs ``--allow-origin NAME``.

Offline: the page uses no Panel template (FastListTemplate pulls Open Sans from Google Fonts)
and no icon buttons (Bokeh's TablerIcon loads its font from a CDN); Bokeh and Panel's own JS/CSS
come from this server. The map (map.html) is self-contained (see build_map/render/offline_assets.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Sequence

import panel as pn

from explorer.ui.app import MAP_ROUTE, SharedState, create_app

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5006
LOCAL_ALIASES = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}  # listen on every interface


def websocket_origins(host: str, port: int, allowed: Sequence[str] = ()) -> list[str]:
    """Origins whose pages may open the app's websocket: the page's own host:port and the other
    spelling of loopback (127.0.0.1 ↔ localhost); on a wildcard address (every interface) the
    names and addresses of this machine; plus ``allowed`` (``--allow-origin``: a host, served
    port implied, or host:port; "*" allows every site and is the user's explicit choice)."""
    if host in WILDCARD_HOSTS:
        names = ["localhost", "127.0.0.1", *machine_names()]
    else:
        names = [host, *([LOCAL_ALIASES[host]] if host in LOCAL_ALIASES else [])]
    origins = [f"{_bracketed(name)}:{port}" for name in names]
    for origin in allowed:
        origins.append(origin if origin == "*" or _has_port(origin) else f"{_bracketed(origin)}:{port}")
    return list(dict.fromkeys(origins))


def machine_names() -> list[str]:
    """This machine's host name, full name and addresses (what other machines may call it)."""
    names = [socket.gethostname(), socket.getfqdn()]
    with contextlib.suppress(OSError):
        names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # a UDP "connect" sends nothing; it picks the outgoing address
        names.append(probe.getsockname()[0])
    return [name for name in dict.fromkeys(names) if name and not name.startswith(("127.", "::1"))]


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_origin(origin: str) -> str:
    """``origin`` as given to ``--allow-origin`` (HOST, HOST:PORT, [IPv6]:PORT or "*"), or a
    ValueError saying what is expected: browsers send an origin's host and port, never a scheme
    or a path."""
    if origin == "*" or re.fullmatch(
        r"(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*|[\w.-]+)(:\d+)?", origin
    ):
        return origin
    raise ValueError(
        f"{origin!r} is not HOST or HOST:PORT (e.g. proxy.example or proxy.example:443); "
        "leave out the scheme (http://) and any path."
    )


def _has_port(origin: str) -> bool:
    return re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):\d+", origin) is not None


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_for(host: str, port: int) -> str:
    shown = socket.gethostname() if host in WILDCARD_HOSTS else host
    return f"http://{_bracketed(shown)}:{port}/"


def make_server(
    shared: SharedState,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    show: bool = True,
    allowed_origins: Sequence[str] = (),
    **kwargs,
):
    """A Bokeh server for the explorer, bound to host:port but not started (see ``run``);
    ``port=0`` picks a free port (read it back from ``server.port``)."""
    if port == 0:
        port = free_port(host)

    def app() -> pn.viewable.Viewable:  # a plain function: Panel renders a partial as text
        return create_app(shared)

    origins = websocket_origins(host, port, allowed_origins)
    server = pn.serve(
        app,
        address=host,
        port=port,
        websocket_origin=origins,
        static_dirs={MAP_ROUTE: str(shared.bundle.path)},
        title=shared.title,
        show=show,
        start=False,
        verbose=False,
        **kwargs,
    )
    guard_host(server._tornado, served_hosts(origins))
    return server


def served_hosts(origins: Sequence[str]) -> set[str] | None:
    """The host names (no port, no brackets) a request may be addressed to: the names the page is
    served under, from ``websocket_origins``; None when "*" allows every site."""
    if "*" in origins:
        return None
    return {re.sub(r":\d+$", "", origin).strip("[]").lower() for origin in origins}


def guard_host(application, hosts: set[str] | None) -> None:
    """Answer 403 to any request whose Host header names none of ``hosts``: pages, static files
    and the websocket alike. DNS rebinding (a site whose name resolves to 127.0.0.1) sends its
    own name as Host, and as Origin too, which an origin check alone lets through."""
    if hosts is None:
        return
    from tornado.web import ErrorHandler

    find_handler = application.find_handler

    def checked(request, **kwargs):
        if request.host_name.strip("[]").lower() not in hosts:
            logger.warning(
                "Refused a request for host %r (serving %s)", request.host, ", ".join(sorted(hosts))
            )
            return application.get_handler_delegate(request, ErrorHandler, {"status_code": 403})
        return find_handler(request, **kwargs)

    application.find_handler = checked


def run(server) -> None:
    """Run a server from ``make_server`` until Ctrl+C."""
    server.start()
    with contextlib.suppress(KeyboardInterrupt):
        server.io_loop.start()
