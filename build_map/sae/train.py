"""Train a TopK sparse autoencoder on harvested activations (the recipe of EleutherAI sparsify).

The recipe: b_dec starts at the geometric median of a sample; decoder rows are unit vectors
(the gradient component along each row is removed before the step and rows are renormalised
after it); the encoder starts as the decoder's transpose; Adam; an AuxK loss lets the top
``aux_k`` *dead* latents reconstruct what the live ones missed, which revives them.

Inputs are scaled to mean norm sqrt(d_in) while training so the learning rate transfers between
models; the scale is folded back into the returned SAE, which works on raw activations.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from build_map.common.devices import pick_device
from build_map.common.files import write_json_atomic
from build_map.sae.data import (
    input_scale,
    learning_rate_at,
    norm_limit,
    sample_rows,
    shuffled_batches,
    split_heldout,
    training_plan,
)
from build_map.sae.evaluate import evaluate_batches
from build_map.sae.formats import save_sae
from build_map.sae.model import SparseAutoencoder
from build_map.sae.train_config import TrainConfig, TrainConfigError
from build_map.sae.trainer import TopKTrainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class TrainMetrics:
    fvu: float
    """Fraction of variance unexplained on the held-out tokens (0 = perfect)."""
    mean_l0: float
    """Mean number of active latents per held-out token."""
    dead_fraction: float
    """Latents active neither on the held-out tokens nor in the last dead_tokens training tokens."""
    tokens_seen: int
    """Training tokens processed (all epochs)."""
    heldout_tokens: int
    outlier_tokens: int
    """Tokens left out (training and held-out) for a norm above max_norm_ratio × the median."""
    steps: int
    seconds: float
    """Training wall time, evaluation included."""
    input_scale: float
    """Raw activations were divided by this while training (1.0 when not normalised)."""


def train_sae(
    activations: np.ndarray, cfg: TrainConfig, *, progress: bool = True
) -> tuple[SparseAutoencoder, TrainMetrics]:
    """Train a TopK SAE on ``activations`` (n_tokens, d_in); the tail is held out for metrics."""
    start = time.perf_counter()
    n_train, n_heldout = split_heldout(activations, cfg)
    device = pick_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = sample_rows(activations, n_train, cfg.median_samples, generator)
    limit = norm_limit(sample, cfg.max_norm_ratio)
    sample = sample[sample.norm(dim=1) <= limit]
    scale = input_scale(sample) if cfg.normalize_inputs else 1.0
    trainer = TopKTrainer(activations.shape[1], cfg, device, generator)
    trainer.init_b_dec(sample / scale)
    plan = training_plan(n_train, cfg, generator)
    total = sum(stop - start for start, stop, _ in plan)
    steps = sum(len(sizes) for _, _, sizes in plan)
    logger.info(
        "Training %d latents (k=%d) on %d tokens (%d steps, batch %d, lr %.2g, select in %s)",
        cfg.n_latents, cfg.k, total, steps, cfg.batch_size, cfg.learning_rate(), trainer.select_dtype,
    )  # fmt: skip
    bar = tqdm(total=steps, desc="train SAE", unit="step", disable=not progress)
    outliers = 0
    for step, batch in enumerate(shuffled_batches(activations, plan, generator)):
        kept = batch[batch.norm(dim=1) <= limit]
        outliers += len(batch) - len(kept)
        if len(kept) > 1:  # the loss normalises by the batch's variance
            trainer.step(kept.to(device) / scale, learning_rate_at(step, steps, cfg))
        bar.update()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(fvu=f"{trainer.running_fvu:.3f}", dead=f"{trainer.dead_fraction():.1%}")
    bar.close()
    sae = trainer.to_sae(scale)
    heldout = activations[n_train : n_train + n_heldout]
    evaluation, fired = evaluate_batches(sae, heldout, cfg.batch_size * 4, device, limit)
    dead = ~(fired | trainer.fired_recently())
    metrics = TrainMetrics(
        fvu=evaluation.fvu,
        mean_l0=evaluation.mean_l0,
        dead_fraction=float(dead.float().mean()),
        tokens_seen=trainer.tokens_seen,
        heldout_tokens=evaluation.n_tokens,
        outlier_tokens=outliers + evaluation.outlier_tokens,
        steps=trainer.steps,
        seconds=round(time.perf_counter() - start, 2),
        input_scale=scale,
    )
    logger.info("Trained: %s", metrics)
    return sae.cpu(), metrics


def save_trained_sae(
    sae: SparseAutoencoder,
    folder: str | Path,
    cfg: TrainConfig,
    metrics: TrainMetrics,
    provenance: dict | None = None,
) -> Path:
    """Save weights + cfg.json (with the training config and metrics) and metrics.json beside them."""
    record = {"training": asdict(cfg), "metrics": asdict(metrics), **(provenance or {})}
    folder = save_sae(sae, folder, extra=record)
    write_json_atomic(Path(folder) / METRICS_FILE, record, indent=2)  # written last: the folder is complete
    return Path(folder)


def load_metrics(folder: str | Path) -> TrainMetrics:
    """The TrainMetrics saved beside a trained SAE."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise TrainConfigError(f"{path} is missing; it is written by save_trained_sae.")
    record = json.loads(path.read_text())["metrics"]
    return TrainMetrics(**{f.name: record[f.name] for f in fields(TrainMetrics)})
