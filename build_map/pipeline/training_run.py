"""From a model to a trained SAE: load, harvest at the hookpoint into a buffer, train, save."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from build_map.activations.harvest import HarvestConfig, harvest_to_buffer
from build_map.common.paths import cache_dir
from build_map.lm.corpus import CorpusConfig
from build_map.lm.hookpoints import default_hookpoint, normalize_hookpoint
from build_map.lm.models import load_model
from build_map.sae.train import TrainMetrics, save_trained_sae, train_sae
from build_map.sae.train_config import TrainConfig, TrainConfigError


@dataclass
class TrainRun:
    """What ``harvest_and_train`` made, and how long each stage took."""

    folder: Path
    metrics: TrainMetrics
    hookpoint: str
    buffer_folder: Path
    n_tokens: int
    load_seconds: float
    harvest_seconds: float
    train_seconds: float


def harvest_and_train(
    model: str | None,
    hookpoint: str | None,
    corpus: CorpusConfig,
    n_tokens: int,
    cfg: TrainConfig,
    out: str | Path,
    *,
    buffer: str | Path | None = None,
    harvest: HarvestConfig | None = None,
    progress: bool = True,
) -> TrainRun:
    """Load ``model``, harvest ``n_tokens`` activations at ``hookpoint`` (default: the middle layer)
    into ``buffer`` (default: a cache folder keyed by the request), train, save to ``out``."""

    if n_tokens <= 0:
        raise TrainConfigError(f"The number of tokens to harvest must be positive; got {n_tokens}.")
    harvest = harvest or HarvestConfig()
    start = time.perf_counter()
    loaded = load_model(model, device=cfg.device)
    hookpoint = normalize_hookpoint(loaded.model, hookpoint or default_hookpoint(loaded.model))
    loaded_at = time.perf_counter()
    folder = Path(buffer) if buffer else buffer_folder(loaded.spec, hookpoint, corpus, n_tokens, harvest)
    activations = harvest_to_buffer(loaded, hookpoint, corpus, n_tokens, folder, harvest, progress=progress)
    harvested_at = time.perf_counter()
    del loaded  # free the model before training
    sae, metrics = train_sae(activations.array, cfg, progress=progress)
    sae.cfg = replace(sae.cfg, hookpoint=hookpoint)
    provenance = {
        "model": activations.meta["model"],
        "hookpoint": hookpoint,
        "corpus": asdict(corpus),
        "harvest": asdict(harvest),
        "n_tokens": len(activations),
    }
    save_trained_sae(sae, out, cfg, metrics, provenance)
    return TrainRun(
        folder=Path(out),
        metrics=metrics,
        hookpoint=hookpoint,
        buffer_folder=folder,
        n_tokens=len(activations),
        load_seconds=round(loaded_at - start, 2),
        harvest_seconds=round(harvested_at - loaded_at, 2),
        train_seconds=metrics.seconds,
    )


def buffer_folder(
    model: str, hookpoint: str, corpus: CorpusConfig, n_tokens: int, harvest: HarvestConfig
) -> Path:
    """A cache folder for one harvest request (the same request finds its finished buffer again)."""
    request = {"model": model, "hookpoint": hookpoint, "corpus": asdict(corpus), "n_tokens": n_tokens,
               "harvest": asdict(harvest)}  # fmt: skip
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("buffers") / f"{hookpoint}-{n_tokens}-{key}"
