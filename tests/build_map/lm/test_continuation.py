"""Running the layers after the hookpoint from a cached residual equals running the whole model."""

from __future__ import annotations

import torch

from build_map.lm.continuation import Continuation


def _ids(tokenizer) -> list[int]:
    return tokenizer("hello, how are you today? fine, thanks")["input_ids"]


def test_context_logits_equal_a_plain_forward(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    state = Continuation(tiny_model, "model.layers.0").context(ids[:6], ids[6:10])
    with torch.inference_mode():
        full = tiny_model(input_ids=torch.tensor([ids[:10]])).logits[0, 6:10]
    torch.testing.assert_close(state.logits, full, atol=1e-5, rtol=1e-5)
    assert state.residual.shape == (4, tiny_model.config.hidden_size)


def test_shortcut_equals_the_whole_model_with_the_residual_replaced(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    continuation = Continuation(tiny_model, "model.layers.0")
    state = continuation.context(ids[:6], ids[6:9])
    assert continuation.shortcut  # a Llama: the layers after the hookpoint run alone
    residual = state.residual[None] + torch.randn(
        5, 1, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    calls = []
    handle = tiny_model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = continuation.logits(state, residual)
    finally:
        handle.remove()
    assert calls == []  # the layer below the hookpoint did not run again
    continuation.shortcut = False
    whole = continuation.logits(state, residual)
    assert fast.shape == (5, 3, tiny_model.config.vocab_size)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)
    assert (fast - state.logits).abs().amax() > 1e-2  # the residual mattered
    # the cached prefix is untouched by the batches: a second call gives the same
    torch.testing.assert_close(continuation.logits(state, residual), whole)


def test_models_the_shortcut_cannot_reproduce_run_whole(tiny_model, tiny_tokenizer):
    """A model whose decoder does something to inputs_embeds (here: scales them) fails the check."""
    ids = _ids(tiny_tokenizer)
    continuation = Continuation(tiny_model, "model.layers.0")
    decoder = tiny_model.model
    original = decoder.forward

    def scaled(*args, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds * 2.0
        return original(*args, inputs_embeds=inputs_embeds, **kwargs)

    decoder.forward = scaled
    try:
        state = continuation.context(ids[:6], ids[6:9])
    finally:
        del decoder.forward
    assert not continuation.shortcut
    torch.testing.assert_close(
        continuation.logits(state, state.residual[None]), state.logits[None], atol=1e-5, rtol=1e-5
    )


def test_a_hookpoint_at_the_last_layer_leaves_only_the_norm_and_head(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer)
    continuation = Continuation(tiny_model, "model.layers.1")
    state = continuation.context(ids[:6], ids[6:9])
    assert continuation.shortcut
    torch.testing.assert_close(
        continuation.logits(state, state.residual[None]), state.logits[None], atol=1e-5, rtol=1e-5
    )
