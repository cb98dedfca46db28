"""A reply sees the newest turns that fit its token budget."""

from __future__ import annotations

from build_map.steering.history import recent_turns


def _words(messages):
    return sum(len(m["content"].split()) for m in messages)


def test_the_oldest_whole_turns_go_first_and_system_messages_stay():
    chat = [{"role": "system", "content": "be brief"}]
    for n in range(4):
        chat += [
            {"role": "user", "content": f"question {n} a b"},
            {"role": "assistant", "content": f"answer {n} c"},
        ]
    chat.append({"role": "user", "content": "last one"})
    assert recent_turns(chat, _words, None) == (chat, 0)
    assert recent_turns(chat, _words, 100) == (chat, 0)
    kept, dropped = recent_turns(chat, _words, 12)
    assert dropped == 3 and kept[0]["role"] == "system" and kept[1]["content"] == "question 3 a b"
    assert _words(kept) <= 12 and kept[-1]["content"] == "last one"
    kept, dropped = recent_turns(chat, _words, 1)  # nothing fits: the last turn is still sent
    assert kept == [chat[0], chat[-1]] and dropped == 4
