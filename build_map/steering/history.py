"""How much of a conversation a reply sees: the newest turns that fit a token budget, so a turn's
cost stops growing with the conversation (each turn re-reads its history)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def recent_turns(
    messages: Sequence[dict], count_tokens: Callable[[list[dict]], int], max_tokens: int | None
) -> tuple[list[dict], int]:
    """``messages`` without their oldest turns (a user message and what follows it up to the next
    one) until ``count_tokens`` of the rest is at most ``max_tokens``; system messages and the last
    turn always stay. Returns the kept messages and how many turns were left out."""
    messages = list(messages)
    if max_tokens is None or count_tokens(messages) <= max_tokens:
        return messages, 0
    system = [m for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    starts = [i for i, m in enumerate(rest) if m.get("role") == "user"] or [0]
    for dropped, start in enumerate(starts[1:], start=1):  # drop turns oldest first
        kept = system + rest[start:]
        if count_tokens(kept) <= max_tokens:
            return kept, dropped
    return system + rest[starts[-1] :], len(starts) - 1
