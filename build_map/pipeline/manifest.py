"""The bundle manifest: how a bundle was made (model, hookpoint, SAE, corpus, configs, versions)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from dataclasses import asdict
from pathlib import Path
from typing import Any

from build_map.bundle.sources import stored_model_spec
from build_map.common.files import file_sha256
from build_map.features.stats import FeatureStats
from build_map.lm.corpus import CorpusConfig
from build_map.lm.models import LoadedModel
from build_map.sae.model import SparseAutoencoder

PACKAGES = (
    "torch",
    "transformers",
    "datamapplot",
    "umap-learn",
    "panel",
    "bokeh",
    "pyarrow",
    "sae-feature-map",
)


def build_manifest(
    cfg: Any,
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hookpoint: str,
    stats: FeatureStats,
    corpus: CorpusConfig,
    configs: dict[str, Any],
    trustworthiness: float,
) -> dict:
    """The manifest of a bundle built with ``cfg`` (a ``BuildConfig``); ``configs`` holds the
    projection and cluster configs by name."""
    return {
        "model": {
            "spec": stored_model_spec(cfg.model),
            "name": loaded.spec,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "n_layers": int(loaded.model.config.num_hidden_layers),
        },
        "hookpoint": hookpoint,
        "sae": {
            "path": str(Path(cfg.sae).resolve()),
            "format": sae.cfg.source_format,
            "sha256": file_sha256(cfg.sae),
            "activation": sae.cfg.activation,
            "k": sae.cfg.k,
        },
        "d_model": sae.d_in,
        "n_features": sae.d_sae,
        "corpus": {
            "sources": list(corpus.sources),
            "n_tokens": stats.n_tokens,
            "n_sequences": stats.n_sequences,
        },
        "build": {
            "stats": asdict(stats.config),
            **{name: asdict(config) for name, config in configs.items()},
            "labels_file": cfg.labels,
            "hide_file": cfg.hide,
            "labeler": cfg.labeler,
            "judge": cfg.judge if cfg.score else None,
            "seed": cfg.seed,
        },
        "trustworthiness": trustworthiness,
        "packages": package_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
