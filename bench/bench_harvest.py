"""Harvest throughput on the embedded default: cut forward (fp32, bf16) vs the full forward, and the
bf16-vs-fp32 activation error. Prints figures; not a test.

    python bench/bench_harvest.py [--tokens 8192] [--layer 15] [--threads N] [--sweep]

Tokens/s counts harvested activations (real tokens after each sequence's first), over real corpus
sequences (chitchat + chatterbot through the chat template), padding included in the cost. Besides
wall-clock rates it prints tokens per CPU-second per thread: on a machine shared with other jobs that
is closer to what an idle machine does.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

from build_map.activations.batches import batch_sequences, iter_activation_batches, pad_batch
from build_map.common.devices import model_in_dtype
from build_map.lm.corpus import CorpusConfig, token_sequences
from build_map.lm.models import load_model


class Timer:
    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = (time.process_time() - self.cpu) / torch.get_num_threads()

    def rates(self, n: int) -> str:
        return f"{n / self.wall:6,.0f} tokens/s ({n / self.cpu:6,.0f} per CPU-s/thread)"


def corpus_sample(tokenizer, n_tokens: int, max_seq_len: int) -> list[list[int]]:
    sequences, total = [], 0
    for sequence in token_sequences(tokenizer, CorpusConfig(max_seq_len=max_seq_len, seed=0)):
        sequences.append(sequence)
        total += len(sequence) - 1
        if total >= n_tokens:
            break
    return sequences


def harvest(model, tokenizer, hookpoint, sequences, batch_tokens) -> tuple[Timer, torch.Tensor]:
    next(iter_activation_batches(model, tokenizer, hookpoint, sequences[:2], batch_tokens))  # warm up
    with Timer() as timer:
        batches = iter_activation_batches(model, tokenizer, hookpoint, sequences, batch_tokens)
        acts = torch.cat([b.acts for b in batches])
    return timer, acts


def full_forward(model, tokenizer, sequences, batch_tokens) -> Timer:
    with Timer() as timer, torch.inference_mode():
        for _, batch in batch_sequences(sequences, batch_tokens):
            input_ids, _ = pad_batch(batch, tokenizer.pad_token_id)
            model(input_ids=input_ids, use_cache=False)  # right padding needs no mask, as in harvest
    return timer


def report_error(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    error = (bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    print(
        f"bf16 vs fp32 relative error |a_bf16 - a_fp32| / |a_fp32| per token: median {error.median():.4f}, "
        f"mean {error.mean():.4f}, p99 {error.quantile(0.99):.4f}, max {error.max():.4f}; "
        f"cosine median {cosine.median():.5f}, min {cosine.min():.5f}; median norm (fp32) "
        f"{fp32.norm(dim=1).median():.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sweep", action="store_true", help="also time other batch sizes / lengths (bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    hookpoint = f"model.layers.{args.layer}"
    sequences = corpus_sample(tokenizer, args.tokens, args.max_seq_len)
    n = sum(len(s) - 1 for s in sequences)
    print(
        f"{loaded.spec}, {hookpoint} of {model.config.num_hidden_layers}, {torch.get_num_threads()} threads, "
        f"{n:,} tokens in {len(sequences)} sequences (max_seq_len {args.max_seq_len}, batch_tokens "
        f"{args.batch_tokens}), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    fp32, fp32_acts = harvest(model, tokenizer, hookpoint, sequences, args.batch_tokens)
    with model_in_dtype(model, torch.bfloat16) as bf16_model:
        bf16, bf16_acts = harvest(bf16_model, tokenizer, hookpoint, sequences, args.batch_tokens)
        full = full_forward(model, tokenizer, sequences, args.batch_tokens)
        print(f"cut forward fp32:  {fp32.rates(n)}  {full.wall / fp32.wall:.2f}x the full forward")
        print(f"cut forward bf16:  {bf16.rates(n)}  {full.wall / bf16.wall:.2f}x the full forward, "
              f"{fp32.wall / bf16.wall:.2f}x cut fp32")  # fmt: skip
        print(f"full forward fp32: {full.rates(n)}")
        report_error(fp32_acts, bf16_acts)
        if args.sweep:
            for max_seq_len, batch_tokens in itertools.product((128, 256, 512), (1024, 2048, 4096, 8192)):
                sample = corpus_sample(tokenizer, args.tokens, max_seq_len)
                timer, acts = harvest(bf16_model, tokenizer, hookpoint, sample, batch_tokens)
                print(
                    f"  bf16 max_seq_len {max_seq_len:3d} batch_tokens {batch_tokens:4d}: {timer.rates(len(acts))}"
                )


if __name__ == "__main__":
    main()
