"""Token ids as text, and the special ids (end of turn, padding) of a model and its tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Tokenizer markers a single-token decode can leave behind: byte-level BPE (Ġ space, Ċ newline,
# ĉ tab) and SentencePiece (▁ space).
MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})


class TokenText:
    """Token id → text, decoded once per id: ``display`` keeps spaces (examples are shown as text);
    ``clean`` strips tokenizer markers and whitespace, and gives "" for pure whitespace and broken bytes."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def display(self, ids: list[int]) -> dict[int, str]:
        missing = [i for i in ids if i not in self._cache]
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._cache.update(zip(missing, texts, strict=True))
        return {i: self._cache[i] for i in ids}

    def clean(self, ids: list[int]) -> dict[int, str]:
        return {i: clean_token(text) for i, text in self.display(ids).items()}


def clean_token(text: str) -> str:
    """A token as a list shows it: markers and surrounding whitespace removed, "" if nothing is left
    or the token is a fragment of a multi-byte character."""
    text = text.translate(MARKERS).strip()
    return "" if "\ufffd" in text else text


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the generation config's (one or several), then the tokenizer's."""
    ids: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def pad_token_id(tokenizer: Any, eos_ids: Sequence[int] = ()) -> int:
    """The padding id: the tokenizer's, else the first end-of-turn id; any id works where padded
    positions are masked and never read."""
    for token_id in (
        getattr(tokenizer, "pad_token_id", None),
        *eos_ids,
        getattr(tokenizer, "eos_token_id", None),
    ):
        if token_id is not None:
            return int(token_id)
    return 0


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both (rows, longest) int64 on the CPU: how ``generate``
    takes a batch of prompts (every row's next token is in the last column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of chat messages rendered with the chat template, the generation prompt appended
    (the template writes any BOS itself, so none is added again)."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
