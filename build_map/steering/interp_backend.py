"""Generation through interp-engine, behind the engine's own API: its eager backend (CPU or CUDA;
the parity reference) or its vLLM backend (CUDA). ``SteeringEngine(..., generator=...)`` keeps
everything else (validation, batching window, streams, cancellation, errors, the hf model for
re-reading replies, attribution and sweeps) and hands each batch's rows to ``InterpGenerator``.

Each row is one ``generate_stream`` inside a ``steer`` block built by ``interp_specs``; the rows of
a batch run on ``workers`` threads (1 on eager, where steering hooks are global to the model;
several on vLLM, which registers a spec per request and batches them itself). The scope maps to
interp-engine's ``position_mask``: replies only → every prompt position but the last is excluded;
the prompt without special tokens → ``SteerMask.SPECIAL_TOKENS``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from build_map.steering.interp_specs import steering_spec
from build_map.steering.requests import SteeringError, SteeringScope
from build_map.steering.streaming import BatchStreamer, Job, RowState

logger = logging.getLogger(__name__)

BACKENDS = ("hf", "eager", "vllm")


class InterpGenerator:
    """Runs a batch's rows through an interp-engine model (see the module docstring)."""

    def __init__(self, model: Any, backend: str, workers: int | None = None):
        self.model = model
        self.backend = backend
        self.workers = workers or (8 if backend == "vllm" else 1)

    def run(self, engine: Any, jobs: Sequence[Job]) -> None:
        rows = [
            RowState(job, local, job.prompt_ids, steering)
            for job in jobs
            for local, steering in enumerate(job.steerings)
        ]
        streamer = BatchStreamer(rows, engine.decode, engine.eos_ids, lambda n: engine._count("tokens", n))
        engine._count("batches", 1)
        engine._count("rows", len(rows))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="interp-row") as pool:
            for future in [pool.submit(self._row, engine, streamer, row) for row in rows]:
                future.result()  # the first failure reaches the batch's consumers
        streamer.end()

    def _row(self, engine: Any, streamer: BatchStreamer, row: RowState) -> None:
        import interp_engine as ie

        request = row.job.request
        unsteered = request.pair and len(row.job.steerings) == 2 and row.local_row == 0
        edits = () if unsteered else request.edits
        spec = steering_spec(edits, request.multiplier, engine.sae, engine.feature_scale, engine.hookpoint)
        sampling = row.sampling
        context = (
            ie.steer(self.model, spec, prompt_token_ids=row.prompt_ids,
                     position_mask=position_mask(request.scope, row.prompt_ids))
            if spec is not None
            else contextlib.nullcontext()
        )  # fmt: skip
        with context:
            steps = ie.generate_stream(
                self.model, row.prompt_ids, max_tokens=sampling.max_new_tokens,
                temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                presence_penalty=float(sampling.presence_penalty), seed=int(row.job.handle.seed), stop_at_eos=True,
            )  # fmt: skip
            for step in steps:
                streamer.accept(row, int(step.token_id))
                if row.reason is not None:  # eos, its max_new_tokens, or cancelled
                    break


def position_mask(scope: SteeringScope, prompt_ids: Sequence[int]) -> Any:
    """interp-engine's ``position_mask`` (prompt positions NOT steered) for a scope."""
    import interp_engine as ie

    if not scope.prompt:
        return list(range(max(len(prompt_ids) - 1, 0)))  # the last prompt token writes the reply
    return None if scope.special_tokens else ie.SteerMask.SPECIAL_TOKENS


def load_generator(model_folder: str | Path, backend: str, device: str, tensor_parallel_size: int = 1):
    """An ``InterpGenerator`` on interp-engine's ``eager`` or ``vllm`` backend for the model in
    ``model_folder`` (a safetensors folder or a Hugging Face id in the local cache)."""
    if backend not in ("eager", "vllm"):
        raise SteeringError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    try:
        import interp_engine as ie
    except ImportError as exc:
        raise SteeringError(
            "--backend eager/vllm needs interp-engine (Python >= 3.11): pip install -e '.[vllm]' on a CUDA "
            "machine, or use --backend hf."
        ) from exc
    if backend == "vllm" and not torch.cuda.is_available():
        raise SteeringError("--backend vllm needs a CUDA GPU; on this machine use --backend hf (or eager).")
    kwargs: dict[str, Any] = {"num_gpus": tensor_parallel_size} if backend == "vllm" else {}
    dtype = "float32" if device == "cpu" else "auto"
    model = ie.load_model(str(model_folder), backend=backend, device=device, dtype=dtype, **kwargs)
    return InterpGenerator(model, backend)
