"""The one way the page runs slow work: in worker threads, with every UI change brought back to the
session's own thread.

Panel widgets belong to the session's document, and a worker thread must never touch them (nor
rely on ``pn.state.curdoc``, which a thread does not reliably see). So a click handler, which runs
on the session's thread, calls ``capture()``; workers then hand UI changes to ``call``, which
schedules them on that document at its next tick. Without a server session (tests, notebooks)
``call`` runs them at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import panel as pn

logger = logging.getLogger(__name__)

HEAVY_WORK = threading.Lock()
"""Held by a sweep or an attribution while it runs: one such job at a time per server, so they
cannot starve the chat of the CPU."""


class Background:
    """Worker threads of one panel, and the bridge from them back to the page."""

    def __init__(self, name: str, on_session_gone: Callable[[], None] | None = None):
        self.name = name
        self.on_session_gone = on_session_gone  # e.g. stop generating for a closed tab
        self._doc: Any = None
        self._workers: list[threading.Thread] = []

    def capture(self) -> None:
        """Remember the current session's document (call on the session's thread, in a callback)."""
        self._doc = pn.state.curdoc

    def spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        worker = threading.Thread(target=target, args=args, daemon=True, name=self.name)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()
        return worker

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the session's thread (directly when there is no server session)."""
        doc = self._doc
        if doc is None or doc.session_context is None:
            fn(*args)
            return
        try:
            doc.add_next_tick_callback(lambda: fn(*args))
        except Exception:  # the session is gone (tab closed): nothing to show
            logger.debug("%s: the session is gone", self.name, exc_info=True)
            if self.on_session_gone is not None:
                self.on_session_gone()

    @property
    def busy(self) -> bool:
        return any(worker.is_alive() for worker in self._workers)

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the running workers end (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
