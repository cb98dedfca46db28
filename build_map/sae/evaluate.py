"""How well an SAE reconstructs activations: FVU, mean L0 and the latents that never fire."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from build_map.common.devices import pick_device
from build_map.sae.data import read_rows
from build_map.sae.model import SparseAutoencoder
from build_map.sae.train_config import TrainConfigError


@dataclass
class EvalMetrics:
    fvu: float
    mean_l0: float
    dead_fraction: float
    """Latents never active on these tokens."""
    n_tokens: int
    """Tokens evaluated (outliers excluded)."""
    outlier_tokens: int = 0


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    activations: np.ndarray,
    *,
    max_norm: float = math.inf,
    batch_size: int = 4096,
    device: str = "auto",
) -> EvalMetrics:
    """FVU, mean L0 and never-active fraction of ``sae`` on ``activations`` (n_tokens, d_in),
    leaving out rows whose norm exceeds ``max_norm``."""
    if len(activations) == 0:
        raise TrainConfigError("evaluate_sae needs at least one activation row.")
    return evaluate_batches(sae, activations, batch_size, pick_device(device), max_norm)[0]


@torch.no_grad()
def evaluate_batches(
    sae: SparseAutoencoder,
    activations: np.ndarray,
    batch_size: int,
    device: torch.device,
    max_norm: float = math.inf,
) -> tuple[EvalMetrics, torch.Tensor]:
    """Metrics, plus which latents fired at least once (bool, d_sae, on CPU)."""
    sae = sae.to(device)
    d_in = activations.shape[1]
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    l0, n = 0.0, 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for start in range(0, len(activations), batch_size):
        x = read_rows(activations, start, start + batch_size).to(device)
        x = x[x.norm(dim=1) <= max_norm]
        n += len(x)
        features = sae.encode(x)
        sum_err += (sae.decode(features) - x).double().pow(2).sum()
        sum_x += x.double().sum(0)
        sum_x2 += x.double().pow(2).sum()
        active = features > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    if n == 0:
        raise TrainConfigError(
            f"All {len(activations)} rows have a norm above {max_norm:.4g}; nothing to evaluate."
        )
    variance = sum_x2 - sum_x.pow(2).sum() / n
    metrics = EvalMetrics(
        fvu=float(sum_err / variance.clamp_min(1e-12)),
        mean_l0=l0 / n,
        dead_fraction=float((~fired).float().mean()),
        n_tokens=n,
        outlier_tokens=len(activations) - n,
    )
    return metrics, fired.cpu()
