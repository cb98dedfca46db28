"""Keep a long-running, many-threaded server from hoarding freed memory.

glibc gives each thread that allocates its own malloc arena (up to 8 per core) and returns freed
memory to the system only from the top of a heap. A server whose worker threads generate with
torch frees gigabytes per reply that stay mapped: RSS grows by the arenas' high-water marks, not by
what is live. Two remedies, both no-ops where glibc is absent (macOS, musl):

- ``limit_malloc_arenas(n)``: at most ``n`` arenas (``mallopt(M_ARENA_MAX)``), set before the
  worker threads start;
- ``trim_freed_memory()``: ``malloc_trim(0)``, which hands free pages of every arena back, after
  each batch of replies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's malloc.h


@functools.lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 (present only in glibc)
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``n``; True when it was applied."""
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_ARENA_MAX, int(n)))
    logger.debug("malloc arenas capped at %d: %s", n, done)
    return done


def trim_freed_memory() -> bool:
    """Return freed heap pages to the system; True when glibc released some."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
