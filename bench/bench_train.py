"""Training throughput of the TopK trainer at the demo shape (d_in 576, 4,608 latents, k 32).

Prints tokens/s per batch size and the implied minutes for 1M tokens. Data: synthetic sparse
combinations of planted directions plus a large shared offset (like a residual stream).
Usage: python bench/bench_train.py [--tokens 65536] [--batch-sizes 512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from build_map.train import TrainConfig, train_sae


def synthetic(n: int, d_in: int = 576, n_planted: int = 8192, active: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_planted, d_in)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    offset = 30 * rng.standard_normal(d_in).astype(np.float32)
    out = np.empty((n, d_in), np.float32)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        chosen = rng.integers(0, n_planted, (rows, active))
        weights = rng.exponential(5.0, (rows, active)).astype(np.float32)
        out[start : start + rows] = np.einsum("na,nad->nd", weights, directions[chosen]) + offset
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--batch-sizes", default="1024,4096")
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--dtype", default="auto", help="encoder_dtype: auto, bfloat16 or float32")
    args = parser.parse_args()
    data = synthetic(args.tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens:,} tokens × 576")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = TrainConfig(n_latents=args.latents, k=32, batch_size=batch_size, encoder_dtype=args.dtype,
                          dead_tokens=10 * batch_size)  # fmt: skip
        start = time.perf_counter()
        _, metrics = train_sae(data, cfg, progress=False)
        seconds = time.perf_counter() - start
        rate = metrics.tokens_seen / seconds
        print(
            f"batch {batch_size:5d}: {metrics.steps / seconds:5.2f} steps/s, {rate:7.0f} tokens/s "
            f"→ {1e6 / rate / 60:4.1f} min per 1M tokens (FVU {metrics.fvu:.3f}, dead {metrics.dead_fraction:.1%})"
        )


if __name__ == "__main__":
    main()
