"""The output-effect probe on the tiny Llama: planted features whose effect on the output is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_map.features.output_probe import choose_step, probe_features
from build_map.features.probe_config import STRENGTH_GRID, ProbeConfig, ProbeError
from build_map.lm.models import LoadedModel
from build_map.sae.model import SAEConfig, SparseAutoencoder
from tests.support.tiny import make_tiny_model

HOOKPOINT = "model.layers.0"
# A clear effect at KL 1 nat: the tiny model's planted tokens stand out well above its noise there.
CFG = ProbeConfig(prompts=("hello, how are you today?", "what is your favourite colour?"), positions=(0, 2),
                  clear_kl=1.0, target_kl=1.3)  # fmt: skip


@pytest.fixture(scope="module")
def sharp(tiny_tokenizer) -> LoadedModel:
    """The tiny Llama with a 30× unembedding: a seeded model's logits are nearly flat, so no push
    could move its next-token distribution far enough to tell strengths apart."""
    model = make_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return LoadedModel(model, tiny_tokenizer, "tiny-sharp", torch.device("cpu"), torch.float32)


def _sae(rows: torch.Tensor) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=rows.shape[1], d_sae=rows.shape[0], activation="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    return sae.eval().requires_grad_(False)


def test_a_feature_along_an_unembedding_row_promotes_that_token(sharp):
    tokenizer, head = sharp.tokenizer, sharp.model.get_output_embeddings().weight.detach()
    words = [" how", " you", " and"]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(i) == 1 for i in ids), "the planted words must be single tokens"
    rows = torch.stack([head[i[0]] / head[i[0]].norm() for i in ids])
    sae = _sae(rows)
    result = probe_features(sharp, sae, HOOKPOINT, np.full(len(words), 0.2), range(len(words)), CFG)
    frame = result.frame
    for feature, word in enumerate(words):
        assert word.strip() in frame.at[feature, "output_promotes"][:3], frame.at[feature, "output_promotes"]
        assert word.strip() not in frame.at[feature, "output_suppresses"]
    assert (frame["steerability"] > 0.15).all()  # much of the moved probability lands on words
    assert all(text.isprintable() for tokens in frame["output_suppresses"] for text in tokens)
    per_step = len(words) * len(CFG.prompts) * len(CFG.positions)  # features × prompts × positions
    assert result.shortcut and 2 * per_step <= result.positions <= CFG.search_steps * per_step


def test_steer_strength_falls_as_the_planted_decoder_norm_rises(sharp):
    direction = torch.randn(sharp.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    norms = [0.05, 0.1, 0.2, 0.4, 0.8]
    sae = _sae(torch.stack([n * direction / direction.norm() for n in norms]))
    frame = probe_features(sharp, sae, HOOKPOINT, np.full(len(norms), 0.2), range(len(norms)), CFG).frame
    strengths = frame["steer_strength"].to_numpy()
    assert np.all(np.diff(strengths) <= 0), strengths
    assert strengths[0] > strengths[-1]
    assert set(strengths) <= set(np.float32(STRENGTH_GRID))


def test_choose_step_follows_the_documented_rule():
    cfg = ProbeConfig(clear_kl=1.0, target_kl=1.3, collapse_kl=4.0)
    strength = np.array([[6, 6, 6, 6], [4, 8, 2, 3], [5, 10, 1, 2]]) + 4  # steps × features (grid indices)
    kl = np.array([[1.5, 0.2, 9.0, 5.0], [0.5, 0.6, 6.0, 4.5], [1.1, 0.9, 5.0, 3.9]])
    # f0: clear at 6 and 5 → the smaller (5); f1: never clear → the largest tested (10);
    # f2: all collapsed → the smallest (1); f3: clear nowhere below collapse but 2 is coherent → 2
    assert choose_step(strength, kl, cfg).tolist() == [2, 2, 2, 2]


def test_features_without_a_max_activation_are_refused(tiny_loaded):
    sae = _sae(torch.eye(tiny_loaded.model.config.hidden_size)[:2])
    with pytest.raises(ProbeError, match="positive max activation"):
        probe_features(tiny_loaded, sae, HOOKPOINT, np.array([1.0, 0.0]), [0, 1], CFG)
