"""The cut forward equals the full forward and skips later layers, whatever the block returns."""

from __future__ import annotations

import torch

from build_map.lm.capture import cut_forward

HOOKPOINT = "model.layers.0"  # of 2 layers: layer 1 must never run


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_cut_forward_matches_full_forward_and_skips_later_layers(tiny_model):
    input_ids = torch.randint(
        3, tiny_model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        full = tiny_model(input_ids=input_ids, output_hidden_states=True).hidden_states[1]
    hooks_before = len(tiny_model.model.layers[0]._forward_hooks)
    calls, handle = _count_calls(tiny_model.model.layers[1])
    head_calls, head_handle = _count_calls(tiny_model.lm_head)
    try:
        cut = cut_forward(tiny_model, HOOKPOINT, input_ids)
    finally:
        handle.remove()
        head_handle.remove()
    assert cut.shape == (3, 11, tiny_model.config.hidden_size)
    torch.testing.assert_close(cut, full)
    assert calls == [] and head_calls == []
    # Only the scoped-hook dispatcher may remain (installed once per module), and it is idle.
    hooks = list(tiny_model.model.layers[0]._forward_hooks.values())
    assert len(hooks) in (hooks_before, hooks_before + 1)
    assert all(getattr(h, "current", None) is None or h.current.get() is None for h in hooks)


def test_cut_forward_handles_tuple_outputs(tiny_model):
    """Older transformers return (hidden, ...) from a decoder layer."""
    layer = tiny_model.model.layers[0]
    handle = layer.register_forward_hook(lambda _m, _i, out: (out, "extra"))
    try:
        input_ids = torch.arange(3, 10).unsqueeze(0)
        cut = cut_forward(tiny_model, "0", input_ids)
    finally:
        handle.remove()
    assert cut.shape == (1, 7, tiny_model.config.hidden_size)
