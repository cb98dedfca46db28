"""A harvest read back: the activations of a corpus's sequences from the buffer harvested from
them, instead of running the model over them again.

A build's statistics pass streams corpus sequences through the model up to the hookpoint. When
the SAE was trained on a buffer harvested from the same corpus (the demo does this), the buffer
already holds those activations: the k-th kept token of the harvest's stream is in slot
``perm[k]``, and the statistics read the stream from its start too. ``HarvestReplay.batches``
yields the same ``ActivationBatch`` rows the model would, from the buffer, and runs the model
only for sequences past the buffer's end. The token ids stored with every row are compared with
the sequences', so a buffer of another corpus or tokenizer is an error, never silently read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from build_map.activations.batches import ActivationBatch, batch_activations, batch_sequences, kept_count
from build_map.activations.buffer import ActivationBuffer, HarvestError, slot_permutation

logger = logging.getLogger(__name__)


class HarvestReplay:
    """Stream rows of a finished buffer, addressable in harvest order."""

    def __init__(self, buffer: ActivationBuffer, model_spec: str, hookpoint: str):
        meta = buffer.meta
        if meta["model"] != model_spec or meta["hookpoint"] != hookpoint:
            raise HarvestError(
                f"The activation buffer {buffer.folder} holds {meta['model']} at {meta['hookpoint']}, not "
                f"{model_spec} at {hookpoint}; pass the buffer harvested for this model and hookpoint, or none."
            )
        self.buffer = buffer
        self.skip_first = int(meta["skip_first"])
        requested = int(meta.get("n_tokens_requested", meta["n_tokens"]))
        slots = slot_permutation(requested, meta["seed"])[: int(meta["n_filled"])]
        if len(slots) < requested:  # the corpus ran out and the buffer was compacted to its filled slots
            slots = np.searchsorted(np.sort(slots), slots)
        self.slots = slots
        """``slots[k]``: where the k-th harvested row is stored."""

    def batches(
        self, model: nn.Module, pad_id: int, hookpoint: str, sequences: Iterable[list[int]], batch_tokens: int
    ) -> Iterator[ActivationBatch]:
        """What ``iter_activation_batches`` yields for ``sequences`` (which must be the harvest's
        leading sequences), read from the buffer while it lasts, then computed by ``model``."""
        row, replayed = 0, 0
        for first_index, batch in batch_sequences(sequences, batch_tokens):
            n = kept_count(batch, self.skip_first)
            if not n:
                continue
            if row + n <= len(self.slots):
                yield self._read(batch, first_index, row)
                replayed += n
            else:
                yield batch_activations(model, hookpoint, batch, first_index, pad_id, self.skip_first)
            row += n
        logger.info(
            "Read %d of %d activation rows from the harvest buffer %s", replayed, row, self.buffer.folder
        )

    def _read(self, batch: list[list[int]], first_index: int, row: int) -> ActivationBatch:
        sequence_ids, positions, token_ids = [], [], []
        for offset, sequence in enumerate(batch):
            kept = range(self.skip_first, len(sequence))
            sequence_ids += [first_index + offset] * len(kept)
            positions += kept
            token_ids += sequence[self.skip_first :]
        slots = self.slots[row : row + len(token_ids)]
        stored = np.asarray(self.buffer.token_ids[slots], dtype=np.int64)
        expected = np.asarray(token_ids, dtype=np.int64)
        if not np.array_equal(stored, expected):
            raise HarvestError(
                f"The activation buffer {self.buffer.folder} was harvested from other text (its token "
                f"ids differ from the corpus's at row {row + int(np.argmax(stored != expected)):,}); build "
                "with the buffer's corpus and seed, or without a buffer."
            )
        acts = torch.from_numpy(np.asarray(self.buffer.array[slots], dtype=np.float32))
        return ActivationBatch(
            acts, torch.from_numpy(expected), torch.tensor(sequence_ids), torch.tensor(positions)
        )
