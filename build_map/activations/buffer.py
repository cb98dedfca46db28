"""The activation buffer: harvested rows in a shuffled memory map on disk, and its metadata.

A buffer is a folder with ``activations.npy`` (n_tokens, d_model), ``token_ids.npy`` and
``meta.json``. The k-th harvested row is written to slot ``perm[k]`` of a seeded permutation, so
reading consecutive rows gives shuffled tokens (random-slot writes go through the page cache; a
buffer much larger than RAM would harvest slower). ``meta.json`` records how many rows are on disk
(checkpointed every ~10 s and on any exit), which is what makes a harvest resumable.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from build_map.common.files import write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
ACTIVATIONS_FILE = "activations.npy"
TOKENS_FILE = "token_ids.npy"
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


class HarvestError(ValueError):
    """A buffer folder or harvest request is inconsistent; the message says what to do."""


class ActivationBuffer:
    """A finished harvest: ``array`` is an (n_tokens, d_model) memory map, rows in shuffled order."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self.array: np.memmap = np.load(folder / ACTIVATIONS_FILE, mmap_mode="r")
        self.token_ids: np.ndarray = np.load(folder / TOKENS_FILE, mmap_mode="r")

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ActivationBuffer:
        folder = Path(folder)
        meta = read_meta(folder)
        if meta is None:
            raise HarvestError(
                f"{folder} holds no activation buffer ({META_FILE} is missing); harvest first."
            )
        if not meta["complete"]:
            raise HarvestError(
                f"The buffer in {folder} is unfinished ({meta['n_filled']:,} of {meta['n_tokens']:,} rows); "
                "run the harvest again with the same settings to resume it."
            )
        return cls(folder, meta)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.array.shape[1])

    def split(self, held_out: float = 0.02) -> tuple[range, range]:
        """(train rows, held-out rows): the last ``held_out`` fraction is held out. Rows are already
        shuffled, so a contiguous tail is a random sample."""
        n_held = int(round(len(self) * held_out)) if held_out > 0 else 0
        n_held = min(max(n_held, 1 if held_out > 0 else 0), len(self))
        return range(0, len(self) - n_held), range(len(self) - n_held, len(self))

    def iter_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive (batch_size, d_model) float32 tensors of rows ``start:stop`` (last one may be short)."""
        stop = len(self) if stop is None else min(stop, len(self))
        for begin in range(start, stop, batch_size):
            chunk = np.array(self.array[begin : min(begin + batch_size, stop)], dtype=np.float32)
            yield torch.from_numpy(chunk)


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise HarvestError(
            f"{path} has buffer format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}; "
            "delete the folder (or pass overwrite=True) to harvest again."
        )
    return meta


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    # Atomic: a crash leaves the old meta, whose n_filled undercounts (those rows get redone).
    write_json_atomic(folder / META_FILE, meta, indent=2)


# Meta fields that define the buffer's content; a mismatch means the folder holds another harvest.
_IDENTITY = (
    "model",
    "hookpoint",
    "d_model",
    "n_tokens_requested",
    "seed",
    "corpus",
    "skip_first",
    "compute_dtype",
    "storage_dtype",
)


def check_same_request(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    old_norm = json.loads(json.dumps({k: old.get(k) for k in _IDENTITY}))
    new_norm = json.loads(json.dumps({k: new[k] for k in _IDENTITY}))  # tuples → lists, like on disk
    diffs = [
        f"{k}: {old_norm[k]!r} there, {new_norm[k]!r} asked" for k in _IDENTITY if old_norm[k] != new_norm[k]
    ]
    if diffs:
        raise HarvestError(
            f"{folder} holds a different activation buffer ({'; '.join(diffs)}). Pass another folder, "
            "delete this one, or pass overwrite=True to replace it."
        )


def create_buffer(folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shape = (meta["n_tokens"], meta["d_model"])
    storage = STORAGE_DTYPES[meta["storage_dtype"]]
    # open_memmap writes a sparse file: unwritten rows take no disk until filled.
    np.lib.format.open_memmap(folder / ACTIVATIONS_FILE, mode="w+", dtype=storage, shape=shape).flush()
    np.lib.format.open_memmap(folder / TOKENS_FILE, mode="w+", dtype=np.int32, shape=(shape[0],)).flush()
    write_meta(folder, meta)


def slot_permutation(n_tokens: int, seed: int) -> np.ndarray:
    """Row k of the harvest goes to slot ``perm[k]``."""
    return np.random.default_rng(seed).permutation(n_tokens)


class BufferWriter:
    """Writes the k-th harvested row to slot ``perm[k]``; checkpoints ``n_filled`` in meta every few
    seconds (flushing rows first, so meta never counts rows that are not on disk)."""

    def __init__(self, folder: Path, meta: dict[str, Any], checkpoint_s: float = 10.0) -> None:
        self.folder, self.meta, self.checkpoint_s = folder, meta, checkpoint_s
        self.perm = slot_permutation(meta["n_tokens"], meta["seed"])
        self.array = np.load(folder / ACTIVATIONS_FILE, mmap_mode="r+")
        self.token_ids = np.load(folder / TOKENS_FILE, mmap_mode="r+")
        self.n_filled = meta["n_filled"]
        self.last_checkpoint = time.monotonic()

    def write(self, acts: np.ndarray, token_ids: np.ndarray) -> None:
        slots = self.perm[self.n_filled : self.n_filled + len(acts)]
        self.array[slots] = _to_storage(acts, self.array.dtype)
        self.token_ids[slots] = token_ids
        self.n_filled += len(acts)
        if time.monotonic() - self.last_checkpoint > self.checkpoint_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.array.flush()
        self.token_ids.flush()
        self.meta["n_filled"] = self.n_filled
        write_meta(self.folder, self.meta)
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.checkpoint()
        del self.array, self.token_ids


def _to_storage(acts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    stored = acts.astype(dtype, copy=False)
    if not np.isfinite(stored).all():
        if not np.isfinite(acts).all():
            raise HarvestError(
                "The model produced non-finite activations at this hookpoint; check its dtype."
            )
        raise HarvestError(
            f"Activations overflow {dtype} (max |x| {np.abs(acts).max():.3g}); harvest with storage_dtype='float32'."
        )
    return stored


def shrink_to_filled(folder: Path, meta: dict[str, Any], filled_slots: np.ndarray) -> None:
    """The corpus ran out: keep only the filled slots. In slot order they are still a random order."""
    logger.warning(
        "The corpus yielded only %d of the %d tokens asked for; the buffer keeps those.",
        len(filled_slots),
        meta["n_tokens"],
    )
    slots = np.sort(filled_slots)
    for name in (ACTIVATIONS_FILE, TOKENS_FILE):
        source = np.load(folder / name, mmap_mode="r")
        shape = (len(slots), *source.shape[1:])
        target = np.lib.format.open_memmap(folder / f"{name}.tmp", mode="w+", dtype=source.dtype, shape=shape)
        for start in range(0, len(slots), 65536):
            target[start : start + 65536] = source[slots[start : start + 65536]]
        target.flush()
        del source, target
        os.replace(folder / f"{name}.tmp", folder / name)
    meta["n_tokens"] = meta["n_filled"] = len(slots)
