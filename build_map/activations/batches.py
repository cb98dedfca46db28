"""Batches of token sequences through the model, cut at the hookpoint, as activation rows.

``iter_activation_batches`` batches token sequences (right padding) and yields the activations of
real tokens with their provenance (sequence index, position, token id). The first position of
every sequence is dropped: it is an attention sink whose norm is ~100× the others'. Batching is a
pure function of the input, so a resumed harvest forms the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from build_map.lm.capture import cut_forward
from build_map.lm.tokens import pad_token_id


class ActivationBatch(NamedTuple):
    """Activations of the kept (non-padding, non-first) tokens of a batch, with their provenance."""

    acts: torch.Tensor  # (n, d_model) float32 on CPU
    token_ids: torch.Tensor  # (n,) int64
    sequence_ids: torch.Tensor  # (n,) int64: index of the sequence in the input stream
    positions: torch.Tensor  # (n,) int64: position within that sequence


def batch_sequences(
    sequences: Iterable[list[int]], batch_tokens: int
) -> Iterator[tuple[int, list[list[int]]]]:
    """Group sequences greedily so that rows × longest ≤ ``batch_tokens`` (at least one row).

    Yields (index of the first sequence, sequences). A pure function of its input, so a resumed
    harvest forms the same batches (and thus bit-identical activations) as an uninterrupted one.
    """
    batch: list[list[int]] = []
    first = longest = 0
    for index, sequence in enumerate(sequences):
        new_longest = max(longest, len(sequence))
        if batch and (len(batch) + 1) * new_longest > batch_tokens:
            yield first, batch
            batch, first, new_longest = [], index, len(sequence)
        batch.append(sequence)
        longest = new_longest
    if batch:
        yield first, batch


def kept_count(batch: list[list[int]], skip_first: int) -> int:
    """How many activations a batch yields, without running the model."""
    return sum(max(0, len(s) - skip_first) for s in batch)


def pad_batch(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, both (rows, longest) int64."""
    longest = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, sequence in enumerate(batch):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def batch_activations(
    model: nn.Module,
    hookpoint: str,
    batch: list[list[int]],
    first_index: int,
    pad_id: int,
    skip_first: int = 1,
) -> ActivationBatch:
    """Run one batch through ``cut_forward`` and keep the real tokens after the first ``skip_first``."""
    input_ids, attention_mask = pad_batch(batch, pad_id)
    # No attention mask: with right padding and causal attention no real token can see a pad, and
    # without a mask attention takes its faster causal kernel.
    hidden = cut_forward(model, hookpoint, input_ids)
    keep = attention_mask.bool()
    keep[:, :skip_first] = False
    rows, positions = keep.nonzero(as_tuple=True)  # row-major: sequence by sequence, position order
    acts = hidden[rows.to(hidden.device), positions.to(hidden.device)].float().cpu()
    return ActivationBatch(acts, input_ids[rows, positions], rows + first_index, positions)


def iter_activation_batches(
    model: nn.Module,
    tokenizer: Any,
    hookpoint: str,
    sequences: Iterable[list[int]],
    batch_tokens: int = 4096,
    skip_first: int = 1,
) -> Iterator[ActivationBatch]:
    """Activations of every kept token of ``sequences``, one batch of ~``batch_tokens`` tokens at a time."""
    pad_id = pad_token_id(tokenizer)
    for first_index, batch in batch_sequences(sequences, batch_tokens):
        if kept_count(batch, skip_first):
            yield batch_activations(model, hookpoint, batch, first_index, pad_id, skip_first)
