"""Text corpora for harvesting activations, rendered the way the model sees chat.

A *document* is either a conversation (a list of ``{"role", "content"}`` messages, rendered with the
tokenizer's chat template) or a plain string (prose, tokenized as is: no chat template). Sources:

- ``chitchat``: the chitchat-dataset wheel (7,168 person-to-person conversations, MIT). Each turn's
  utterances are joined with a space; turns alternate user / assistant, starting with user.
- ``chatterbot``: the chatterbot-corpus wheel, English yml files (short Q/A exchanges, BSD-3);
  entries alternate user / assistant.
- a path to a ``.jsonl`` file: each line is ``{"messages": [...]}``, a bare list of messages, or
  ``{"text": "..."}``.
- a path to any other file: plain text; each paragraph (blank-line separated) is one prose document.
  Prose is *not* wrapped as a user message: a user turn is something the model answers, while prose is
  ordinary text, and giving it a fake chat frame would teach the SAE a frame that never occurs.

``token_sequences`` shuffles all documents of all sources together with one seeded permutation (so the
sources interleave in proportion to their sizes), tokenizes them, splits documents longer than
``max_seq_len`` into pieces and packs short documents together, and yields token-id lists. The output
is a pure function of (tokenizer, config): feature statistics rebuild contexts from sequence indices.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]
Document = Conversation | str

BUILTIN_SOURCES = ("chitchat", "chatterbot")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's is ~10× faster, same safety
_ROLES = ("user", "assistant")


class CorpusError(ValueError):
    """A corpus source cannot be read; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class CorpusConfig:
    """Which texts to harvest activations from, and how to cut them into model inputs."""

    sources: tuple[str, ...] = BUILTIN_SOURCES
    """``chitchat``, ``chatterbot``, or paths to ``.jsonl`` / plain-text files."""
    max_seq_len: int = 256
    """Tokens per model input; longer documents are split into pieces of this length."""
    min_seq_len: int = 8
    """Sequences shorter than this are dropped (a lone ``Hi`` says little and wastes a row)."""
    pack: bool = True
    """Concatenate short documents into one sequence up to ``max_seq_len`` (fewer padded positions)."""
    system_prompt: str | None = None
    """Prepended to every conversation as a system message; None keeps the chat template's default."""
    seed: int = 0
    """Seeds the document order (and the harvest buffer's row permutation)."""

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, Path)):
            object.__setattr__(self, "sources", (str(self.sources),))
        else:
            object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if not self.sources:
            raise CorpusError(
                f"CorpusConfig.sources is empty; pass one of {', '.join(BUILTIN_SOURCES)} or a file."
            )
        if self.max_seq_len < 2 or not 1 <= self.min_seq_len <= self.max_seq_len:
            raise CorpusError(
                f"Need 2 <= max_seq_len and 1 <= min_seq_len <= max_seq_len; got max_seq_len="
                f"{self.max_seq_len}, min_seq_len={self.min_seq_len}."
            )


# ---------------------------------------------------------------------------------------------- sources


def _package_folder(package: str, pip_name: str) -> Path:
    # find_spec, not import: we only need the data files, not the packages' own code.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"The corpus needs the '{pip_name}' package: run `pip install {pip_name}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def iter_chitchat(path: str | Path | None = None) -> Iterator[Conversation]:
    """Conversations of chitchat-dataset; a turn's utterances joined by spaces; roles alternate."""
    path = Path(path) if path else _package_folder("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for record in data.values():
        turns = [
            " ".join(u["text"].strip() for u in turn if u["text"].strip()) for turn in record["messages"]
        ]
        conversation = _alternate([t for t in turns if t])
        if conversation:
            yield conversation


def iter_chatterbot(folder: str | Path | None = None) -> Iterator[Conversation]:
    """Exchanges of chatterbot-corpus's English yml files, in file-name order; roles alternate."""
    folder = (
        Path(folder)
        if folder
        else _package_folder("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    )
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_YAML_LOADER) or {}
        for exchange in data.get("conversations") or []:
            # YAML may parse a bare `yes` or `42` as a bool or a number: keep the text the author wrote.
            texts = [str(t).strip() for t in exchange if t is not None and str(t).strip()]
            if texts:
                yield _alternate(texts)


def _alternate(texts: list[str]) -> Conversation:
    return [{"role": _ROLES[i % 2], "content": text} for i, text in enumerate(texts)]


def iter_text_file(path: str | Path) -> Iterator[str]:
    """Paragraphs (blank-line separated, inner line breaks kept) of a UTF-8 text file."""
    paragraph: list[str] = []
    with open(_existing(path), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_jsonl_file(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file: ``{"messages": [...]}``, a list of messages, or ``{"text": ...}``."""
    with open(_existing(path), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_jsonl_record(json.loads(line))
            except (json.JSONDecodeError, CorpusError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise CorpusError(
                    f'{path}, line {number}: {reason}. Each line must be {{"messages": [{{"role": ..., '
                    f'"content": ...}}, ...]}}, a list of such messages, or {{"text": "..."}}.'
                ) from exc


def _parse_jsonl_record(record: Any) -> Document:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise CorpusError("expected a non-empty message list or a 'text' string")
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise CorpusError(f"message {str(message)[:60]!r} lacks a string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(
            f"Corpus file {path} does not exist. A source is one of {', '.join(BUILTIN_SOURCES)} "
            "or the path of a .jsonl or plain-text file."
        )
    return path


def iter_source(source: str) -> Iterator[Document]:
    """Documents of one source name or file path, in the source's own order."""
    if source == "chitchat":
        return iter_chitchat()
    if source == "chatterbot":
        return iter_chatterbot()
    path = Path(source)
    if not path.exists() and path.suffix.lower() not in (".jsonl", ".txt", ".md"):
        raise CorpusError(
            f"Unknown corpus source {source!r}: pass one of {', '.join(BUILTIN_SOURCES)} or the path of an "
            "existing .jsonl or plain-text file."
        )
    return iter_jsonl_file(path) if path.suffix.lower() == ".jsonl" else iter_text_file(path)


def check_sources(cfg: CorpusConfig) -> None:
    """Refuse, before any model loads, a corpus file that is missing, empty or not UTF-8 text
    (its first 64 KiB are read; the full read says the same of a later byte)."""
    for source in cfg.sources:
        if source in BUILTIN_SOURCES:
            continue
        path = _existing(source)
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if not head.strip():
            raise CorpusError(f"Corpus file {path} is empty; pass a file with text in it.")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the 64 KiB mark
                raise _not_text(path, exc) from exc


def _not_text(path: str | Path, exc: UnicodeDecodeError) -> CorpusError:
    return CorpusError(
        f"Corpus file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); pass a UTF-8 text "
        "or .jsonl file (convert it with `iconv -t utf-8`)."
    )


def documents(cfg: CorpusConfig) -> list[Document]:
    """All documents of all sources, shuffled together by ``cfg.seed``."""
    docs: list[Document] = []
    for source in cfg.sources:
        before = len(docs)
        try:
            docs.extend(iter_source(source))
        except UnicodeDecodeError as exc:
            raise _not_text(source, exc) from exc
        if len(docs) == before:
            raise CorpusError(f"Corpus source {source} holds no documents; pass a file with text in it.")
        logger.info("Corpus source %s: %d documents", source, len(docs) - before)
    random.Random(cfg.seed).shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------- tokens


def render(tokenizer: Any, document: Document, system_prompt: str | None = None) -> list[int]:
    """Token ids of one document: a conversation through the chat template, prose as plain text."""
    if isinstance(document, str):
        return list(tokenizer(document, add_special_tokens=True)["input_ids"])
    if system_prompt is not None and document[0]["role"] != "system":
        document = [{"role": "system", "content": system_prompt}, *document]
    if getattr(tokenizer, "chat_template", None):
        # Render to text, then tokenize: the template already holds any BOS / special tokens.
        text = tokenizer.apply_chat_template(document, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # A base model without a chat template: plain "role: content" lines.
    text = "\n".join(f"{m['role']}: {m['content']}" for m in document)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def pack_sequences(
    token_lists: Iterable[list[int]], max_seq_len: int, min_seq_len: int = 1, pack: bool = True
) -> Iterator[list[int]]:
    """Split lists longer than ``max_seq_len`` into pieces; pack short pieces greedily, in order."""
    pending: list[int] = []
    for tokens in token_lists:
        for start in range(0, len(tokens), max_seq_len):
            piece = tokens[start : start + max_seq_len]
            if len(piece) == max_seq_len:
                yield piece
                continue
            if not pack:
                if len(piece) >= min_seq_len:
                    yield piece
                continue
            if len(pending) + len(piece) > max_seq_len:
                if len(pending) >= min_seq_len:
                    yield pending
                pending = []
            pending = pending + piece
    if pack and len(pending) >= min_seq_len:
        yield pending


def token_sequences(tokenizer: Any, cfg: CorpusConfig) -> Iterator[list[int]]:
    """Model inputs (token-id lists of at most ``cfg.max_seq_len``), deterministic for (tokenizer, cfg)."""
    rendered = (render(tokenizer, doc, cfg.system_prompt) for doc in documents(cfg))
    return pack_sequences(rendered, cfg.max_seq_len, cfg.min_seq_len, cfg.pack)
