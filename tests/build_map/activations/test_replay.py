"""A harvest read back for the statistics: the same rows as running the model, from the buffer,
and never from a buffer of other text."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from build_map.activations.batches import iter_activation_batches
from build_map.activations.buffer import HarvestError
from build_map.activations.harvest import HarvestConfig, harvest_to_buffer
from build_map.activations.replay import HarvestReplay
from build_map.features.config import StatsConfig
from build_map.features.stats import compute_feature_stats
from build_map.lm.corpus import CorpusConfig, token_sequences
from build_map.sae.model import SAEConfig, SparseAutoencoder

HOOKPOINT = "model.layers.0"


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                      {"role": "assistant", "content": f"answer {i} is here"}]}
        for i in range(40)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _corpus(corpus_file, seed=5):
    return CorpusConfig(sources=(str(corpus_file),), max_seq_len=32, seed=seed)


def _buffer(loaded, corpus_file, folder, n_tokens):
    harvest = HarvestConfig(batch_tokens=96, compute_dtype="model")
    return harvest_to_buffer(
        loaded, HOOKPOINT, _corpus(corpus_file), n_tokens, folder, harvest, progress=False
    )


def _rows(batches):
    batches = list(batches)
    return tuple(
        torch.cat([getattr(b, name) for b in batches])
        for name in ("acts", "token_ids", "sequence_ids", "positions")
    )


def test_replayed_rows_are_the_models_rows(tiny_loaded, corpus_file, tmp_path):
    replay = HarvestReplay(_buffer(tiny_loaded, corpus_file, tmp_path / "buf", 200), "tiny-llama", HOOKPOINT)
    sequences = list(token_sequences(tiny_loaded.tokenizer, _corpus(corpus_file)))
    pad = tiny_loaded.tokenizer.pad_token_id
    # Past the buffer's 200 rows the model runs; a batch size unlike the harvest's changes nothing.
    replayed = _rows(replay.batches(tiny_loaded.model, pad, HOOKPOINT, sequences, 64))
    computed = _rows(
        iter_activation_batches(tiny_loaded.model, tiny_loaded.tokenizer, HOOKPOINT, sequences, 64)
    )
    assert len(replayed[0]) > 200
    torch.testing.assert_close(replayed[0], computed[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(replayed[1:], computed[1:], strict=True):
        torch.testing.assert_close(got, want)


def test_covered_sequences_never_run_the_model(tiny_loaded, corpus_file, tmp_path):
    replay = HarvestReplay(_buffer(tiny_loaded, corpus_file, tmp_path / "buf", 200), "tiny-llama", HOOKPOINT)
    sequences = list(token_sequences(tiny_loaded.tokenizer, _corpus(corpus_file)))[:3]
    rows = _rows(replay.batches(None, 0, HOOKPOINT, sequences, 64))  # no model: it would fail if called
    assert len(rows[0]) == sum(len(s) - 1 for s in sequences)


def test_a_compacted_buffer_still_maps_rows(tiny_loaded, corpus_file, tmp_path):
    buffer = _buffer(tiny_loaded, corpus_file, tmp_path / "buf", 100_000)  # more than the corpus holds
    assert buffer.meta["n_filled"] < buffer.meta["n_tokens_requested"]
    replay = HarvestReplay(buffer, "tiny-llama", HOOKPOINT)
    sequences = list(token_sequences(tiny_loaded.tokenizer, _corpus(corpus_file)))
    replayed = _rows(replay.batches(None, 0, HOOKPOINT, sequences, 64))
    computed = _rows(
        iter_activation_batches(tiny_loaded.model, tiny_loaded.tokenizer, HOOKPOINT, sequences, 64)
    )
    torch.testing.assert_close(replayed[0], computed[0], rtol=1e-5, atol=1e-5)


def test_other_text_model_or_hookpoint_is_an_error(tiny_loaded, corpus_file, tmp_path):
    buffer = _buffer(tiny_loaded, corpus_file, tmp_path / "buf", 200)
    with pytest.raises(HarvestError, match="not other-model at model.layers.0"):
        HarvestReplay(buffer, "other-model", HOOKPOINT)
    with pytest.raises(HarvestError, match="at model.layers.1"):
        HarvestReplay(buffer, "tiny-llama", "model.layers.1")
    other = list(token_sequences(tiny_loaded.tokenizer, _corpus(corpus_file, seed=6)))  # another order
    replay = HarvestReplay(buffer, "tiny-llama", HOOKPOINT)
    with pytest.raises(HarvestError, match="harvested from other text"):
        list(replay.batches(tiny_loaded.model, 0, HOOKPOINT, other, 64))


def test_statistics_from_the_buffer_match_the_models(tiny_loaded, corpus_file, tmp_path):
    replay = HarvestReplay(_buffer(tiny_loaded, corpus_file, tmp_path / "buf", 300), "tiny-llama", HOOKPOINT)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, activation="topk", k=4, hookpoint=HOOKPOINT))
    sequences = list(token_sequences(tiny_loaded.tokenizer, _corpus(corpus_file)))
    cfg = StatsConfig(n_tokens=250, seed=1)
    direct = compute_feature_stats(tiny_loaded, sae, HOOKPOINT, sequences, cfg)
    read = compute_feature_stats(tiny_loaded, sae, HOOKPOINT, sequences, cfg, replay)
    assert read.n_tokens == direct.n_tokens == 250
    columns = ["feature", "density", "dead"]
    pd.testing.assert_frame_equal(read.features[columns], direct.features[columns])
    for column in ("max_act", "mean_act"):
        np.testing.assert_allclose(read.features[column], direct.features[column], rtol=1e-4)
    keys = ["feature", "rank", "bucket"]
    pd.testing.assert_frame_equal(read.examples[keys], direct.examples[keys])
    assert read.examples["tokens"].map(list).tolist() == direct.examples["tokens"].map(list).tolist()
