"""Serving: websocket connections only from the page's own origins (and those the user allows)."""

from __future__ import annotations

from explorer.server import websocket_origins


def test_websocket_origins_are_the_page_only():
    assert websocket_origins("127.0.0.1", 5006) == ["127.0.0.1:5006", "localhost:5006"]
    assert websocket_origins("10.0.0.2", 80) == ["10.0.0.2:80"]


def test_websocket_origins_on_every_interface_are_this_machine(monkeypatch):
    import socket

    from explorer import server

    monkeypatch.setattr(server, "machine_names", lambda: ["box", "box.lab", "10.1.2.3", "fe80::1"])
    origins = websocket_origins("0.0.0.0", 5006)
    assert origins == [
        "localhost:5006",
        "127.0.0.1:5006",
        "box:5006",
        "box.lab:5006",
        "10.1.2.3:5006",
        "[fe80::1]:5006",
    ]
    assert "0.0.0.0:5006" not in origins  # no browser sends that origin
    assert socket.gethostname() in server.url_for("0.0.0.0", 5006)


def test_allow_origin_adds_names():
    origins = websocket_origins(
        "127.0.0.1", 5006, ["proxy.example", "proxy.example:443", "::1", "[::1]:8080"]
    )
    assert origins[2:] == ["proxy.example:5006", "proxy.example:443", "[::1]:5006", "[::1]:8080"]


def test_served_hosts_are_the_origins_without_ports():
    from explorer.server import served_hosts

    assert served_hosts(["127.0.0.1:5006", "localhost:5006", "[::1]:5006", "Proxy.Example:443"]) == {
        "127.0.0.1",
        "localhost",
        "::1",
        "proxy.example",
    }
    assert served_hosts(["127.0.0.1:5006", "*"]) is None
