"""Strength sweep and token attribution on the embedded default (SmolLM2-135M-Instruct).

Prints the wall time of a batched sweep of 8 strengths × 4 prompts × 48 new tokens (target
<= 90 s on a laptop CPU; split into generation and the unsteered re-read) and of one token's
attribution over a ~80-token chat (target <= 1 s), each with the load average at that moment:
the machine may be shared, and a load above the core count slows every figure.

SAE: the cached demo SAE when ``build_map.pipeline.demo.demo_sae_folder()`` is complete, else a random
TopK SAE with 4,608 latents (timings do not depend on what the features mean; its scales are max
activations measured on the prompts).

    python bench/bench_sweep_attribution.py [--new-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.lm.capture import cut_forward  # noqa: E402
from build_map.lm.hookpoints import d_model  # noqa: E402
from build_map.lm.models import load_model  # noqa: E402
from build_map.pipeline.demo import DEMO_HOOKPOINT, demo_sae_folder  # noqa: E402
from build_map.sae.formats import load_sae  # noqa: E402
from build_map.sae.model import SAEConfig, SparseAutoencoder  # noqa: E402
from build_map.sae.train import METRICS_FILE  # noqa: E402
from build_map.steering.attribution import attribute_token  # noqa: E402
from build_map.steering.engine import SteeringEngine  # noqa: E402
from build_map.steering.sweep import DEFAULT_PROMPTS, DEFAULT_STRENGTHS, reread  # noqa: E402
from build_map.steering.sweep import sweep as run_sweep  # noqa: E402
from build_map.steering.sweep_window import suggest_window  # noqa: E402


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def pick_sae(width: int) -> tuple[SparseAutoencoder, str]:
    folder = demo_sae_folder()
    if (folder / METRICS_FILE).is_file():
        return load_sae(folder, d_model=width), f"cached demo SAE {folder}"
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=width, d_sae=4608, activation="topk", k=32))
    directions = torch.randn(4608, width)
    directions /= directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    note = "no cached demo SAE (run `build-map demo` to train it): random TopK SAE, 4608 latents, k=32"
    return sae.eval().requires_grad_(False), note


def measured_scales(engine: SteeringEngine) -> torch.Tensor:
    """Max activation per feature over the prompts (position 0 excluded: its norm is an outlier)."""
    scales = torch.zeros(engine.sae.d_sae)
    for prompt in DEFAULT_PROMPTS:
        ids = torch.tensor([engine.prompt_ids(prompt)])
        hidden = cut_forward(engine.model, engine.hookpoint, ids)[0, 1:]
        scales = torch.maximum(scales, engine.sae.encode(hidden).amax(0).cpu())
    return scales


def bench_sweep(engine: SteeringEngine, feature: int, new_tokens: int) -> None:
    start = time.perf_counter()
    frame = run_sweep(engine, feature, list(DEFAULT_PROMPTS), DEFAULT_STRENGTHS, max_new_tokens=new_tokens)
    total = time.perf_counter() - start
    load = load_average()
    prompt_ids = [
        engine.prompt_ids(p) for _ in DEFAULT_STRENGTHS for p in DEFAULT_PROMPTS
    ]  # sweep's row order
    replies = [engine.tokenizer(r, add_special_tokens=False)["input_ids"] for r in frame.reply]
    start = time.perf_counter()
    reread(engine, prompt_ids, replies, [feature])
    reread_s = time.perf_counter() - start
    tokens = int(frame.n_tokens.sum())
    print(
        f"sweep {len(DEFAULT_STRENGTHS)} strengths × {len(DEFAULT_PROMPTS)} prompts × {new_tokens} tokens "
        f"(one generate call of {len(frame)} rows): {total:.1f} s (target <= 90 s); {tokens} tokens generated, "
        f"of which the unsteered re-read ~{reread_s:.1f} s; {load}"
    )
    means = frame.groupby("strength")[["effect", "coherence"]].mean()
    print("  mean effect by strength:   " + "  ".join(f"{s:g}:{v:.3f}" for s, v in means.effect.items()))
    print("  mean coherence by strength: " + "  ".join(f"{s:g}:{v:.2f}" for s, v in means.coherence.items()))
    print(f"  suggested window: {suggest_window(frame)}")


def bench_attribution(engine: SteeringEngine, repeats: int) -> None:
    prompt = engine.prompt_ids("Tell me about the ocean and the animals that live in it.")
    reply = engine.tokenizer(
        " The ocean covers most of our planet and is home to whales, dolphins, sharks, octopuses, "
        "coral reefs and countless tiny plankton that feed them all.",
        add_special_tokens=False,
    )["input_ids"]
    ids = torch.tensor([prompt + reply])
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        frame = attribute_token(engine.model, engine.sae, engine.hookpoint, ids, ids.shape[1] - 2, top_k=20)
        times.append(time.perf_counter() - start)
    forward = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            engine.model(input_ids=ids[:, :-1])
        forward.append(time.perf_counter() - start)
    target = engine.decode([frame.attrs["target_token"]])
    print(
        f"attribution of one token ({ids.shape[1]} tokens of context, {engine.sae.d_sae} features): "
        f"median {statistics.median(times[1:]):.2f} s, first {times[0]:.2f} s (target <= 1 s); "
        f"a plain forward of the same tokens: {statistics.median(forward):.2f} s; {load_average()}"
    )
    print(
        f"  target {target!r} log p {frame.attrs['logprob']:.2f}; top features "
        + ", ".join(f"{int(r.feature)}:{r.attribution:+.3f}" for r in frame.head(5).itertuples())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: 1 when the load average is above the core count, where OpenMP's "
        "spin-waiting made 2 threads 10-20x slower than 1 here; else torch's default)",
    )  # fmt: skip
    args = parser.parse_args()
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or (1 if busy else torch.get_num_threads()))
    start = time.perf_counter()
    loaded = load_model(device="cpu")
    print(f"model loaded in {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")
    sae, note = pick_sae(d_model(loaded.model))
    print(f"SAE: {note}")
    engine = SteeringEngine(loaded.model, loaded.tokenizer, sae, DEMO_HOOKPOINT, torch.ones(sae.d_sae))
    scales = measured_scales(engine)
    engine.close()
    engine = SteeringEngine(loaded.model, loaded.tokenizer, sae, DEMO_HOOKPOINT, scales)
    active = (scales > 0).nonzero().squeeze(-1)
    feature = int(active[scales[active].argsort()[len(active) // 2]])  # a typical active feature
    print(f"steered feature {feature} (max act {float(scales[feature]):.2f})")
    try:
        bench_attribution(engine, args.repeats)
        bench_sweep(engine, feature, args.new_tokens)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
