"""The features a reply or a typed text carries: activation relative to each feature's usual level,
the same ranking as encoding the hookpoint by hand."""

from __future__ import annotations

import torch

from build_map.steering.text_features import MAX_QUERY_TOKENS, TextFeatures, usual_levels
from tests.support.tiny_bundle import DEAD_FEATURE, HIDDEN_FEATURE


def _hookpoint_acts(engine, ids: list[int]) -> torch.Tensor:
    """SAE activations of every position of ``ids``, from a plain hooked forward (no cut)."""
    seen = []
    handle = engine.model.get_submodule(engine.hookpoint).register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            engine.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return engine.sae.encode(seen[0][0]).double()


def _expected(levels: torch.Tensor, acts: torch.Tensor, n: int) -> list[int]:
    score = torch.where(levels > 0, acts.mean(0) / levels.clamp_min(1e-30), torch.zeros(()))
    return [int(i) for i in score.topk(n).indices if score[i] > 0]


def test_reply_features_match_a_manual_encode(explorer_shared):
    engine, reader = explorer_shared.engine, explorer_shared.text_features
    messages = [{"role": "user", "content": "hello, how are you today?"}]
    reply = "fine, thanks. and you?"
    prompt_ids = engine.prompt_ids(messages)
    reply_ids = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
    acts = _hookpoint_acts(engine, prompt_ids + reply_ids)[len(prompt_ids) :]
    listed = reader.on_reply(messages, reply, n=5)
    assert [f for f, _ in listed] == _expected(reader.levels, acts, 5)
    assert not {HIDDEN_FEATURE, DEAD_FEATURE} & {f for f, _ in listed}


def test_typed_text_is_read_as_a_user_message_and_only_its_own_tokens_count(explorer_shared):
    engine, reader = explorer_shared.engine, explorer_shared.text_features
    text = "the river runs under the old bridge"
    ids = engine.prompt_ids([{"role": "user", "content": text}])
    content = engine.encode(text)
    start = max(i for i in range(len(ids) - len(content) + 1) if ids[i : i + len(content)] == content)
    acts = _hookpoint_acts(engine, ids)[start : start + len(content)]
    listed, left_out = reader.on_text(text, n=6)
    assert left_out == 0 and listed
    assert [f for f, _ in listed] == _expected(reader.levels, acts, 6)
    assert reader.on_text("", n=6) == ([], 0)


def test_specificity_is_relative_to_the_usual_level(explorer_shared):
    """The same text, with one feature made 1000× rarer in the statistics: it leads the list, and
    a feature made 1000× more common drops out; plain activation would not move either."""
    engine, shared_reader = explorer_shared.engine, explorer_shared.text_features
    reader = TextFeatures(engine, explorer_shared.bundle)
    text = "the cat and the dog play music by the ocean"
    before = reader.on_text(text, n=48)[0]
    assert len(before) >= 3
    leader, rare = before[0][0], before[-1][0]
    reader.levels = shared_reader.levels.clone()
    reader.levels[rare] /= 1000
    reader.levels[leader] *= 1000
    after = [f for f, _ in reader.on_text(text, n=3)[0]]
    assert after[0] == rare and leader not in after


def test_long_text_is_cut_and_says_how_much(explorer_shared):
    reader = explorer_shared.text_features
    listed, left_out = reader.on_text("apple pie " * 400, n=5)
    assert listed and left_out == len(explorer_shared.engine.encode("apple pie " * 400)) - MAX_QUERY_TOKENS


def test_usual_levels_exclude_hidden_dead_and_unmeasured(explorer_shared):
    bundle = explorer_shared.bundle
    levels = usual_levels(bundle)
    assert levels[HIDDEN_FEATURE] == 0 and levels[DEAD_FEATURE] == 0
    live = ~(bundle.features["hidden"] | bundle.features["dead"]).to_numpy(bool)
    expected = bundle.features["density"].to_numpy(float) * bundle.features["mean_act"].to_numpy(float)
    assert torch.allclose(levels[torch.as_tensor(live)], torch.as_tensor(expected[live]))
