"""The build's output-effect probe stage: probe the live, visible features, reusing a cached result.

The cache key holds everything the probe's numbers depend on: the model, the hookpoint, the SAE's
decoder weights, the features probed and their max activations (the strength unit), and the probe
config. A rebuild that only changes labels, the projection or the map reuses the probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from build_map.common.files import atomic_folder
from build_map.common.paths import cache_dir
from build_map.features.output_probe import PROBE_COLUMNS, probe_features
from build_map.features.probe_config import ProbeConfig
from build_map.lm.models import LoadedModel
from build_map.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)

_VERSION = "1"  # bump when the probe's numbers change for the same inputs
_RESULT = "probe.parquet"


@dataclass
class ProbeSummary:
    n_probed: int
    seconds: float
    positions_per_second: float
    cached: bool
    shortcut: bool

    def manifest(self) -> dict:
        return asdict(self)


def probe_stage(
    loaded: LoadedModel, sae: SparseAutoencoder, hookpoint: str, features: pd.DataFrame, cfg: ProbeConfig
) -> tuple[pd.DataFrame, ProbeSummary]:
    """``features`` with PROBE_COLUMNS filled for its live, visible rows."""
    probed = features.index[~features["dead"].to_numpy(bool) & ~features["hidden"].to_numpy(bool)].to_numpy()
    max_act = features["max_act"].to_numpy(np.float32)
    folder = cache_dir("probe") / _key(loaded, sae, hookpoint, probed, max_act, cfg)
    if (folder / _RESULT).is_file():
        logger.info("Using the cached output probe in %s", folder)
        frame = pd.read_parquet(folder / _RESULT)
        summary = ProbeSummary(**json.loads((folder / "summary.json").read_text()), cached=True)
    else:
        result = probe_features(loaded, sae, hookpoint, max_act, probed, cfg)
        frame = result.frame
        summary = ProbeSummary(result.n_probed, round(result.seconds, 1), round(result.positions_per_second, 1),
                               cached=False, shortcut=result.shortcut)  # fmt: skip
        with atomic_folder(folder) as tmp:
            frame.to_parquet(tmp / _RESULT, index=False)
            facts = {k: v for k, v in summary.manifest().items() if k != "cached"}
            (tmp / "summary.json").write_text(json.dumps(facts))
    out = features.copy()
    for name in PROBE_COLUMNS:
        out[name] = (
            frame[name].to_numpy()
            if name not in ("output_promotes", "output_suppresses")
            else [list(v) for v in frame[name]]
        )
    return out, summary


def _key(loaded: LoadedModel, sae: SparseAutoencoder, hookpoint: str, probed: np.ndarray,
         max_act: np.ndarray, cfg: ProbeConfig) -> str:  # fmt: skip
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": loaded.spec, "hookpoint": hookpoint, "cfg": asdict(cfg),
                              "dtype": str(next(loaded.model.parameters()).dtype), "version": _VERSION},
                             sort_keys=True).encode())  # fmt: skip
    digest.update(sae.W_dec.detach().float().cpu().numpy().tobytes())
    digest.update(np.ascontiguousarray(probed, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(max_act, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]
