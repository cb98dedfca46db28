"""The hf engine and interp-engine's eager backend steer alike: the same prompts and edits give the
same greedy tokens for nudge, orthogonal and cap (issue 14, item 3), through the spec adapter a
vLLM backend would use (``steering.interp_specs``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from build_map.steering.interp_specs import resid_post_layer, steering_spec
from build_map.steering.requests import Edit, SamplingConfig, SteeringError, SteeringRequest, SteeringScope

ie = pytest.importorskip("interp_engine", reason="interp-engine needs Python >= 3.11")

EVERYWHERE = SteeringScope(prompt=True, special_tokens=True)  # interp-engine steers every position
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)
CASES = [
    [],
    [Edit(3, 6.0, "nudge")],
    [Edit(5, -4.0, "nudge"), Edit(9, 3.0, "nudge")],
    [Edit(3, 0.0, "orthogonal")],
    [Edit(8, 4.0, "orthogonal")],
    [Edit(11, -0.5, "cap")],
    [Edit(3, 5.0, "nudge"), Edit(3 + 1, 3.0, "orthogonal"), Edit(12, 0.3, "cap")],
]


@pytest.fixture(scope="module")
def pair(tiny_session, tiny_bundle_dir):
    model = ie.load_model(
        str(tiny_bundle_dir.parent / "model"), backend="eager", device="cpu", dtype="float32"
    )
    return tiny_session, model


def _theirs(session, model, ids, edits):
    scales = session.engine.feature_scale
    spec = steering_spec(edits, 1.0, session.sae, scales, session.hookpoint)
    steps = []
    context = ie.steer(model, spec) if spec is not None else contextlib.nullcontext()
    with context:
        for step in ie.generate_stream(model, ids, max_tokens=GREEDY.max_new_tokens, temperature=0.0):
            steps.append(step.token_id)
    eos = set(session.engine.eos_ids)
    return [t for t in steps if t not in eos]


@pytest.mark.parametrize("edits", CASES, ids=lambda e: "+".join(f"{x.mode}{x.feature}" for x in e) or "none")
@pytest.mark.parametrize("text", ["hello there, how are you?", "tell me a story about a fox"])
def test_same_greedy_text_as_interp_engine_eager(pair, edits, text):
    session, model = pair
    ids = session.engine.prompt_ids([{"role": "user", "content": text}])
    ours = _text(session, SteeringRequest(ids, tuple(edits), GREEDY, 1.0, scope=EVERYWHERE))
    theirs = session.engine.decode(_theirs(session, model, ids, edits))
    assert ours == theirs
    if edits:  # the edits do something: parity is not two unsteered runs
        assert ours != _text(session, SteeringRequest(ids, (), GREEDY))


def _text(session, request):
    return "".join(piece for _, piece in session.engine.submit(request))


def test_pins_are_refused_with_the_backend_that_can_serve_them(tiny_session):
    with pytest.raises(SteeringError, match="use the hf backend for pins"):
        steering_spec(
            [Edit(3, 1.0, "pin")], 1.0, tiny_session.sae, torch.ones(tiny_session.sae.d_sae), "model.layers.1"
        )
    assert resid_post_layer("model.layers.19") == 19


@pytest.mark.slow
def test_same_greedy_text_on_the_embedded_model(embedded):
    """SmolLM2-135M with a random 16-feature SAE at layer 15: the hf engine and interp-engine's
    eager backend (loaded from the same safetensors folder) write the same greedy replies."""
    from build_map.lm.models import embedded_model_folder
    from build_map.sae.model import SAEConfig, SparseAutoencoder
    from build_map.steering.engine import SteeringEngine

    d_model = embedded.model.config.hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=16, activation="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(
            torch.nn.functional.normalize(
                torch.randn(16, d_model, generator=torch.Generator().manual_seed(3)), dim=1
            )
        )
    engine = SteeringEngine(
        embedded.model,
        embedded.tokenizer,
        sae.eval(),
        "model.layers.15",
        feature_scale=torch.full((16,), 12.0),
    )
    model = ie.load_model(str(embedded_model_folder()), backend="eager", device="cpu", dtype="float32")
    cases = [
        [Edit(1, 1.0, "nudge")],
        [Edit(2, 0.0, "orthogonal")],
        [Edit(4, 3.0, "orthogonal")],
        [Edit(6, -0.5, "cap")],
    ]
    changed = 0
    try:
        for text in ("Tell me about your weekend.", "What is a good book?"):
            ids = engine.prompt_ids([{"role": "user", "content": text}])
            plain = "".join(piece for _, piece in engine.submit(SteeringRequest(ids, (), GREEDY)))
            for edits in cases:
                request = SteeringRequest(ids, tuple(edits), GREEDY, 1.0, scope=EVERYWHERE)
                ours = "".join(piece for _, piece in engine.submit(request))
                spec = steering_spec(edits, 1.0, sae, engine.feature_scale, "model.layers.15")
                with ie.steer(model, spec):
                    steps = [
                        s.token_id
                        for s in ie.generate_stream(
                            model, ids, max_tokens=GREEDY.max_new_tokens, temperature=0.0
                        )
                    ]
                theirs = engine.decode([t for t in steps if t not in set(engine.eos_ids)])
                assert ours == theirs, (text, edits)
                changed += ours != plain
    finally:
        engine.close()
    assert changed >= len(cases)  # the edits steer: parity is not of two unsteered runs
