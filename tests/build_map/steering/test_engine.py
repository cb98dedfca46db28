"""The steering engine on a tiny in-process Llama and a tiny SAE: maths against hand-made
references, streaming against generate(), isolation of concurrent requests and batch rows."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from build_map.sae.model import SAEConfig, SparseAutoencoder
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import (
    BatchingConfig,
    Edit,
    GenerationError,
    SamplingConfig,
    SteeringError,
    SteeringRequest,
    SteeringScope,
    StreamTimeout,
)
from build_map.steering.sampling import RowSampler
from build_map.steering.streaming import GenerationStream
from build_map.steering.vectors import BatchSteering, RowSteering, effective_scales, steer_output
from tests.support.tiny import TINY_D_MODEL, make_tiny_model

D_MODEL, D_SAE, HOOKPOINT = TINY_D_MODEL, 96, "model.layers.1"
MESSAGES = [{"role": "user", "content": "hello, how are you today?"}]
GREEDY = SamplingConfig(max_new_tokens=16)
SAMPLED = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=16, seed=7)


def _tiny_sae(d_sae: int = D_SAE, orthonormal: bool = False) -> SparseAutoencoder:
    """Unit decoder rows, encoder = decoder transposed (so each feature reads its own direction)."""
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(d_sae, D_MODEL, generator=gen)
    if orthonormal:
        directions = torch.linalg.qr(directions.T).Q.T
    directions = directions / directions.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(SAEConfig(d_in=D_MODEL, d_sae=d_sae, activation="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.copy_(-0.05 * torch.rand(d_sae, generator=gen))
        sae.b_dec.copy_(0.01 * torch.randn(D_MODEL, generator=gen))
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    """A private tiny Llama: the engines here keep their hook on it for the whole module."""
    return make_tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def sae():
    return _tiny_sae()


@pytest.fixture(scope="module")
def scale():
    return torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) + 0.5


def _engine(model, tokenizer, sae, scale, **kwargs) -> SteeringEngine:
    kwargs.setdefault("hidden", {95})
    return SteeringEngine(model, tokenizer, sae, HOOKPOINT, scale, **kwargs)


@pytest.fixture(scope="module")
def engine(model, tokenizer, sae, scale):
    engine = _engine(model, tokenizer, sae, scale)
    yield engine
    engine.close()


def _ids(engine) -> torch.Tensor:
    return torch.tensor([engine.prompt_ids(MESSAGES)])


def _logits_with_hook(model, ids, hook):
    """The model's logits with ``hook`` on the hookpoint's output: the steering done by hand."""
    handle = model.get_submodule(HOOKPOINT).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def _capture(module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen, handle


# ---------------------------------------------------------------- maths


def test_strength_zero_is_exactly_unsteered_greedy(engine, model, tokenizer):
    ids = _ids(engine)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    edits = [Edit(3, 0.0), Edit(7, 0.0, "nudge")]
    assert engine.generate(MESSAGES, edits, GREEDY) == expected
    assert engine.generate(MESSAGES, [], GREEDY) == expected
    assert engine.generate(MESSAGES, [Edit(3, 8.0)], GREEDY) != expected


def test_presence_penalty_breaks_a_loop_of_greedy_decoding(engine, model, tokenizer):
    """A strong edit makes the tiny model repeat itself; the penalty, applied on the greedy path,
    lowers every token the reply already holds, exactly as interp-engine's processor does."""
    from interp_engine import apply_presence_penalty

    looped = SamplingConfig(temperature=0.0, max_new_tokens=24)
    edits = [Edit(3, 12.0)]
    plain = engine.generate(MESSAGES, edits, looped)
    assert len(set(tokenizer.encode(plain, add_special_tokens=False))) < 12  # a loop to break
    penalized = SamplingConfig(temperature=0.0, max_new_tokens=24, presence_penalty=2.0)
    reply = tokenizer.encode(engine.generate(MESSAGES, edits, penalized), add_special_tokens=False)
    assert len(set(reply)) > len(set(tokenizer.encode(plain, add_special_tokens=False)))
    # the same arithmetic as interp-engine (the vLLM backend's) presence penalty
    scores = torch.randn(2, 50)
    generated = torch.tensor([[5, 5, 7], [1, 2, 3]])
    sampler = RowSampler([penalized, looped], [0, 0], 4, [])
    expected = torch.stack([apply_presence_penalty(scores[0], [5, 5, 7], 2.0), scores[1]])
    out = sampler(torch.cat([torch.zeros(2, 4, dtype=torch.long), generated], 1), scores.clone())
    torch.testing.assert_close(out, expected)


def test_nudge_equals_adding_the_vector_by_hand(engine, model, sae, scale):
    ids = _ids(engine)
    edits, multiplier = [Edit(3, 2.0), Edit(7, -1.5)], 0.5
    with torch.no_grad(), engine.steered([edits], multiplier):
        steered = model(ids).logits
    vector = multiplier * (2.0 * scale[3] * sae.W_dec[3] - 1.5 * scale[7] * sae.W_dec[7])
    manual = _logits_with_hook(model, ids, lambda m, a, out: out + vector)
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(steered, manual)
    assert not torch.allclose(steered, plain)


def test_pin_sets_the_activation_read_at_the_hookpoint(engine, model, sae, scale):
    ids = _ids(engine)
    pins = [Edit(3, 2.0, "pin"), Edit(10, 0.7, "pin"), Edit(20, 0.0, "pin")]
    edits = [*pins, Edit(40, 3.0)]  # a nudge alongside: pins are applied after it and still hold
    seen, handle = _capture(model.get_submodule(HOOKPOINT))
    try:
        with torch.no_grad():
            model(ids)
            with engine.steered([edits]):
                model(ids)
    finally:
        handle.remove()
    before, after = seen
    features = sae.encode(after)[0]  # (seq, d_sae)
    for edit in pins:
        expected = torch.full_like(features[:, edit.feature], edit.strength * float(scale[edit.feature]))
        torch.testing.assert_close(features[:, edit.feature], expected, atol=1e-4, rtol=1e-4)
    # the residual moved only within the span of the edited features' decoder rows
    span = sae.W_dec[[3, 10, 20, 40]]
    change = (after - before)[0]
    coefficients = torch.linalg.lstsq(span.T, change.T).solution
    torch.testing.assert_close(coefficients.T @ span, change, atol=1e-4, rtol=1e-4)


def test_pin_matches_encode_set_decode_when_encoder_matches_decoder(model, tokenizer, scale):
    sae = _tiny_sae(d_sae=32, orthonormal=True)
    with torch.no_grad():
        sae.b_enc.zero_()
    engine = SteeringEngine(model, tokenizer, sae, HOOKPOINT, scale[:32])
    try:
        x = torch.randn(1, 12, D_MODEL, generator=torch.Generator().manual_seed(3))
        edits = [Edit(4, 1.5, "pin"), Edit(9, 0.5, "pin")]
        steering = BatchSteering.build([engine.row_steering(edits)], torch.device("cpu"), torch.float32)
        ours = steering.apply(x)
        features = sae.encode(x)
        pinned = features.clone()
        pinned[..., 4], pinned[..., 9] = 1.5 * scale[4], 0.5 * scale[9]
        goodfire = sae.decode(pinned) + (x - sae(x))  # encode, set, decode, add the error back
        active = (features[..., 4] > 0) & (features[..., 9] > 0)
        assert active.any()
        torch.testing.assert_close(ours[active], goodfire[active], atol=1e-5, rtol=1e-5)
    finally:
        engine.close()


def test_batch_rows_get_their_own_steering(engine, model):
    ids = _ids(engine)
    rows = [[], [Edit(3, 4.0)], [Edit(10, 1.0, "pin"), Edit(5, -2.0)], []]
    with torch.no_grad():
        with engine.steered(rows):
            batched = model(ids.repeat(len(rows), 1)).logits
        for r, edits in enumerate(rows):
            with engine.steered([edits]):
                alone = model(ids).logits
            torch.testing.assert_close(batched[r : r + 1], alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched[0], batched[3]) and not torch.allclose(batched[0], batched[1])


def test_steer_output_handles_tensors_and_tuples(engine):
    steering = BatchSteering.build(
        [engine.row_steering([Edit(3, 1.0)]), RowSteering(), engine.row_steering([Edit(5, 1.0)])],
        torch.device("cpu"),
        torch.float32,
    )
    hidden = torch.zeros(3, 4, D_MODEL)
    from_tensor = steer_output(hidden, steering)
    from_tuple, extra = steer_output((hidden, "cache"), steering)
    torch.testing.assert_close(from_tensor, from_tuple)
    assert extra == "cache"
    assert from_tensor[0].abs().sum() > 0 and from_tensor[2].abs().sum() > 0
    assert from_tensor[1].abs().sum() == 0  # row 1 untouched; a naive output[0] would edit row 0 only
    assert not torch.allclose(from_tensor[0], from_tensor[2])


def test_scale_fallback_is_the_median_of_valid_scales():
    scales, fallback = effective_scales([2.0, 0.0, float("nan"), 4.0, 6.0, -1.0], 6)
    assert fallback == 4.0
    assert scales.tolist() == [2.0, 4.0, 4.0, 4.0, 6.0, 4.0]
    assert effective_scales([0.0, 0.0], 2)[1] == 1.0


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_streamed_text_equals_generate(engine, sampling):
    edits = [Edit(3, 2.0), Edit(10, 1.0, "pin")]
    stream = engine.stream(MESSAGES, edits, sampling)
    pieces = list(stream)
    assert len(pieces) > 1 and all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == engine.generate(MESSAGES, edits, sampling)
    assert stream.status == "finished" and stream.result() == ["".join(pieces)]


def test_pair_rows_share_the_sampling_noise(engine):
    same = engine.stream_pair(MESSAGES, [Edit(3, 0.0)], SAMPLED).result()
    assert same[0] == same[1]  # a no-op edit: identical noise gives identical text
    pair = engine.stream_pair(MESSAGES, [Edit(3, 6.0)], SAMPLED)
    events = list(pair)
    assert {row for row, _ in events} == {0, 1}
    assert pair.texts[0] == engine.generate(MESSAGES, [], SAMPLED)
    assert pair.texts[1] == engine.generate(MESSAGES, [Edit(3, 6.0)], SAMPLED)
    assert pair.texts[0] != pair.texts[1]
    single = engine.stream_pair(MESSAGES, [], SAMPLED)
    assert single.rows == 1 and {row for row, _ in single} == {0}


def test_concurrent_requests_match_running_alone(model, tokenizer, sae, scale):
    engine = _engine(model, tokenizer, sae, scale, batching=BatchingConfig(window_s=0.5))
    requests = [
        SteeringRequest(MESSAGES, (), GREEDY),
        SteeringRequest([{"role": "user", "content": "the lazy dog"}], (Edit(3, 5.0),), SAMPLED),
        SteeringRequest(MESSAGES, (Edit(10, 1.5, "pin"), Edit(7, -3.0)), SAMPLED, multiplier=0.8, pair=True),
    ]
    try:
        alone = [engine.submit(request).result() for request in requests]
        batches = engine.stats["batches"]
        results: list = [None] * len(requests)

        def run(i: int) -> None:
            results[i] = engine.submit(requests[i]).result()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert engine.stats["batches"] == batches + 1  # all three shared one generate call
        assert results == alone
        assert len({text for texts in alone for text in texts}) == 4
    finally:
        engine.close()


def test_worker_error_reaches_the_consumer(engine, model):
    calls = []

    def explode(module, args, output):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom in the worker")

    handle = model.model.norm.register_forward_hook(explode)
    try:
        stream = engine.stream(MESSAGES, [Edit(3, 1.0)], GREEDY)
        with pytest.raises(RuntimeError, match="boom in the worker"):
            list(stream)
        assert stream.status == "error"
        with pytest.raises(RuntimeError, match="boom in the worker"):
            stream.result()  # reading it again raises again, never an empty success
    finally:
        handle.remove()
    assert engine.generate(MESSAGES, [], GREEDY)  # the server keeps serving


def test_cancel_stops_generation_early(engine):
    sampling = SamplingConfig(max_new_tokens=200, min_new_tokens=200, temperature=1.0, seed=1)
    stream = engine.stream(MESSAGES, [Edit(3, 1.0)], sampling)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        stream.cancel()
    assert stream.status == "cancelled" and stream.finish_reasons == ["cancelled"]
    full = engine.generate(MESSAGES, [Edit(3, 1.0)], sampling)
    assert len("".join(pieces)) < len(full) / 4


def test_cancel_before_start(model, tokenizer, sae, scale):
    engine = _engine(model, tokenizer, sae, scale, batching=BatchingConfig(window_s=0.3))
    try:
        stream = engine.stream(MESSAGES, [], GREEDY)
        stream.cancel()
        assert list(stream) == [] and stream.status == "cancelled"
    finally:
        engine.close()


def test_a_quiet_queue_is_not_the_end(model, tokenizer, sae, scale, engine):
    slow = SteeringEngine(model, tokenizer, sae, HOOKPOINT, scale, batching=BatchingConfig(poll_s=0.02))
    sampling = SamplingConfig(max_new_tokens=4, min_new_tokens=4)
    handle = model.model.norm.register_forward_hook(lambda *args: time.sleep(0.15))
    try:
        assert slow.generate(MESSAGES, [Edit(3, 1.0)], sampling) == engine.generate(
            MESSAGES, [Edit(3, 1.0)], sampling
        )
        stream = slow.stream(MESSAGES, [], sampling)
        with pytest.raises(StreamTimeout, match="still"):
            list(stream.events(timeout=0.01))
        stream.cancel()
        stream.result()
    finally:
        handle.remove()
        slow.close()


def test_a_dead_worker_is_an_error(engine):
    handle = GenerationStream(engine, SteeringRequest([1, 2]), seed=0, rows=1)
    handle._worker = threading.Thread(target=lambda: None)
    handle._worker.start()
    handle._worker.join()
    with pytest.raises(GenerationError, match="stopped without finishing"):
        handle.result()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("edits", "extra", "message"),
    [
        ([Edit(96, 1.0)], {}, "feature 96 does not exist: valid feature ids are 0 to 95"),
        ([Edit(-1, 1.0)], {}, "valid feature ids are 0 to 95"),
        ([Edit(95, 1.0)], {}, "feature 95 is hidden"),
        ([Edit(3, float("nan"))], {}, "not a finite number"),
        ([Edit(3, float("inf"))], {}, "not a finite number"),
        ([Edit(3, 21.0)], {}, r"beyond ±20"),
        ([Edit(3, 15.0)], {"multiplier": 2.0}, r"beyond ±20"),
        ([Edit(3, 1.0)], {"multiplier": float("nan")}, "multiplier nan"),
        ([Edit(i, 1.0) for i in range(33)], {}, "at most 32"),
        ([Edit(3, 1.0, "boost")], {}, "unknown mode 'boost'.*nudge, pin"),
        ([Edit(3, 1.0), Edit(3, 2.0, "pin")], {}, "appears twice"),
        ([Edit(3, -1.0, "pin")], {}, "negative activation"),
        ([], {"prompt": list(range(1, 200))}, "199 tokens but the context budget is 128 tokens"),
        ([], {"prompt": []}, "prompt is empty"),
        ([], {"sampling": SamplingConfig(temperature=-1)}, "temperature"),
        ([], {"sampling": SamplingConfig(top_p=0)}, "top_p"),
        ([], {"sampling": SamplingConfig(max_new_tokens=0)}, "max_new_tokens"),
        (
            [],
            {"sampling": SamplingConfig(presence_penalty=-0.5)},
            "presence_penalty -0.5 must be between 0 and 2",
        ),
        ([], {"sampling": SamplingConfig(presence_penalty=float("nan"))}, "presence_penalty nan"),
        ([], {"sampling": SamplingConfig(max_new_tokens=4, min_new_tokens=5)}, "min_new_tokens"),
    ],
)
def test_refusals_have_clear_messages(engine, edits, extra, message):
    prompt = extra.pop("prompt", [1, 2, 3])
    sampling = extra.pop("sampling", SamplingConfig(max_new_tokens=128))
    with pytest.raises(SteeringError, match=message):
        engine.validate(edits, prompt, sampling, **extra)
    with pytest.raises(SteeringError, match=message):
        engine.submit(SteeringRequest(prompt, tuple(edits), sampling, **extra))


def test_hidden_features_as_mask(model, tokenizer, sae, scale):
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[7] = True
    engine = _engine(model, tokenizer, sae, scale, hidden=mask)
    try:
        with pytest.raises(SteeringError, match="feature 7 is hidden"):
            engine.validate([Edit(7, 1.0)], [1, 2])
        engine.validate([Edit(95, 1.0)], [1, 2])
    finally:
        engine.close()


def test_close_finishes_running_requests_then_refuses(model, tokenizer, sae, scale, engine):
    closing = _engine(model, tokenizer, sae, scale)
    edits = [Edit(3, 6.0)]
    stream = closing.stream(MESSAGES, edits, GREEDY)
    closing.close()  # waits for the batch: the hook stays until the reply is done
    assert stream.result() == [engine.generate(MESSAGES, edits, GREEDY)]
    with pytest.raises(SteeringError, match="closed"):
        closing.stream(MESSAGES, edits, GREEDY)


# ---------------------------------------------------------------- scope


@pytest.mark.parametrize(
    ("scope", "steered_prompt"),
    [
        (SteeringScope(), "last"),  # the default: only the position that writes the first reply token
        (SteeringScope(prompt=True), "plain"),  # the prompt too, but not the template's special tokens
        (SteeringScope(prompt=True, special_tokens=True), "all"),
    ],
)
def test_scope_decides_which_prompt_positions_are_steered(engine, model, scope, steered_prompt):
    ids = _ids(engine)
    special = torch.isin(ids[0], torch.tensor(engine.special_ids))
    assert special.any() and not special[-1]  # the chat template put <|im_start|> etc. in the prompt
    seen, handle = _capture(model.model.layers[1])
    try:
        with torch.inference_mode():
            model(input_ids=ids)
            with engine.steered([[Edit(3, 2.0)]], scope=scope, prompts=(ids, torch.ones_like(ids))):
                model(input_ids=ids)
    finally:
        handle.remove()
    changed = (seen[1] - seen[0]).abs().amax(-1)[0] > 1e-6
    expected = {
        "last": torch.arange(ids.shape[1]) == ids.shape[1] - 1,
        "plain": ~special,
        "all": torch.ones_like(special),
    }[steered_prompt]
    assert changed.tolist() == expected.tolist()


def test_decoding_steps_are_steered_whatever_the_scope(engine, tokenizer):
    """Reply-only steering still changes the reply: the reply's positions are always steered."""
    plain = engine.generate(MESSAGES, [], GREEDY)
    assert engine.generate(MESSAGES, [Edit(3, 8.0)], GREEDY, scope=SteeringScope()) != plain


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (123, "a string or token ids; got int"),
        (None, "got NoneType"),
        ("\ud800 hello", r"lone surrogate \(U\+D800\)"),
        ("", "the prompt is empty; type a message"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'; use one of system, user, assistant"),
        ([{"role": "user", "content": 5}], "content is int; give text"),
        ([{"role": "user"}], "message 1 is"),
        ([], "the prompt is empty"),
        ([10**6], r"token id 1000000 is outside the vocabulary"),
    ],
)
def test_bad_prompts_are_one_clear_error(engine, prompt, message):
    with pytest.raises(SteeringError, match=message):
        engine.prompt_ids(prompt)


@pytest.mark.parametrize(("mode", "strength"), [("orthogonal", 3.0), ("cap", -0.5)])
def test_projection_modes_equal_their_formula_applied_by_hand(engine, model, sae, scale, mode, strength):
    ids = _ids(engine)
    with torch.no_grad(), engine.steered([[Edit(3, strength, mode)]], 1.0):
        steered = model(ids).logits
    unit = sae.W_dec[3] / sae.W_dec[3].norm()

    def by_hand(module, args, out):
        along = out @ unit
        if mode == "orthogonal":
            return out + (strength - 1) * along[..., None] * unit
        cap = strength * scale[3] * sae.W_dec[3].norm()
        return out + (along.clamp(max=cap) - along)[..., None] * unit

    manual = _logits_with_hook(model, ids, by_hand)
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(steered, manual)
    assert not torch.allclose(steered, plain)
