"""Harvest residual-stream activations at a hookpoint into an activation buffer, resumably.

``harvest_to_buffer`` runs the model (cut after the hookpoint) over a corpus and fills an
``ActivationBuffer``. A rerun of the same request re-forms the same batches, skips those already
written without running the model, and continues bit-identically. A finished buffer is reused; a
folder holding a buffer made with other settings is an error (a harvest is slow to redo, so it is
never silently replaced) unless ``overwrite=True``. With ``compute_dtype="auto"`` a float32 model
on a CPU with native bf16 harvests with a bf16 copy (about 1% relative error per activation at
layer 15 of SmolLM2, bench/bench_harvest.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from build_map.activations.batches import batch_activations, batch_sequences, kept_count
from build_map.activations.buffer import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    ActivationBuffer,
    BufferWriter,
    HarvestError,
    check_same_request,
    create_buffer,
    read_meta,
    shrink_to_filled,
    slot_permutation,
    write_meta,
)
from build_map.common.devices import COMPUTE_DTYPES, model_in_dtype, resolve_compute_dtype
from build_map.lm.corpus import CorpusConfig, token_sequences
from build_map.lm.hookpoints import d_model, normalize_hookpoint
from build_map.lm.models import LoadedModel
from build_map.lm.tokens import pad_token_id

logger = logging.getLogger(__name__)


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
        if self.storage_dtype not in STORAGE_DTYPES:
            raise HarvestError(
                f"Unknown storage_dtype {self.storage_dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}."
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise HarvestError(
                f"Unknown compute_dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.batch_tokens < 1 or self.skip_first < 0:
            raise HarvestError(f"Need batch_tokens >= 1 and skip_first >= 0; got {self}.")


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
        check_same_request(folder, meta, request)
        if meta["complete"]:
            logger.info("Reusing the finished activation buffer in %s", folder)
            return ActivationBuffer.open(folder)
    else:
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        meta = request
        create_buffer(folder, meta)
    with model_in_dtype(model, dtype) as run_model:
        _fill(run_model, tokenizer, hookpoint, cfg, harvest, folder, meta, progress)
    return ActivationBuffer.open(folder)


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
    writer = BufferWriter(folder, meta)
    n_tokens, pad_id = meta["n_tokens"], pad_token_id(tokenizer)
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
        shrink_to_filled(folder, meta, perm[: meta["n_filled"]])
    meta["complete"] = True
    write_meta(folder, meta)
