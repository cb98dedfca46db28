"""Feature statistics against brute force on a tiny in-process Llama and tiny SAEs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from build_map.bundle.schema import EXAMPLE_SCHEMA, FEATURE_SCHEMA
from build_map.features.config import StatsConfig, StatsError
from build_map.features.stats import compute_feature_stats
from build_map.labels.contexts import context_labels
from build_map.labels.text import DEAD_LABEL
from build_map.lm.hookpoints import final_norm
from build_map.lm.tokens import clean_token
from build_map.sae.model import SAEConfig, SAEError, SparseAutoencoder

HOOKPOINT = "model.layers.0"
D_SAE = 40
DEAD = 7  # planted: never active
N_TOKENS = 500  # fewer than the corpus holds: the budget cuts a sequence short
STAT_COLUMNS = ["feature", "density", "max_act", "mean_act", "top_tokens", "top_logits", "bottom_logits",
                "neighbors", "dead"]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer):
    """Sequences of varied length; every one starts with the same token (a BOS-like first position)."""
    gen = torch.Generator().manual_seed(0)
    vocab = len(tiny_tokenizer)
    first = 1
    out = []
    for _ in range(60):
        length = int(torch.randint(2, 25, (1,), generator=gen))
        body = torch.randint(2, vocab, (length - 1,), generator=gen).tolist()
        out.append([first, *body])
    return out


def _sae(d_in: int, activation: str = "topk", seed: int = 0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=D_SAE, activation=activation, k=4 if activation == "topk" else None)
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE, generator=gen))
        sae.W_dec.copy_(torch.randn(D_SAE, d_in, generator=gen))
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.W_enc[:, DEAD] = 0.0
        sae.b_enc[DEAD] = -1e6
    return sae


@pytest.fixture(scope="module")
def hidden(loaded, sequences):
    """Residual stream at the hookpoint, one sequence at a time through the full model (no padding)."""
    layer = int(HOOKPOINT.rsplit(".", 1)[1])
    with torch.no_grad():
        return [
            loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
            for ids in sequences
        ]


def _brute_force(sae, sequences, hidden, n_tokens):
    """Rows of (sequence, position, token id) for every counted token, their (n_tokens, d_sae)
    activations, and each sequence's activations at every position."""
    where, acts, full = [], [], []
    with torch.no_grad():
        for index, ids in enumerate(sequences):
            full.append(sae.encode(hidden[index]))  # (len, d_sae)
            for pos in range(1, len(ids)):
                where.append((index, pos, ids[pos]))
                acts.append(full[-1][pos])
    return where[:n_tokens], torch.stack(acts[:n_tokens]), full


@pytest.fixture(scope="module")
def topk_run(loaded, sequences):
    sae = _sae(loaded.model.config.hidden_size)
    cfg = StatsConfig(
        compute_dtype="model",
        n_tokens=N_TOKENS,
        batch_tokens=100,
        reservoir_size=16,
        n_neighbors=5,
        logit_k=4,
    )
    return sae, cfg, compute_feature_stats(loaded, sae, HOOKPOINT, sequences, cfg)


@pytest.fixture(scope="module")
def brute(sequences, hidden, topk_run):
    return _brute_force(topk_run[0], sequences, hidden, N_TOKENS)


def test_density_max_mean_match_brute_force(topk_run, brute):
    _, _, stats = topk_run
    _, acts, _ = brute
    features = stats.features
    assert stats.n_tokens == N_TOKENS
    active = acts > 0
    count = active.sum(0)
    np.testing.assert_allclose(features["density"], (count / N_TOKENS).numpy(), rtol=1e-6)
    np.testing.assert_allclose(features["max_act"], acts.max(0).values.numpy(), rtol=1e-4, atol=1e-5)
    mean = (acts.sum(0) / count.clamp(min=1)).numpy()
    np.testing.assert_allclose(features["mean_act"], mean, rtol=1e-4, atol=1e-5)
    assert list(features["dead"]) == (count == 0).tolist()
    assert features.loc[DEAD, "dead"] and features.loc[DEAD, "density"] == 0
    assert not (stats.examples["feature"] == DEAD).any()


def test_tables_match_the_bundle_contract(topk_run):
    _, _, stats = topk_run
    pa.Table.from_pandas(stats.examples[EXAMPLE_SCHEMA.names], schema=EXAMPLE_SCHEMA, preserve_index=False)
    stat_schema = pa.schema([FEATURE_SCHEMA.field(name) for name in STAT_COLUMNS])
    pa.Table.from_pandas(stats.features[STAT_COLUMNS], schema=stat_schema, preserve_index=False)
    assert list(stats.features["feature"]) == list(range(D_SAE))


def test_top_examples_sorted_centred_and_recomputed(loaded, topk_run, brute, sequences):
    _, cfg, stats = topk_run
    where, acts, full = brute
    # (feature, activation) → location, to find where each example came from
    located = {}
    for row, (seq, pos, _) in enumerate(where):
        for feature in torch.nonzero(acts[row] > 0).flatten().tolist():
            located.setdefault(feature, []).append((float(acts[row, feature]), seq, pos))
    for feature, rows in stats.examples[stats.examples["bucket"] == "top"].groupby("feature"):
        expected = sorted((a for a, _, _ in located[feature]), reverse=True)[: cfg.n_top]
        assert list(rows["rank"]) == list(range(len(rows)))
        np.testing.assert_allclose(rows["act"], expected, rtol=1e-4, atol=1e-5)  # sorted, the true top
        for example in rows.itertuples():
            # Identical prefixes give identical activations: accept any location that fits.
            hits = [(seq, pos) for a, seq, pos in located[feature] if abs(a - example.act) < 1e-4]
            assert any(_window_matches(loaded, cfg, sequences, full, feature, example, *hit) for hit in hits)


def _window_matches(loaded, cfg, sequences, full, feature, example, seq, pos) -> bool:
    first = max(pos - cfg.context_before, 0)
    stop = min(pos + cfg.context_after + 1, len(sequences[seq]))
    ids = sequences[seq][first:stop]
    if list(example.tokens) != [loaded.tokenizer.decode([i]) for i in ids]:
        return False
    focus = pos - first  # the focus token sits context_before tokens in, unless the sequence starts sooner
    assert example.acts[focus] == pytest.approx(example.act, rel=1e-4, abs=1e-5)
    recomputed = full[seq][first:stop, feature].clone()
    if first == 0:
        recomputed[0] = 0.0  # position 0 is excluded, and shown as 0
    np.testing.assert_allclose(example.acts, recomputed.numpy(), rtol=1e-4, atol=1e-5)
    return True


def test_quantile_buckets_follow_the_distribution(loaded, sequences, brute):
    """With a reservoir larger than any feature's count the quantiles are exact."""
    sae = _sae(loaded.model.config.hidden_size)
    cfg = StatsConfig(compute_dtype="model", n_tokens=N_TOKENS, reservoir_size=1000, n_top=5, n_neighbors=3)
    stats = compute_feature_stats(loaded, sae, HOOKPOINT, sequences, cfg)
    _, acts, _ = brute
    examples = stats.examples
    assert set(examples["bucket"]) == {"top", "q25", "q50", "q75"}
    checked = 0
    for feature in range(D_SAE):
        values = acts[:, feature][acts[:, feature] > 0].numpy()
        if len(values) < 30:
            continue
        checked += 1
        for bucket, q in (("q25", 0.25), ("q50", 0.5), ("q75", 0.75)):
            chosen = examples[(examples["feature"] == feature) & (examples["bucket"] == bucket)]["act"]
            assert len(chosen) == cfg.n_per_quantile
            low, high = np.quantile(values, [max(q - 0.15, 0), min(q + 0.15, 1)])
            assert ((chosen >= low - 1e-5) & (chosen <= high + 1e-5)).all(), (feature, bucket)
        # top tokens: the reservoir holds every active token, so the weights are exact
        weights: dict[str, float] = {}
        for row in torch.nonzero(acts[:, feature] > 0).flatten().tolist():
            text = clean_token(loaded.tokenizer.decode([brute[0][row][2]]))
            if text:
                weights[text] = weights.get(text, 0.0) + float(acts[row, feature])
        assert stats.features.loc[feature, "top_tokens"][0] == max(weights, key=weights.get)
    assert checked >= 3


def test_first_positions_are_excluded(loaded, sequences, hidden):
    """A ReLU feature planted to fire exactly on the (shared) first-position vector is dead."""
    sae = _sae(loaded.model.config.hidden_size, activation="relu", seed=1)
    with torch.no_grad():
        first = hidden[0][0]  # every sequence starts with the same token: the same vector
        unit = first / first.norm()
        others = torch.cat([states[1:] for states in hidden])
        margin = float(first.norm() - (others @ unit).max())
        assert margin > 0, "precondition: the first position's projection stands out"
        sae.W_enc[:, 0] = unit
        sae.b_enc[0] = -(first.norm() - margin / 2)
    stats = compute_feature_stats(
        loaded, sae, HOOKPOINT, sequences, StatsConfig(compute_dtype="model", n_tokens=10_000, n_neighbors=3)
    )
    assert stats.features.loc[0, "dead"]
    assert stats.features.loc[0, "density"] == 0
    assert stats.n_tokens == sum(len(ids) - 1 for ids in sequences)


def test_logit_lens_matches_manual(loaded, topk_run):
    sae, cfg, stats = topk_run
    feature = 3
    with torch.no_grad():
        logits = loaded.model.lm_head(final_norm(loaded.model)(sae.W_dec[feature]))
    for column, descending in (("top_logits", True), ("bottom_logits", False)):
        order = torch.argsort(logits, descending=descending).tolist()
        order = [i for i in order if i != loaded.tokenizer.pad_token_id]  # padding is never listed
        texts = [clean_token(loaded.tokenizer.decode([i])) for i in order[: 3 * cfg.logit_k]]
        expected = list(dict.fromkeys(t for t in texts if t))[: cfg.logit_k]
        assert list(stats.features.loc[feature, column]) == expected


def test_neighbours_by_decoder_cosine(topk_run):
    sae, cfg, stats = topk_run
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-2)
    expected = cosine.topk(cfg.n_neighbors, dim=1).indices
    for feature in range(D_SAE):
        assert list(stats.features.loc[feature, "neighbors"]) == expected[feature].tolist()


def test_auto_labels_on_real_stats(topk_run):
    _, _, stats = topk_run
    labels = context_labels(stats.features, stats.examples)
    assert labels[DEAD] == DEAD_LABEL
    live = [label for feature, label in enumerate(labels) if not stats.features.loc[feature, "dead"]]
    assert all(label and len(label) <= 60 for label in live)
    assert len(set(live)) == len(live)
    assert not any(ch in label for label in labels for ch in "ĠĊ▁")


def test_clear_errors(loaded):
    sae = _sae(loaded.model.config.hidden_size)
    with pytest.raises(StatsError, match="no tokens past the first position"):
        compute_feature_stats(loaded, sae, HOOKPOINT, [[5], [6]], StatsConfig(n_neighbors=3))
    wrong = SparseAutoencoder(SAEConfig(d_in=32, d_sae=8, activation="relu"))
    with pytest.raises(SAEError, match="does not match the model's hidden size 64"):
        compute_feature_stats(loaded, wrong, HOOKPOINT, [[1, 2, 3]])
    with pytest.raises(StatsError, match="quantiles must lie strictly between 0 and 1"):
        StatsConfig(quantiles=(0.5, 1.0))
    with pytest.raises(StatsError, match="compute_dtype='fp8'; choose one of auto, model"):
        StatsConfig(compute_dtype="fp8")


@pytest.mark.slow
def test_embedded_default_tables_are_readable(embedded):
    """SmolLM2 + the real corpus: example text rebuilds the corpus text, lists carry no tokenizer markers."""
    from build_map.lm.corpus import CorpusConfig, token_sequences

    d = embedded.model.config.hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=256, activation="topk", k=8))
    with torch.no_grad():
        directions = torch.nn.functional.normalize(
            torch.randn(256, d, generator=torch.Generator().manual_seed(0)), dim=1
        )
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    cfg = StatsConfig(compute_dtype="model", n_tokens=1500)
    stats = compute_feature_stats(
        embedded, sae, "model.layers.15", token_sequences(embedded.tokenizer, CorpusConfig()), cfg
    )
    assert stats.n_tokens == 1500
    lists = [
        t
        for column in ("top_tokens", "top_logits", "bottom_logits")
        for row in stats.features[column]
        for t in row
    ]
    assert (
        lists and not any(ch in t for t in lists for ch in "ĠĊ▁") and all(t.strip() == t and t for t in lists)
    )
    live = stats.features[~stats.features["dead"]]
    assert (live["top_logits"].map(len) == cfg.logit_k).all()
    text = "".join(stats.examples.iloc[0]["tokens"])
    assert "Ġ" not in text and len(text) > 20
    labels = context_labels(stats.features, stats.examples)
    assert len(set(labels)) == len(labels) - sum(label == DEAD_LABEL for label in labels) + min(
        1, labels.count(DEAD_LABEL)
    )
