"""The embedded default end to end: its SAE, trained once on layer 22 of SmolLM2's 30, and its
bundle, both reused from the cache.

The cache folder is keyed by everything that shapes the SAE (model, hookpoint, corpus, token
count, harvest and training configs, this module's version), so changing any of them trains a new
one and an old one is never mistaken for it. The device is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from build_map.activations.buffer import read_meta
from build_map.activations.harvest import HarvestConfig
from build_map.bundle.schema import MANIFEST
from build_map.common.files import atomic_folder
from build_map.common.paths import cache_dir
from build_map.lm.corpus import CorpusConfig
from build_map.lm.models import EMBEDDED_MODEL_NAME
from build_map.pipeline.build import BuildConfig, BuildSummary, build_bundle
from build_map.pipeline.training_run import buffer_folder, harvest_and_train
from build_map.sae.train import METRICS_FILE
from build_map.sae.train_config import TrainConfig

logger = logging.getLogger(__name__)

# Layer 22 of 30, not the middle: chosen for steering (bench/bench_steer_probe.py, README "What one
# click does"). At similar held-out FVU (0.135 vs 0.123) its random features steered visibly more
# often (69 % vs 62 %) at a much smaller coherence cost (0.98 vs 1.61 nats/token) at the same rule.
DEMO_HOOKPOINT = "model.layers.22"
# 300k tokens seen three times, not 1M once: on a 2-core fp32 CPU the harvest is most of `make
# demo` (~460 tok/s at layer 22: 23 of 30 layers). Held-out FVU 0.139 (1M once: 0.135); figures
# in docs/ARCHITECTURE.md, "The demo SAE sees 300k tokens three times".
DEMO_TOKENS = 300_000  # 2% held out leaves 294k training tokens
DEMO_CORPUS = CorpusConfig()
# "auto": bf16 where the CPU has it natively (~1.6x faster than fp32); elsewhere emulated bf16 is
# ~8x slower than fp32 (104 tok/s on a 2-core AMD EPYC), so fp32 there.
DEMO_HARVEST = HarvestConfig(compute_dtype="auto")
DEMO_TRAIN = TrainConfig(n_latents=4608, k=32, epochs=3)  # 8 × d_model 576
_VERSION = "1"  # bump to retrain every cached demo SAE
DEMO_STATS_TOKENS = 100_000
_DEMO_BUNDLE_VERSION = "9"  # bump when the builder's output changes, to rebuild cached demo bundles


def demo_key(train: TrainConfig = DEMO_TRAIN) -> str:
    request = {
        "model": EMBEDDED_MODEL_NAME,
        "hookpoint": DEMO_HOOKPOINT,
        "tokens": DEMO_TOKENS,
        "corpus": asdict(DEMO_CORPUS),
        "harvest": asdict(DEMO_HARVEST),
        "train": asdict(replace(train, device="auto")),
        "version": _VERSION,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def demo_sae_folder() -> Path:
    return cache_dir("demo") / f"sae-{demo_key()}"


def demo_buffer_folder() -> Path:
    """Where the demo's activations are harvested (keyed by the harvest request alone, so a new
    training config reuses a kept buffer)."""
    return buffer_folder(EMBEDDED_MODEL_NAME, DEMO_HOOKPOINT, DEMO_CORPUS, DEMO_TOKENS, DEMO_HARVEST)


def demo_sae(
    device: str = "auto", retrain: bool = False, keep_buffer: bool = False, progress: bool = True
) -> Path:
    """The folder of the demo SAE (native format, loads with ``load_sae``), training it if needed.

    Harvest + training take ~6-15 minutes on a 2-core CPU the first time; later calls return the
    cached folder at once. The ~0.7 GB activation buffer is deleted afterwards unless ``keep_buffer``.
    """
    folder = demo_sae_folder()
    if not retrain and (folder / METRICS_FILE).is_file():  # written last: the folder is complete
        logger.info("Using the cached demo SAE in %s", folder)
        return folder
    logger.warning("Training the demo SAE (once; ~6-15 min on a laptop CPU) into %s", folder)
    buffer = demo_buffer_folder()
    with atomic_folder(folder) as tmp:
        run = harvest_and_train(
            None, DEMO_HOOKPOINT, DEMO_CORPUS, DEMO_TOKENS, replace(DEMO_TRAIN, device=device), tmp,
            buffer=buffer, harvest=DEMO_HARVEST, progress=progress,
        )  # fmt: skip
    if not keep_buffer:
        shutil.rmtree(buffer, ignore_errors=True)
    m = run.metrics
    logger.warning(
        "Demo SAE: held-out FVU %.3f, L0 %.1f, dead %.1f%%; harvest %.0f s, train %.0f s",
        m.fvu, m.mean_l0, 100 * m.dead_fraction, run.harvest_seconds, run.train_seconds,
    )  # fmt: skip
    return folder


def demo_bundle_folder(sae_folder: Path, n_tokens: int) -> Path:
    """The cache folder of the demo bundle built from ``sae_folder`` over ``n_tokens``."""
    key = hashlib.sha256(f"{sae_folder.name}|{n_tokens}|{_DEMO_BUNDLE_VERSION}".encode()).hexdigest()[:12]
    return cache_dir("demo") / f"bundle-{key}"


def demo_bundle(
    out: str | Path | None = None,
    n_tokens: int = DEMO_STATS_TOKENS,
    device: str = "auto",
    rebuild: bool = False,
    retrain: bool = False,
) -> tuple[Path, BuildSummary | None]:
    """The demo bundle (in the cache unless ``out``), built if needed: its folder, and the build's
    summary (None when a built one was reused).

    When the SAE is trained here, its activation buffer is kept until the bundle is built: the
    statistics read the corpus's activations from it (the harvest covers the statistics' tokens),
    which saves a model pass over them (~3 of the ~8 minutes of a CPU build)."""
    buffer = demo_buffer_folder()
    # A finished buffer beside a finished SAE was kept on purpose and stays; any other is this
    # run's (or an interrupted run's) to delete once the SAE is done.
    kept = _finished(buffer) and (demo_sae_folder() / METRICS_FILE).is_file()
    try:
        sae_folder = demo_sae(device=device, retrain=retrain, keep_buffer=True)
        folder = Path(out) if out else demo_bundle_folder(sae_folder, n_tokens)
        if (folder / MANIFEST).is_file() and not (rebuild or retrain):
            logger.info("Using the cached demo bundle %s", folder)
            return folder, None
        activations = str(buffer) if _finished(buffer) else None  # rows past its end: the model
        cfg = BuildConfig(sae=str(sae_folder), out=str(folder), hookpoint=DEMO_HOOKPOINT, n_tokens=n_tokens,
                          activations=activations, device=device, overwrite=True)  # fmt: skip
        return folder, build_bundle(cfg)
    finally:  # an unfinished harvest stays to be resumed
        if not kept and (demo_sae_folder() / METRICS_FILE).is_file():
            shutil.rmtree(buffer, ignore_errors=True)


def _finished(buffer: Path) -> bool:
    meta = read_meta(buffer)
    return bool(meta and meta["complete"])
