"""Harvest throughput on the embedded default: cut forward (fp32, bf16) vs the full forward, and the
bf16-vs-fp32 activation error. Prints figures; not a test.

    python bench/bench_harvest.py [--tokens 8192] [--layer 15] [--sweep]

Tokens/s counts harvested activations (real tokens after each sequence's first), over real corpus
sequences (chitchat + chatterbot through the chat template), padding included in the cost.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

from build_map.corpus import CorpusConfig, token_sequences
from build_map.harvest import batch_sequences, compute_dtype, iter_activation_batches, pad_batch
from build_map.models import load_model


def corpus_sample(tokenizer, n_tokens: int, max_seq_len: int) -> list[list[int]]:
    cfg = CorpusConfig(max_seq_len=max_seq_len, seed=0)
    sequences, total = [], 0
    for sequence in token_sequences(tokenizer, cfg):
        sequences.append(sequence)
        total += len(sequence) - 1
        if total >= n_tokens:
            break
    return sequences


def harvest_rate(model, tokenizer, hookpoint, sequences, batch_tokens) -> tuple[float, torch.Tensor]:
    warm = next(iter_activation_batches(model, tokenizer, hookpoint, sequences[:2], batch_tokens))
    del warm
    start = time.perf_counter()
    acts = torch.cat(
        [b.acts for b in iter_activation_batches(model, tokenizer, hookpoint, sequences, batch_tokens)]
    )
    return len(acts) / (time.perf_counter() - start), acts


def full_forward_rate(model, tokenizer, sequences, batch_tokens) -> float:
    kept = sum(len(s) - 1 for s in sequences)
    start = time.perf_counter()
    with torch.inference_mode():
        for _, batch in batch_sequences(sequences, batch_tokens):
            input_ids, attention_mask = pad_batch(batch, tokenizer.pad_token_id)
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return kept / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--sweep", action="store_true", help="also time other batch sizes / lengths (fp32)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model(device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    hookpoint = f"model.layers.{args.layer}"
    sequences = corpus_sample(tokenizer, args.tokens, args.max_seq_len)
    print(
        f"model {loaded.spec}, {hookpoint} of {model.config.num_hidden_layers}, {torch.get_num_threads()} threads, "
        f"{sum(len(s) - 1 for s in sequences):,} tokens in {len(sequences)} sequences "
        f"(max_seq_len {args.max_seq_len}, batch_tokens {args.batch_tokens}), load avg {os.getloadavg()[0]:.1f}"
    )
    fp32_rate, fp32_acts = harvest_rate(model, tokenizer, hookpoint, sequences, args.batch_tokens)
    with compute_dtype(model, torch.bfloat16) as bf16_model:
        bf16_rate, bf16_acts = harvest_rate(bf16_model, tokenizer, hookpoint, sequences, args.batch_tokens)
    full_rate = full_forward_rate(model, tokenizer, sequences, args.batch_tokens)
    print(f"cut forward fp32: {fp32_rate:8,.0f} tokens/s  ({fp32_rate / full_rate:.2f}x the full forward)")
    print(f"cut forward bf16: {bf16_rate:8,.0f} tokens/s  ({bf16_rate / full_rate:.2f}x the full forward, "
          f"{bf16_rate / fp32_rate:.2f}x cut fp32)")  # fmt: skip
    print(f"full forward fp32: {full_rate:7,.0f} tokens/s")
    error = (bf16_acts - fp32_acts).norm(dim=1) / fp32_acts.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(bf16_acts, fp32_acts, dim=1)
    print(
        f"bf16 vs fp32 relative error ‖a_bf16 − a_fp32‖/‖a_fp32‖: median {error.median():.4f}, "
        f"mean {error.mean():.4f}, p99 {error.quantile(0.99):.4f}; cosine median {cosine.median():.5f}, "
        f"min {cosine.min():.5f}; median norm fp32 {fp32_acts.norm(dim=1).median():.1f}"
    )
    if args.sweep:
        for max_seq_len, batch_tokens in itertools.product((128, 256, 512), (1024, 2048, 4096, 8192)):
            sample = corpus_sample(tokenizer, args.tokens, max_seq_len)
            rate, _ = harvest_rate(model, tokenizer, hookpoint, sample, batch_tokens)
            print(
                f"  fp32 max_seq_len {max_seq_len:4d} batch_tokens {batch_tokens:5d}: {rate:7,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
