"""Features most active on a reply: the same ranking as encoding the hookpoint by hand."""

from __future__ import annotations

import torch

from tests.support.tiny_bundle import DEAD_FEATURE, HIDDEN_FEATURE


def test_reply_features_match_a_manual_encode(explorer_shared):
    engine, reader = explorer_shared.engine, explorer_shared.reply_features
    messages = [{"role": "user", "content": "hello, how are you today?"}]
    reply = "fine, thanks. and you?"
    prompt_ids = engine.prompt_ids(messages)
    reply_ids = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
    seen = []
    handle = engine.model.get_submodule(engine.hookpoint).register_forward_hook(
        lambda module, args, out: seen.append(out)
    )
    try:
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([prompt_ids + reply_ids]))
    finally:
        handle.remove()
    acts = engine.sae.encode(seen[0][0, len(prompt_ids) :]) / engine.feature_scale
    scores = acts.sum(0)
    scores[[HIDDEN_FEATURE, DEAD_FEATURE]] = 0
    expected = [int(i) for i in scores.topk(5).indices if scores[i] > 0]
    assert [f for f, _ in reader.top(messages, reply, n=5)] == expected
