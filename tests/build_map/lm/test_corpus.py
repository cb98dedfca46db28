"""Corpus sources parse into alternating chats or prose, and token sequences are deterministic."""

from __future__ import annotations

import itertools
import json

import pytest

from build_map.lm.corpus import (
    CorpusConfig,
    CorpusError,
    documents,
    iter_chatterbot,
    iter_chitchat,
    iter_jsonl_file,
    iter_source,
    iter_text_file,
    pack_sequences,
    render,
    token_sequences,
)


def _assert_alternating(conversation):
    assert conversation, "empty conversation"
    for i, message in enumerate(conversation):
        assert set(message) == {"role", "content"}
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        assert isinstance(message["content"], str) and message["content"].strip()


def test_chitchat_alternates_user_assistant():
    conversations = list(itertools.islice(iter_chitchat(), 50))
    assert len(conversations) == 50
    for conversation in conversations:
        _assert_alternating(conversation)
    assert any(len(c) > 4 for c in conversations)


def test_chatterbot_alternates_user_assistant():
    conversations = list(iter_chatterbot())
    assert len(conversations) > 1000
    for conversation in conversations:
        _assert_alternating(conversation)


def test_jsonl_forms(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        [{"role": "user", "content": "a list"}],
        {"text": "just prose"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    docs = list(iter_jsonl_file(path))
    assert docs == [lines[0]["messages"], lines[1], "just prose"]


@pytest.mark.parametrize(
    "bad, reason",
    [('{"messages": [', "Expecting"), ('{"messages": [{"role": "user"}]}', "content"), ("42", "message")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"bad\.jsonl, line 2: .*{reason}"):
        list(iter_jsonl_file(path))


def test_text_file_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First line\nsame paragraph\n\n\nSecond paragraph.\n   \nThird", encoding="utf-8")
    assert list(iter_text_file(path)) == ["First line\nsame paragraph", "Second paragraph.", "Third"]


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_source(str(tmp_path / "missing.jsonl")))
    with pytest.raises(CorpusError, match="chitchat, chatterbot"):
        list(iter_source("chitchta"))


def test_render_uses_chat_template_for_chats_only(tiny_tokenizer):
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    text = tiny_tokenizer.decode(render(tiny_tokenizer, chat))
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    assert tiny_tokenizer.decode(render(tiny_tokenizer, "plain prose")) == "plain prose"
    with_system = tiny_tokenizer.decode(render(tiny_tokenizer, chat, system_prompt="be brief"))
    assert with_system.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_pack_splits_long_and_packs_short():
    lists = [list(range(10)), [100, 101], [200, 201, 202], [300]]
    assert list(pack_sequences(lists, max_seq_len=4, min_seq_len=2)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 100, 101],
        [200, 201, 202, 300],
    ]
    assert list(pack_sequences(lists, max_seq_len=4, min_seq_len=2, pack=False)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
        [100, 101],
        [200, 201, 202],
    ]


def test_token_sequences_deterministic_and_interleaved(tmp_path, tiny_tokenizer):
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"alpha {i}"}) for i in range(40)), encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("\n\n".join(f"beta {i}" for i in range(40)), encoding="utf-8")
    cfg = CorpusConfig(sources=(str(a), str(b)), max_seq_len=16, min_seq_len=1, pack=False, seed=3)
    first = list(token_sequences(tiny_tokenizer, cfg))
    assert first == list(token_sequences(tiny_tokenizer, cfg))
    assert all(1 <= len(s) <= 16 for s in first)
    texts = [tiny_tokenizer.decode(s) for s in first]
    assert sorted(texts) == sorted([f"alpha {i}" for i in range(40)] + [f"beta {i}" for i in range(40)])
    head = [t.split()[0] for t in texts[:20]]
    assert "alpha" in head and "beta" in head  # shuffled together, not one source after the other
    other = list(token_sequences(tiny_tokenizer, CorpusConfig(sources=cfg.sources, max_seq_len=16, seed=4)))
    assert other != first


def test_documents_builtin_sources_mix():
    docs = documents(CorpusConfig(sources=("chatterbot",), seed=0))
    original = list(iter_chatterbot())
    assert docs != original  # shuffled
    assert sorted(map(str, docs)) == sorted(map(str, original))


def test_config_validation():
    with pytest.raises(CorpusError, match="max_seq_len"):
        CorpusConfig(max_seq_len=4, min_seq_len=8)
    assert CorpusConfig(sources="chitchat").sources == ("chitchat",)


def test_corpus_files_are_checked_before_any_model_loads(tmp_path):
    from build_map.lm.corpus import CorpusConfig, CorpusError, check_sources, documents

    binary, empty, good = tmp_path / "ls.txt", tmp_path / "empty.txt", tmp_path / "ok.txt"
    binary.write_bytes(b"ELF\x7f\x00\xd0\xff\xfe" * 100)
    empty.write_text("  \n\n")
    good.write_text("A paragraph.\n\nAnother one é.")
    with pytest.raises(CorpusError, match=r"ls.txt is not UTF-8 text \(byte \d+.*iconv"):
        check_sources(CorpusConfig(sources=(str(binary),)))
    with pytest.raises(CorpusError, match="empty.txt is empty"):
        check_sources(CorpusConfig(sources=(str(empty),)))
    with pytest.raises(CorpusError, match="does not exist"):
        check_sources(CorpusConfig(sources=(str(tmp_path / "missing.txt"),)))
    check_sources(CorpusConfig(sources=("chitchat", str(good))))
    # a bad byte past the first 64 KiB is caught when the file is read, with the same message
    late = tmp_path / "late.txt"
    late.write_bytes(b"words\n" * 20000 + b"\xff\xfe")
    check_sources(CorpusConfig(sources=(str(late),)))
    with pytest.raises(CorpusError, match="late.txt is not UTF-8 text"):
        documents(CorpusConfig(sources=(str(late),)))
