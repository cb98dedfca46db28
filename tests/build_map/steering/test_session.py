"""The Python session API on the tiny bundle: attribution leaves hidden features out."""

from __future__ import annotations

from build_map.steering.requests import Edit
from tests.support.tiny_bundle import HIDDEN_FEATURE, N_FEATURES

PROMPT = [{"role": "user", "content": "hello, how are you today?"}]


def test_session_attribution_leaves_hidden_features_out(tiny_session):
    frame = tiny_session.attribute(PROMPT, top_k=N_FEATURES)
    assert len(frame) > 0 and HIDDEN_FEATURE not in set(frame.feature)
    steered = tiny_session.attribute(PROMPT, edits=[Edit(3, 2.0)], top_k=N_FEATURES)
    assert 3 in set(steered.feature)
