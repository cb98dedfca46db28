"""How the trainer reads activations: the held-out split, outlier norms, the input scale, chunked
shuffled batches and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch

from build_map.sae.train_config import TrainConfig, TrainConfigError


def split_heldout(activations: np.ndarray, cfg: TrainConfig) -> tuple[int, int]:
    if activations.ndim != 2:
        raise TrainConfigError(
            f"activations must be a 2-D (n_tokens, d_in) array; got shape {activations.shape}."
        )
    n = len(activations)
    n_heldout = max(1, round(n * cfg.holdout_fraction))
    if n - n_heldout < cfg.k or n < 2:
        raise TrainConfigError(
            f"Only {n} activation rows: too few to train and hold out {cfg.holdout_fraction:.0%}; "
            "harvest more tokens."
        )
    return n - n_heldout, n_heldout


def read_rows(activations: np.ndarray, start: int, stop: int) -> torch.Tensor:
    # np.array copies: torch refuses read-only memmap views.
    return torch.from_numpy(np.array(activations[start:stop], dtype=np.float32))


def sample_rows(activations: np.ndarray, n_train: int, size: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randperm(n_train, generator=generator)[: min(size, n_train)].sort().values.numpy()
    return torch.from_numpy(np.asarray(activations[picks], dtype=np.float32))


def norm_limit(sample: torch.Tensor, ratio: float | None) -> float:
    """Norm above which a token counts as an outlier (ratio × the sample's median norm)."""
    median = float(sample.norm(dim=1).median())
    if not math.isfinite(median) or median == 0:
        raise TrainConfigError(
            f"Activations have median norm {median}; they hold NaN/Inf or are all zero, re-harvest them."
        )
    return math.inf if ratio is None else ratio * median


def input_scale(sample: torch.Tensor) -> float:
    """Divide inputs by this so their mean norm is sqrt(d_in) (SAELens' expected_average_only_in)."""
    return float(sample.norm(dim=1).mean()) / math.sqrt(sample.shape[1])


def _chunks(n_train: int, cfg: TrainConfig, generator: torch.Generator) -> list[tuple[int, int]]:
    """(start, stop) of each chunk read from disk, every epoch in a fresh random order."""
    bounds = [(s, min(s + cfg.chunk_tokens, n_train)) for s in range(0, n_train, cfg.chunk_tokens)]
    order = [torch.randperm(len(bounds), generator=generator).tolist() for _ in range(cfg.epochs)]
    return [bounds[i] for epoch in order for i in epoch]


def _batch_sizes(chunk_len: int, batch_size: int) -> list[int]:
    """Split a chunk into batches; a runt under half a batch joins the previous one, since the
    FVU loss normalises by the batch's own variance (meaningless for a handful of rows)."""
    sizes = [batch_size] * (chunk_len // batch_size)
    rest = chunk_len % batch_size
    if rest and (rest >= batch_size // 2 or not sizes):
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def training_plan(
    n_train: int, cfg: TrainConfig, generator: torch.Generator
) -> list[tuple[int, int, list[int]]]:
    """Chunks with their batch sizes, cut at max_tokens."""
    plan, budget = [], cfg.max_tokens or n_train * cfg.epochs
    for start, stop in _chunks(n_train, cfg, generator):
        if budget <= 0:
            break
        length = min(stop - start, budget)
        plan.append((start, start + length, _batch_sizes(length, cfg.batch_size)))
        budget -= length
    return plan


def shuffled_batches(activations: np.ndarray, plan: list, generator: torch.Generator):
    """Shuffled batches: chunks in random order, rows shuffled within each chunk."""
    for start, stop, sizes in plan:
        chunk = read_rows(activations, start, stop)
        chunk = chunk[torch.randperm(len(chunk), generator=generator)]
        yield from torch.split(chunk, sizes)


def learning_rate_at(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last decay_fraction."""
    lr = cfg.learning_rate()
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_steps = max(1, round(steps * cfg.decay_fraction))
    decay = min(1.0, (steps - step) / decay_steps)
    return lr * min(warm, decay)
