"""How to train a TopK SAE: one frozen config, every field documented (the docstring is the --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainConfigError(ValueError):
    """A training setting or the activations cannot be used; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    n_latents: int = 4608
    """Number of SAE latents (features)."""
    k: int = 32
    """Active latents per token (TopK)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(n_latents / 2**14) × lr_boost (sparsify's scaling)."""
    lr_boost: float = 8.0
    """Multiplier on sparsify's default lr, which is tuned for billions of tokens where this trains on
    about a million (bench/bench_train.py sweeps it)."""
    batch_size: int = 2048
    """Tokens per optimiser step (on a CPU, 2048 trains faster per token than 1024)."""
    epochs: int = 1
    """Passes over the training split."""
    max_tokens: int | None = None
    """Stop after this many training tokens (default: all epochs)."""
    warmup_steps: int = 50
    """Linear lr warm-up steps."""
    decay_fraction: float = 0.3
    """Final fraction of the steps over which lr decays linearly to zero."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; default d_in // 2 (sparsify's heuristic)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 100_000
    """A latent inactive for this many training tokens counts as dead (and joins the AuxK loss)."""
    holdout_fraction: float = 0.02
    """Final fraction of the activations kept out of training, for the reported metrics."""
    max_norm_ratio: float | None = 10.0
    """Tokens with a norm above this multiple of the median are left out of training and metrics:
    a few attention-sink-like tokens (~100× the usual norm) would otherwise dominate the loss. None
    keeps every token."""
    normalize_inputs: bool = True
    """Scale inputs to mean norm sqrt(d_in) while training (folded back into the saved weights)."""
    median_samples: int = 8192
    """Tokens used for the geometric median that initialises b_dec."""
    encoder_dtype: str = "auto"
    """dtype of the dense top-k selection matmul: auto (bfloat16 on GPUs and CPUs with AVX512-BF16/AMX), bfloat16, float32."""
    chunk_tokens: int = 131_072
    """Tokens read from disk at once and shuffled together."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""

    def __post_init__(self):
        if self.n_latents <= 0:
            raise TrainConfigError(f"n_latents must be positive; got {self.n_latents}.")
        if not 0 < self.k <= self.n_latents:
            raise TrainConfigError(
                f"k must be between 1 and the number of latents ({self.n_latents}); got k={self.k}."
            )
        if self.batch_size <= 0 or self.epochs <= 0:
            raise TrainConfigError("batch_size and epochs must be positive.")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise TrainConfigError(f"max_tokens must be positive; got {self.max_tokens}.")
        if not 0 < self.holdout_fraction < 1:
            raise TrainConfigError(f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}.")
        if self.max_norm_ratio is not None and self.max_norm_ratio <= 1:
            raise TrainConfigError(f"max_norm_ratio must be above 1 (or None); got {self.max_norm_ratio}.")
        for name in ("lr", "lr_boost"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise TrainConfigError(f"--{name.replace('_', '-')} {value}: give a positive, finite number.")
        if self.encoder_dtype not in ("auto", "bfloat16", "float32"):
            raise TrainConfigError(
                f"encoder_dtype must be auto, bfloat16 or float32; got {self.encoder_dtype!r}."
            )

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.n_latents / 2**14) * self.lr_boost
