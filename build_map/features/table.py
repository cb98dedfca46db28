"""The feature table of the statistics: density, max and mean activation, the tokens a feature
fires on, the logit lens and the decoder neighbours, one row per feature."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from build_map.features.config import StatsConfig
from build_map.features.logit_lens import logit_lens
from build_map.features.streaming import CorpusIndex, StreamState
from build_map.geometry.knn import decoder_knn
from build_map.geometry.projection import ProjectConfig
from build_map.lm.models import LoadedModel
from build_map.lm.tokens import TokenText
from build_map.sae.model import SparseAutoencoder


def feature_rows(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    state: StreamState,
    corpus: CorpusIndex,
    cfg: StatsConfig,
    decoder: TokenText,
) -> pd.DataFrame:
    count = state.count.cpu()
    dead = count == 0
    mean = (state.act_sum.cpu() / count.clamp(min=1)).float()
    top_value = torch.where(state.top.loc >= 0, state.top.value, -math.inf).amax(1).float().cpu()
    max_act = torch.where(dead, torch.zeros(()), top_value)
    top_logits, bottom_logits = logit_lens(loaded.model, sae.W_dec, cfg.logit_k, decoder)
    # Exact on a GPU or for small SAEs; the map's near-exact partitioned search for large ones on a
    # CPU (an exact search of 65,536 x 4,096 there takes ~10 minutes).
    knn_cfg = ProjectConfig(device=str(sae.W_dec.device))
    neighbors, _ = decoder_knn(sae.W_dec.detach(), cfg.n_neighbors, knn_cfg)
    return pd.DataFrame(
        {
            "feature": np.arange(sae.d_sae, dtype=np.int32),
            "density": (count.double() / max(corpus.n_tokens, 1)).numpy().astype(np.float32),
            "max_act": max_act.numpy().astype(np.float32),
            "mean_act": torch.where(dead, torch.zeros(()), mean).numpy().astype(np.float32),
            "top_tokens": _top_tokens(state, corpus, cfg.n_top_tokens, decoder),
            "top_logits": top_logits,
            "bottom_logits": bottom_logits,
            "neighbors": [row.astype(np.int32) for row in neighbors],
            "dead": dead.numpy(),
        }
    )


def _top_tokens(state: StreamState, corpus: CorpusIndex, n: int, decoder) -> list[list[str]]:
    """Per feature, the cleaned token strings carrying most of its activation in the reservoir sample
    (a uniform sample of its active tokens, so summed activation estimates the full corpus's)."""
    d_sae = state.count.numel()
    loc = state.reservoir.loc.cpu()
    feature, slot = (loc >= 0).nonzero(as_tuple=True)
    frame = pd.DataFrame(
        {
            "feature": feature.numpy(),
            "token": corpus.token[loc[feature, slot]].numpy(),
            "weight": state.reservoir.value.cpu()[feature, slot].double().numpy(),
        }
    )
    clean = decoder.clean(np.unique(frame["token"]).tolist())
    frame["text"] = frame["token"].map(clean)
    frame = frame[frame["text"] != ""]
    summed = frame.groupby(["feature", "text"], sort=False)["weight"].sum().reset_index()
    summed = summed.sort_values(["feature", "weight", "text"], ascending=[True, False, True])
    lists = summed.groupby("feature", sort=False)["text"].agg(lambda s: list(s[:n]))
    out: list[list[str]] = [[] for _ in range(d_sae)]
    for feature_id, texts in lists.items():
        out[int(feature_id)] = texts
    return out
