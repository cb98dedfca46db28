"""Harvest residual-stream activations at a hookpoint, and keep them shuffled on disk.

- ``cut_forward`` runs the model only up to the hookpoint: a forward hook stores the hookpoint's output
  and raises, so the later layers and the LM head are never computed (layer 15 of 30: ~2× faster).
- ``iter_activation_batches`` batches token sequences (right padding), and yields the activations of
  real tokens with their provenance (sequence index, position, token id). The first position of every
  sequence is dropped: it is an attention sink whose norm is ~100× the others'.
- ``harvest_to_buffer`` fills an ``ActivationBuffer``: a ``.npy`` memory map of (n_tokens, d_model) in a
  folder with ``meta.json``. The k-th harvested row is written to slot ``perm[k]`` of a seeded
  permutation, so reading consecutive rows gives shuffled tokens (random-slot writes go through the
  page cache; a buffer much larger than RAM would harvest slower). It is resumable: meta records how
  many rows are on disk (checkpointed every ~10 s and on any exit); a rerun re-forms the same batches,
  skips those already written without running the model, and continues bit-identically. A finished
  buffer is reused; a folder holding a buffer made with other settings is an error (a harvest is slow
  to redo, so it is never silently replaced) unless ``overwrite=True``.
- On a CPU with native bf16, the default ``compute_dtype="auto"`` harvests with a bf16 copy of a float32
  model: ~2× faster, ~1% relative error per activation at layer 15 of SmolLM2 (bench/bench_harvest.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from build_map.corpus import CorpusConfig, token_sequences
from build_map.hooks import scoped_forward_hook
from build_map.models import (
    LoadedModel,
    cpu_has_fast_bf16,
    d_model,
    normalize_hookpoint,
    pick_dtype,
    resolve_hookpoint,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
ACTIVATIONS_FILE = "activations.npy"
TOKENS_FILE = "token_ids.npy"
_STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
COMPUTE_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")


class HarvestError(ValueError):
    """A buffer folder or harvest request is inconsistent; the message says what to do."""


class _StopForward(Exception):
    """Raised by the hookpoint hook to skip the layers after the hookpoint."""


# ---------------------------------------------------------------------------------------------- forward


def cut_forward(
    model: nn.Module,
    hookpoint: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream at ``hookpoint``, (batch, seq, d_model), computing no layer after it."""
    module = resolve_hookpoint(model, hookpoint)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        # transformers 5 Llama layers return a tensor; older versions a tuple (hidden, ...).
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    try:
        with scoped_forward_hook(module, hook), torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    if not captured:
        raise HarvestError(f"The model's forward pass never reached hookpoint {hookpoint!r}.")
    return captured[0]


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
    hidden = cut_forward(model, hookpoint, input_ids.to(_input_device(model)))
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
    pad_id = _pad_id(tokenizer)
    for first_index, batch in batch_sequences(sequences, batch_tokens):
        if kept_count(batch, skip_first):
            yield batch_activations(model, hookpoint, batch, first_index, pad_id, skip_first)


def _pad_id(tokenizer: Any) -> int:
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0  # any id works: padded positions are masked and never read


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def resolve_compute_dtype(model: nn.Module, name: str) -> torch.dtype:
    """``model`` → the model's dtype; ``auto`` → bf16 for a float32 model on a CPU with native bf16
    (~1.7× faster for ~1% relative error at layer 15 of SmolLM2, see bench/bench_harvest.py), else
    the model's dtype; anything else names a dtype."""
    current = next(model.parameters()).dtype
    if name == "model":
        return current
    if name == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        fast = current == torch.float32 and on_cpu and cpu_has_fast_bf16()
        return torch.bfloat16 if fast else current
    return pick_dtype(torch.device("cpu"), name)


@contextlib.contextmanager
def compute_dtype(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """The model in ``dtype``: itself when it already is, else a temporary cast copy (the caller's model
    is never changed: casting down and back would lose its precision)."""
    current = next(model.parameters()).dtype
    if current == dtype:
        yield model
        return
    logger.info("Running the forward passes with a %s copy of the %s model", dtype, current)
    cast = copy.deepcopy(model).to(dtype)
    try:
        yield cast
    finally:
        del cast


# ---------------------------------------------------------------------------------------------- buffer


@dataclass(frozen=True)
class HarvestConfig:
    """How activations are computed and stored (the corpus is a separate ``CorpusConfig``)."""

    batch_tokens: int = 4096
    """Tokens per forward pass (rows × longest sequence); ~4k is fastest on CPU, larger on a GPU."""
    skip_first: int = 1
    """Leading positions of every sequence to drop (the first is an attention sink, norm ~100× others)."""
    compute_dtype: str = "auto"
    """``auto`` (bf16 for a float32 model on a CPU with native bf16, else as loaded), ``model`` (as
    loaded), ``float32``, ``bfloat16`` or ``float16``; bench/bench_harvest.py measures the trade-off."""
    storage_dtype: str = "float32"
    """``float32`` or ``float16`` (half the disk; relative rounding error ~5e-4)."""

    def __post_init__(self) -> None:
        if self.storage_dtype not in _STORAGE_DTYPES:
            raise HarvestError(
                f"Unknown storage_dtype {self.storage_dtype!r}; choose one of {', '.join(_STORAGE_DTYPES)}."
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise HarvestError(
                f"Unknown compute_dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.batch_tokens < 1 or self.skip_first < 0:
            raise HarvestError(f"Need batch_tokens >= 1 and skip_first >= 0; got {self}.")


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


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    # Write-then-rename: a crash leaves the old meta, whose n_filled undercounts (rows get redone).
    tmp = folder / f"{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, folder / META_FILE)


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


def _request_meta(
    loaded: LoadedModel,
    hookpoint: str,
    cfg: CorpusConfig,
    n_tokens: int,
    harvest: HarvestConfig,
    dtype: torch.dtype,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model": loaded.spec,
        "hookpoint": hookpoint,
        "d_model": d_model(loaded.model),
        "n_tokens_requested": n_tokens,
        "n_tokens": n_tokens,
        "n_filled": 0,
        "complete": False,
        "seed": cfg.seed,
        "corpus": dataclasses.asdict(cfg),
        "skip_first": harvest.skip_first,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "storage_dtype": harvest.storage_dtype,
        "batch_tokens": harvest.batch_tokens,
    }


def _check_same(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
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


def _create(folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shape = (meta["n_tokens"], meta["d_model"])
    storage = _STORAGE_DTYPES[meta["storage_dtype"]]
    # open_memmap writes a sparse file: unwritten rows take no disk until filled.
    np.lib.format.open_memmap(folder / ACTIVATIONS_FILE, mode="w+", dtype=storage, shape=shape).flush()
    np.lib.format.open_memmap(folder / TOKENS_FILE, mode="w+", dtype=np.int32, shape=(shape[0],)).flush()
    _write_meta(folder, meta)


def slot_permutation(n_tokens: int, seed: int) -> np.ndarray:
    """Row k of the harvest goes to slot ``perm[k]``."""
    return np.random.default_rng(seed).permutation(n_tokens)


def harvest_to_buffer(
    loaded_model: LoadedModel,
    hookpoint: str,
    cfg: CorpusConfig,
    n_tokens: int,
    folder: str | os.PathLike,
    harvest: HarvestConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationBuffer:
    """Harvest ``n_tokens`` activations at ``hookpoint`` over ``cfg``'s corpus into ``folder``.

    Resumes an unfinished buffer of the same request, reuses a finished one, and refuses (or with
    ``overwrite`` replaces) a buffer made with other settings. If the corpus runs out first, the buffer
    keeps the rows it got (still shuffled) and says so in the log and in meta.
    """
    harvest = harvest or HarvestConfig()
    if n_tokens < 1:
        raise HarvestError(f"n_tokens must be positive; got {n_tokens}.")
    folder = Path(folder)
    model, tokenizer = loaded_model.model, loaded_model.tokenizer
    hookpoint = normalize_hookpoint(model, hookpoint)
    dtype = resolve_compute_dtype(model, harvest.compute_dtype)
    request = _request_meta(loaded_model, hookpoint, cfg, n_tokens, harvest, dtype)
    meta = None if overwrite else read_meta(folder)
    if meta is not None:
        _check_same(folder, meta, request)
        if meta["complete"]:
            logger.info("Reusing the finished activation buffer in %s", folder)
            return ActivationBuffer.open(folder)
    else:
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        meta = request
        _create(folder, meta)
    with compute_dtype(model, dtype) as run_model:
        _fill(run_model, tokenizer, hookpoint, cfg, harvest, folder, meta, progress)
    return ActivationBuffer.open(folder)


class _Writer:
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
        _write_meta(self.folder, self.meta)
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        self.checkpoint()
        del self.array, self.token_ids


def _fill(
    model: nn.Module,
    tokenizer: Any,
    hookpoint: str,
    cfg: CorpusConfig,
    harvest: HarvestConfig,
    folder: Path,
    meta: dict[str, Any],
    progress: bool,
) -> None:
    writer = _Writer(folder, meta)
    n_tokens, pad_id = meta["n_tokens"], _pad_id(tokenizer)
    counted = 0  # rows the stream has produced so far, written in this run or an earlier one
    bar = tqdm(
        total=n_tokens, initial=writer.n_filled, unit="tok", desc=f"harvest {hookpoint}", disable=not progress
    )
    try:
        for first_index, batch in batch_sequences(token_sequences(tokenizer, cfg), harvest.batch_tokens):
            n_kept = kept_count(batch, harvest.skip_first)
            if counted + n_kept > writer.n_filled:  # else: written by an earlier run, skip the model
                result = batch_activations(model, hookpoint, batch, first_index, pad_id, harvest.skip_first)
                # begin > 0 only when a resumed run batches differently from the interrupted one.
                begin, end = writer.n_filled - counted, min(n_kept, n_tokens - counted)
                writer.write(result.acts[begin:end].numpy(), result.token_ids[begin:end].numpy())
                bar.update(end - begin)
            counted += n_kept
            if writer.n_filled >= n_tokens:
                break
    finally:
        writer.close()
        bar.close()
    _finish(folder, meta, cfg)


def _finish(folder: Path, meta: dict[str, Any], cfg: CorpusConfig) -> None:
    if meta["n_filled"] == 0:
        raise HarvestError(f"The corpus {list(cfg.sources)} yielded no tokens to harvest; check its sources.")
    if meta["n_filled"] < meta["n_tokens"]:
        perm = slot_permutation(meta["n_tokens"], meta["seed"])
        _shrink(folder, meta, perm[: meta["n_filled"]])
    meta["complete"] = True
    _write_meta(folder, meta)


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


def _shrink(folder: Path, meta: dict[str, Any], filled_slots: np.ndarray) -> None:
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
