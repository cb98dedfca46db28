"""``backend="eager"``: interp-engine generates behind the engine's own API (validation, pairs,
scopes, streaming, cancellation, errors), the path a vLLM backend takes (issue 14, item 1)."""

from __future__ import annotations

import pytest

from build_map.steering.requests import Edit, GenerationError, SamplingConfig, SteeringError, SteeringScope
from build_map.steering.session import open_bundle

pytest.importorskip("interp_engine", reason="interp-engine needs Python >= 3.11")

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
SCOPES = [
    SteeringScope(),
    SteeringScope(prompt=True, special_tokens=False),
    SteeringScope(prompt=True, special_tokens=True),
]


@pytest.fixture(scope="module")
def sessions(tiny_bundle_dir):
    hf = open_bundle(tiny_bundle_dir, device="cpu", dtype="float32")
    eager = open_bundle(tiny_bundle_dir, device="cpu", dtype="float32", backend="eager")
    yield hf, eager
    hf.close()
    eager.close()


@pytest.mark.parametrize("scope", SCOPES, ids=["reply", "prompt-no-special", "everything"])
@pytest.mark.parametrize(
    "edits", [[Edit(3, 1.5)], [Edit(4, 0.0, "orthogonal")], [Edit(6, -0.3, "cap"), Edit(8, 1.0)]]
)
def test_the_eager_backend_writes_what_the_hf_engine_writes(sessions, edits, scope):
    hf, eager = sessions
    for text in ("hello there", "the quick brown fox"):
        assert eager.engine.generate(text, edits, GREEDY, scope=scope) == hf.engine.generate(
            text, edits, GREEDY, scope=scope
        )


def test_pairs_stream_both_rows_and_pins_are_refused_up_front(sessions):
    hf, eager = sessions
    edits = [Edit(3, 1.5)]
    assert (
        eager.engine.stream_pair("hello", edits, GREEDY).result()
        == hf.engine.stream_pair("hello", edits, GREEDY).result()
    )
    pieces = list(eager.engine.stream_pair("hello", edits, GREEDY))
    assert {row for row, _ in pieces} == {0, 1}
    with pytest.raises(SteeringError, match="use --backend hf for pins"):
        eager.engine.generate("hello", [Edit(3, 1.0, "pin")], GREEDY)
    assert hf.engine.generate("hello", [Edit(3, 1.0, "pin")], GREEDY) is not None  # hf serves pins


def test_cancel_stops_a_reply_and_a_failure_reaches_the_consumer(sessions, monkeypatch):
    _, eager = sessions
    long = SamplingConfig(temperature=0.0, max_new_tokens=200)
    stream = eager.engine.stream("hello", [Edit(3, 1.5)], long)
    for _ in stream:
        stream.cancel()
        break
    list(stream)
    assert stream.status == "cancelled" and len(stream.texts[0]) < 200

    def broken(*args, **kwargs):
        raise RuntimeError("the backend fell over")

    monkeypatch.setattr(eager.engine.generator, "_row", broken)
    with pytest.raises((GenerationError, RuntimeError), match="fell over"):
        eager.engine.generate("hello", [Edit(3, 1.5)], GREEDY)


def test_unknown_backends_are_refused(tiny_bundle_dir):
    with pytest.raises(SteeringError, match="choose one of hf, eager, vllm"):
        open_bundle(tiny_bundle_dir, device="cpu", backend="tpu")


def test_a_sweep_on_the_eager_backend_matches_the_hf_sweep(sessions):
    hf, eager = sessions
    kwargs = {"max_new_tokens": 8, "seed": 0}
    ours = hf.sweep([3], ["hello there"], [0.0, 1.5], **kwargs)
    theirs = eager.sweep([3], ["hello there"], [0.0, 1.5], **kwargs)
    assert list(theirs["reply"]) == list(ours["reply"])
    assert theirs["effect"].tolist() == ours["effect"].tolist()
    assert eager.engine.stats["batches"] > 0
