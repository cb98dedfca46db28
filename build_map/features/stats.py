"""Per-feature statistics over a corpus: density, activations, examples, top tokens, logit lens, neighbours.

``compute_feature_stats`` runs one streaming pass (``build_map.features.streaming``: the model cut
after the hookpoint, then the SAE, keeping only fixed-size tensors per feature, so 65,536 features
fit on a GPU), then assembles the example table (``examples``) and the feature table (``table``).
No second pass over the model is needed: with thousands of features, almost every sequence holds
some feature's example, so a second pass would re-run nearly the whole corpus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from build_map.activations.replay import HarvestReplay
from build_map.features.config import StatsConfig, StatsError
from build_map.features.examples import choose_examples, example_rows
from build_map.features.streaming import stream_corpus
from build_map.features.table import feature_rows
from build_map.lm.hookpoints import d_model, normalize_hookpoint
from build_map.lm.models import LoadedModel
from build_map.lm.tokens import TokenText
from build_map.sae.model import SparseAutoencoder, check_matches_model

logger = logging.getLogger(__name__)


@dataclass
class FeatureStats:
    features: pd.DataFrame
    """One row per feature: feature, density, max_act, mean_act, top_tokens, top_logits,
    bottom_logits, neighbors, dead."""
    examples: pd.DataFrame
    """EXAMPLE_SCHEMA rows: feature, rank, bucket, act, tokens, acts."""
    n_tokens: int
    """Tokens the statistics were computed over."""
    n_sequences: int
    """Corpus sequences those tokens came from."""
    config: StatsConfig = field(default_factory=StatsConfig)


def compute_feature_stats(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hookpoint: str,
    sequences: Iterable[Sequence[int]],
    cfg: StatsConfig | None = None,
    replay: HarvestReplay | None = None,
) -> FeatureStats:
    """Stream ``sequences`` (token ids, any iterable: ``corpus.token_sequences`` output) through the
    model and the SAE once, then assemble the feature and example tables. With ``replay`` (the
    buffer harvested from these sequences) the activations are read from it, not recomputed."""
    cfg = cfg or StatsConfig()
    device = sae.W_dec.device
    hookpoint = normalize_hookpoint(loaded.model, hookpoint)
    check_matches_model(sae, d_model(loaded.model), hookpoint)
    started = time.perf_counter()
    with torch.inference_mode():
        state, corpus = stream_corpus(loaded, sae, hookpoint, sequences, cfg, device, replay)
        if corpus.n_tokens == 0:
            raise StatsError(
                "The corpus gave no tokens past the first position of each sequence; pass longer sequences."
            )
        streamed = time.perf_counter()
        decoder = TokenText(loaded.tokenizer)
        examples = example_rows(corpus, choose_examples(state, cfg), cfg, decoder)
        features = feature_rows(loaded, sae, state, corpus, cfg, decoder)
    logger.info(
        "Stats over %d tokens: %d of %d features live; %.1f s streaming, %.1f s tables",
        corpus.n_tokens,
        int((~features["dead"]).sum()),
        sae.d_sae,
        streamed - started,
        time.perf_counter() - streamed,
    )
    return FeatureStats(features, examples, corpus.n_tokens, corpus.n_sequences, cfg)
