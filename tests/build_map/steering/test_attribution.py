"""Activation × gradient attribution on a tiny float64 Llama and SAE, against finite differences.

Central differences with eps 1e-3: Llama's RMSNorm computes in float32 even in a float64 model, so
log p carries ~1e-8 of noise and much smaller steps would measure that noise."""

from __future__ import annotations

import pytest
import torch

from build_map.lm.capture import hidden_of, with_hidden
from build_map.lm.hookpoints import resolve_hookpoint
from build_map.lm.hooks import scoped_forward_hook
from build_map.sae.model import SAEConfig, SparseAutoencoder
from build_map.steering.attribution import AttributionError, attribute_token
from tests.support.tiny import TINY_D_MODEL, make_tiny_model

D_SAE, HOOKPOINT, EPS = 128, "model.layers.0", 1e-3


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=3).double()


@pytest.fixture(scope="module")
def sae():
    """A ReLU SAE with unit decoder rows and a positive bias, so many features fire."""
    gen = torch.Generator().manual_seed(4)
    sae = SparseAutoencoder(SAEConfig(d_in=TINY_D_MODEL, d_sae=D_SAE, activation="relu"))
    with torch.no_grad():
        directions = torch.randn(D_SAE, TINY_D_MODEL, generator=gen)
        sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_enc.copy_(0.02 * torch.rand(D_SAE, generator=gen))
        sae.b_dec.copy_(0.01 * torch.randn(TINY_D_MODEL, generator=gen))
    return sae.double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("hello, how are you today? fine, thanks")["input_ids"]])


def feature_scaled_logprob(model, sae, hookpoint, ids, position, target_token, scale) -> float:
    """log p(target at position) with every feature's activation multiplied by ``scale`` (d_sae,) at
    every position, the SAE error held constant: the reference the attributions linearise."""
    ids = torch.as_tensor(ids).reshape(1, -1)
    ids = ids[:, : position % ids.shape[1] + 1]

    def hook(_module, _args, output):
        hidden = hidden_of(output)
        x = hidden.to(sae.W_enc.device, sae.W_enc.dtype)
        f = sae.encode(x)
        replaced = sae.decode(f * scale.to(f)) + (x - sae.decode(f))
        return with_hidden(output, replaced.to(hidden.device, hidden.dtype))

    with scoped_forward_hook(resolve_hookpoint(model, hookpoint), hook), torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(logits[0, -1].double().log_softmax(-1)[target_token])


def _scaled(model, sae, ids, position, target, scale):
    return feature_scaled_logprob(model, sae, HOOKPOINT, ids, position, target, scale)


def _central(model, sae, ids, position, target, direction):
    """d/dc log p with the features scaled by 1 + c·direction, at c = 0: the first-order change
    of log p when the features along ``direction`` are ablated, sign flipped (ablating = c → -1)."""
    ones = torch.ones(D_SAE, dtype=torch.float64)
    up = _scaled(model, sae, ids, position, target, ones + EPS * direction)
    down = _scaled(model, sae, ids, position, target, ones - EPS * direction)
    return (up - down) / (2 * EPS)


def test_forward_is_unchanged_and_logprob_reported(model, sae, ids):
    position = 6
    frame = attribute_token(model, sae, HOOKPOINT, ids, position, top_k=5)
    with torch.no_grad():
        logits = model(input_ids=ids[:, : position + 1]).logits[0, position]
    target = int(ids[0, position + 1])  # the default target is the text's next token
    assert frame.attrs["target_token"] == target
    assert frame.attrs["logprob"] == pytest.approx(float(logits.log_softmax(-1)[target]), abs=1e-9)


def test_sum_of_attributions_is_the_linearised_ablation_of_all_features(model, sae, ids):
    position = ids.shape[1] - 2
    frame = attribute_token(model, sae, HOOKPOINT, ids, position, top_k=D_SAE)
    target = frame.attrs["target_token"]
    ones = torch.ones(D_SAE, dtype=torch.float64)
    finite = _central(model, sae, ids, position, target, ones)
    assert abs(finite) > 1e-3  # the check means something
    assert frame.attrs["total_attribution"] == pytest.approx(finite, rel=1e-3, abs=1e-6)
    assert frame["attribution"].sum() == pytest.approx(finite, rel=1e-3, abs=1e-6)  # all listed here


def test_top_feature_matches_its_own_finite_difference(model, sae, ids):
    position = ids.shape[1] - 1  # last token: the target is the model's own top prediction
    frame = attribute_token(model, sae, HOOKPOINT, ids, position, top_k=3, per_position=True)
    top = frame.iloc[0]
    assert frame["attribution"].abs().is_monotonic_decreasing
    target = frame.attrs["target_token"]
    direction = torch.zeros(D_SAE, dtype=torch.float64)
    direction[int(top.feature)] = 1.0
    finite = _central(model, sae, ids, position, target, direction)
    assert top.attribution == pytest.approx(finite, rel=1e-3, abs=1e-6)
    per = frame.attrs["per_position"]
    mine = per[per.feature == top.feature]
    assert mine["attribution"].sum() == pytest.approx(top.attribution, rel=1e-9)
    here = mine[mine.position == position]["attribution"].sum()
    assert top.attribution_here == pytest.approx(here, rel=1e-9, abs=1e-12)


def test_hidden_features_are_left_out(model, sae, ids):
    frame = attribute_token(model, sae, HOOKPOINT, ids, 5, top_k=4)
    hidden = torch.zeros(D_SAE, dtype=torch.bool)
    hidden[int(frame.feature.iloc[0])] = True
    again = attribute_token(model, sae, HOOKPOINT, ids, 5, top_k=4, hidden=hidden)
    assert int(frame.feature.iloc[0]) not in set(again.feature)
    assert list(again.feature[:3]) == list(frame.feature[1:4])
    assert again.attrs["total_attribution"] == pytest.approx(frame.attrs["total_attribution"])


def test_no_gradient_left_on_the_model_and_no_active_hooks(model, sae, ids):
    attribute_token(model, sae, HOOKPOINT, ids, 3)
    assert all(p.grad is None for p in model.parameters())
    hooks = list(model.get_submodule(HOOKPOINT)._forward_hooks.values())
    assert len(hooks) == 1 and hooks[0].current.get() is None  # only the idle scoped-hook dispatcher
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("position", [99, -99])
def test_bad_position_is_refused(model, sae, ids, position):
    with pytest.raises(AttributionError, match="outside the sequence"):
        attribute_token(model, sae, HOOKPOINT, ids, position)


def test_steering_composes(model, sae, ids, tiny_tokenizer):
    from build_map.steering.engine import SteeringEngine
    from build_map.steering.requests import Edit

    engine = SteeringEngine(model, tiny_tokenizer, sae, HOOKPOINT, torch.ones(D_SAE))
    try:
        plain = attribute_token(model, sae, HOOKPOINT, ids, 5, top_k=D_SAE)
        feature = int(plain[plain.activation > 0].feature.iloc[-1])  # a weak one, active at position 5
        with engine.steered([[Edit(feature, 3.0)]]):
            steered = attribute_token(model, sae, HOOKPOINT, ids, 5, top_k=D_SAE)
    finally:
        engine.close()
    before = plain.set_index("feature").activation[feature]
    after = steered.set_index("feature").activation[feature]
    assert after == pytest.approx(before + 2 * 3.0, rel=1e-6)  # encoder reads 2 × the decoder row
