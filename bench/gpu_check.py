"""GPU check, one command, no network: steer with the hf engine and with interp-engine, compare
greedy tokens, print tokens/s single-stream and 8-concurrent, steered and unsteered.

Loads the embedded SmolLM2 from its cached safetensors folder (or ``--model FOLDER``, e.g. a
Llama-3.1-8B-shaped folder) and a random SAE (``--d-sae`` unit directions at the middle layer,
max activation 12) so it needs no bundle. Backends:

* ``hf``: the project's engine (batched ``generate`` with a forward hook), the default on CPU;
* ``eager``: interp-engine's eager backend (the parity reference, CPU or CUDA);
* ``vllm``: interp-engine's vLLM backend (CUDA, ``pip install -e '.[vllm]'``).

Printed: for each backend, single-stream and N-concurrent tokens/s, unsteered and steered
(nudge), and steered / unsteered; then, for each backend besides hf, how many of the greedy
replies (3 prompts × nudge, orthogonal, cap) equal the hf engine's.

    python bench/gpu_check.py [--backend hf,eager,vllm] [--model FOLDER] [--tokens 64] [--concurrent 8]

Tested on CPU with ``--backend hf,eager`` (no GPU was lent when it was written); the vLLM
concurrency path sends the N requests from N threads, each in its own ``steer`` block.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_map.lm.models import embedded_model_folder, load_model  # noqa: E402
from build_map.sae.model import SAEConfig, SparseAutoencoder  # noqa: E402
from build_map.steering.engine import SteeringEngine  # noqa: E402
from build_map.steering.interp_specs import steering_spec  # noqa: E402
from build_map.steering.requests import Edit, SamplingConfig, SteeringRequest, SteeringScope  # noqa: E402

PROMPTS = ("Tell me about your weekend.", "What is a good way to learn a language?", "Describe the sea.")
EVERYWHERE = SteeringScope(prompt=True, special_tokens=True)  # as interp-engine steers
CASES = {
    "nudge": [Edit(1, 1.0, "nudge")],
    "orthogonal": [Edit(2, 0.0, "orthogonal")],
    "cap": [Edit(3, -0.5, "cap")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf,eager,vllm" if torch.cuda.is_available() else "hf,eager")
    parser.add_argument(
        "--model", default=None, help="a safetensors model folder (default: the embedded SmolLM2)"
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=64)
    args = parser.parse_args()
    folder = Path(args.model) if args.model else embedded_model_folder()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(str(folder), device=device)
    d_model = loaded.model.config.hidden_size
    layer = loaded.model.config.num_hidden_layers // 2
    sae = SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=args.d_sae, activation="relu")).to(loaded.device)
    with torch.no_grad():
        directions = torch.randn(args.d_sae, d_model, generator=torch.Generator().manual_seed(0))
        sae.W_dec.copy_(torch.nn.functional.normalize(directions, dim=1).to(loaded.device))
    hookpoint = f"model.layers.{layer}"
    engine = SteeringEngine(loaded.model, loaded.tokenizer, sae.eval(), hookpoint,
                            feature_scale=torch.full((args.d_sae,), 12.0))  # fmt: skip
    print(f"{folder.name} on {device} ({loaded.dtype}), hookpoint {hookpoint}, random SAE of {args.d_sae}")
    prompts = [engine.prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    reference: dict[tuple[int, str], list[int]] = {}
    try:
        for backend in backends:
            if backend == "hf":
                run = _hf_runner(engine, sampling)
            else:
                run = _interp_runner(folder, backend, device, engine, sae, hookpoint, sampling)
            _throughput(backend, run, prompts, args.concurrent)
            replies = {
                (i, name): run(ids, edits) for i, ids in enumerate(prompts) for name, edits in CASES.items()
            }
            if backend == "hf":
                reference = replies
            elif reference:
                same = sum(replies[key] == reference[key] for key in reference)
                print(f"  greedy tokens equal to hf: {same} / {len(reference)}")
    finally:
        engine.close()
    return 0


def _hf_runner(engine: SteeringEngine, sampling: SamplingConfig):
    def run(ids, edits):
        handle = engine.submit(SteeringRequest(ids, tuple(edits), sampling, 1.0, scope=EVERYWHERE))
        text = "".join(piece for _, piece in handle)
        return engine.encode(text)

    return run


def _interp_runner(folder, backend, device, engine, sae, hookpoint, sampling):
    import interp_engine as ie

    model = ie.load_model(
        str(folder), backend=backend, device=device, dtype="auto" if device == "cuda" else "float32"
    )
    eos = set(engine.eos_ids)

    def run(ids, edits):
        spec = steering_spec(edits, 1.0, sae, engine.feature_scale, hookpoint)
        context = ie.steer(model, spec) if spec is not None else contextlib.nullcontext()
        with context:
            steps = ie.generate_stream(
                model, ids, max_tokens=sampling.max_new_tokens, temperature=0.0, stop_at_eos=False
            )
            return [s.token_id for s in steps if s.token_id not in eos]

    return run


def _throughput(backend: str, run, prompts, concurrent: int) -> None:
    figures = {}
    for steered in (False, True):
        edits = CASES["nudge"] if steered else []
        start = time.perf_counter()
        tokens = len(run(prompts[0], edits))
        single = tokens / (time.perf_counter() - start)
        counts: list[int] = []

        def one(i: int, edits=edits, counts=counts) -> None:
            counts.append(len(run(prompts[i % len(prompts)], edits)))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        figures[steered] = (single, sum(counts) / (time.perf_counter() - start))
    (s0, c0), (s1, c1) = figures[False], figures[True]
    print(f"{backend}: single stream {s0:.1f} tok/s unsteered, {s1:.1f} steered ({s1 / s0:.2f}x); "
          f"{concurrent} concurrent {c0:.1f} / {c1:.1f} tok/s aggregate ({c1 / c0:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
