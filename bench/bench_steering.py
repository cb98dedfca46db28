"""Throughput of the steering engine on the embedded default model (SmolLM2-135M-Instruct).

Prints steered vs unsteered tokens/s for one stream and for a batch of 8 (target ratio >= 0.97),
and the aggregate tokens/s of 4 concurrent chat sessions with different edits vs 1 session
(target >= 2.5x). Every reply is forced to the same length (min_new_tokens = max_new_tokens) so
that steered and unsteered runs do the same work.

SAE: ``--sae PATH``, else the newest SAE in the project cache that fits the model, else a random
TopK SAE with 4,608 latents (throughput does not depend on what the features mean; its scales are
measured max activations on a few prompts).

    python bench/bench_steering.py [--new-tokens 48] [--repeats 4] [--sae PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.common.paths import cache_dir  # noqa: E402
from build_map.lm.hookpoints import default_hookpoint, resolve_hookpoint  # noqa: E402
from build_map.lm.models import load_model  # noqa: E402
from build_map.sae.formats import load_sae  # noqa: E402
from build_map.sae.model import SAEConfig, SparseAutoencoder  # noqa: E402
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import Edit, SamplingConfig, SteeringRequest

PROMPTS = [
    "What is a good name for a cat?",
    "Tell me about the ocean.",
    "How do I bake bread at home?",
    "Why is the sky blue?",
    "Give me three tips for learning to code.",
    "What should I cook tonight?",
    "Describe your favourite city.",
    "How do airplanes fly?",
]


def find_sae(d_model: int, path: str | None) -> tuple[SparseAutoencoder, str]:
    if path:
        return load_sae(path, d_model=d_model), f"SAE from {path}"
    candidates = sorted(
        (p.parent for p in cache_dir().rglob("cfg.json") if "models" not in p.parts),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for folder in candidates:
        try:
            return load_sae(folder, d_model=d_model), f"cached SAE {folder}"
        except ValueError:
            continue
    torch.manual_seed(0)
    d_sae = 4608
    sae = SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=d_sae, activation="topk", k=32))
    directions = torch.randn(d_sae, d_model)
    directions /= directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    return sae.eval().requires_grad_(
        False
    ), "no SAE in the cache: random TopK SAE, 4608 latents (throughput only)"


def measured_scales(loaded, sae: SparseAutoencoder, hookpoint: str) -> torch.Tensor:
    """Max activation per feature over a few prompts (position 0 excluded: its norm is an outlier)."""
    seen = []
    handle = resolve_hookpoint(loaded.model, hookpoint).register_forward_hook(
        lambda m, a, out: seen.append(out)
    )
    try:
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
                loaded.model(ids)
    finally:
        handle.remove()
    hidden = torch.cat([h[0, 1:] for h in seen])
    return sae.encode(hidden).amax(0)


def edits_for(session: int) -> tuple[Edit, ...]:
    """Different edits per session: three nudges and one pin."""
    base = 97 * session
    return (Edit(base + 1, 2.0), Edit(base + 2, -1.0), Edit(base + 3, 0.5), Edit(base + 4, 1.0, "pin"))


def run_batch(engine: SteeringEngine, requests: list[SteeringRequest]) -> tuple[int, float, float]:
    """Submit all at once (one batch) and return (generated tokens, wall seconds, CPU seconds).
    CPU time (all threads of this process) is the work done, which other jobs on a shared
    machine do not inflate the way they inflate wall time."""
    tokens_before = engine.stats["tokens"]
    start, cpu_start = time.perf_counter(), time.process_time()
    handles = [engine.submit(request) for request in requests]
    for handle in handles:
        handle.result()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return engine.stats["tokens"] - tokens_before, wall, cpu


def session(engine: SteeringEngine, index: int, turns: int, sampling: SamplingConfig) -> None:
    """One user: a request, wait for the whole reply, the next request, each with its own edits."""
    for turn in range(turns):
        prompt = [{"role": "user", "content": PROMPTS[(index + turn) % len(PROMPTS)]}]
        engine.submit(SteeringRequest(prompt, edits_for(index), sampling)).result()


def sessions_throughput(engine: SteeringEngine, n: int, turns: int, sampling: SamplingConfig) -> float:
    """Aggregate generated tokens/s of ``n`` sessions running at once."""
    threads = [threading.Thread(target=session, args=(engine, i, turns, sampling)) for i in range(n)]
    tokens_before = engine.stats["tokens"]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (engine.stats["tokens"] - tokens_before) / (time.perf_counter() - start)


def step_times(engine: SteeringEngine, rows: int, steps: int = 40) -> tuple[float, float]:
    """Median ms of one decoding step (KV cache, ``rows`` rows with different edits) without and
    with steering, alternated step by step (ABBA) so that the load of a shared machine hits both
    alike; the steering is prepared before the clock starts, as a request does once."""
    model = engine.model
    ids = torch.randint(100, 1000, (rows, 32), generator=torch.Generator().manual_seed(0))
    edits = [edits_for(i) for i in range(rows)]
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
        for step in range(2 * steps):
            steered = step % 4 in (1, 2)
            with engine.steered(edits) if steered else contextlib.nullcontext():
                start = time.perf_counter()
                model(ids[:, -1:], past_key_values=cache, use_cache=True)
                times[steered].append(time.perf_counter() - start)
    return statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3


def batching_ceiling(engine: SteeringEngine, steps: int = 30) -> float:
    """What the model alone allows 4 sessions: 4 × (1-row step time) / (4-row step time), medians
    of alternated decoding steps (no engine, no sampling, no streaming)."""
    model = engine.model
    times: dict[int, list[float]] = {1: [], 4: []}
    with torch.inference_mode():
        caches = {
            rows: model(torch.randint(100, 1000, (rows, 40)), use_cache=True).past_key_values
            for rows in times
        }
        for _ in range(steps):
            for rows, cache in caches.items():
                ids = torch.randint(100, 1000, (rows, 1))
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True)
                times[rows].append(time.perf_counter() - start)
    return 4 * statistics.median(times[1]) / statistics.median(times[4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--turns", type=int, default=2, help="requests per chat session")
    parser.add_argument("--sae", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model()
    hookpoint = default_hookpoint(loaded.model)
    sae, sae_note = find_sae(loaded.model.config.hidden_size, args.sae)
    scales = measured_scales(loaded, sae, hookpoint)
    engine = SteeringEngine(loaded.model, loaded.tokenizer, sae, hookpoint, scales)
    n = args.new_tokens
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=n, min_new_tokens=n, seed=0)
    print(f"model: {loaded.spec} on {loaded.device} ({loaded.dtype}), {torch.get_num_threads()} threads")
    print(f"hookpoint: {hookpoint}; {sae_note}")
    print(
        f"{n} new tokens per reply, temperature 0.7, top_p 0.9; steered vs unsteered: {args.repeats} ABBA-ordered "
        f"pairs, totals; sessions: best of {args.repeats}"
    )

    def request(i: int, steered: bool) -> SteeringRequest:
        prompt = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        return SteeringRequest(prompt, edits_for(i) if steered else (), sampling)

    run_batch(engine, [request(0, True)])  # warm up
    for rows in (1, 8):
        print_throughput(engine, rows, args.repeats, request)
    for rows in (1, 8):
        plain_ms, steered_ms = step_times(engine, rows)
        print(
            f"   decode step: {rows} row{'s' if rows > 1 else ''}, median of 40 alternating steps: unsteered "
            f"{plain_ms:.1f} ms | steered {steered_ms:.1f} ms | throughput ratio {plain_ms / steered_ms:.3f}"
        )
    print_sessions(engine, args.repeats, args.turns, sampling)
    engine.close()


def print_throughput(engine: SteeringEngine, rows: int, repeats: int, request) -> None:
    """Steered vs unsteered tokens/s of batches of ``rows``, ABBA-ordered so drift hits both."""
    totals = {False: [0, 0.0, 0.0], True: [0, 0.0, 0.0]}  # tokens, wall s, CPU s
    for repeat in range(repeats):
        for steered in (False, True) if repeat % 2 == 0 else (True, False):
            for k, value in enumerate(run_batch(engine, [request(i, steered) for i in range(rows)])):
                totals[steered][k] += value
    wall = {s: totals[s][0] / totals[s][1] for s in totals}
    cpu = {s: totals[s][0] / totals[s][2] for s in totals}
    label = "single stream" if rows == 1 else f"batch of {rows}"
    print(
        f"{label:>14}: unsteered {wall[False]:6.1f} tok/s | steered {wall[True]:6.1f} tok/s | "
        f"ratio {wall[True] / wall[False]:.3f} wall, {cpu[True] / cpu[False]:.3f} per CPU-second "
        "(target >= 0.97)"
    )


def print_sessions(engine: SteeringEngine, repeats: int, turns: int, sampling: SamplingConfig) -> None:
    """Aggregate tokens/s of 4 concurrent chat sessions against 1 (best of ``repeats``)."""
    sessions: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(repeats):
        for n_sessions in (1, 4):
            sessions[n_sessions].append(sessions_throughput(engine, n_sessions, turns, sampling))
    one, four = max(sessions[1]), max(sessions[4])
    print(
        f"      sessions: 1 session {one:6.1f} tok/s | 4 concurrent sessions {four:6.1f} tok/s aggregate | "
        f"{four / one:.2f}x (target >= 2.5x)"
    )
    print(
        f"                (the model alone, 4-row vs 1-row decoding steps: {batching_ceiling(engine):.2f}x)"
    )
    print(f"  engine stats: {engine.stats}")


if __name__ == "__main__":
    main()
