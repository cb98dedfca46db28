"""The orthogonal and cap modes do the arithmetic interp-engine's OrthogonalDecompSpec and
ProjectionCapSpec do, row by row in a batch, and compose with nudges and pins."""

from __future__ import annotations

import pytest
import torch

from build_map.steering.requests import Edit
from build_map.steering.vectors import BatchSteering, row_steering
from tests.build_map.steering.test_engine import D_MODEL as D
from tests.build_map.steering.test_engine import _tiny_sae


@pytest.fixture(scope="module")
def sae():
    return _tiny_sae()


def _apply(sae, rows_edits, hidden, multiplier=1.0, scales=None):
    scales = scales if scales is not None else torch.full((sae.d_sae,), 2.0)
    rows = [row_steering(sae, scales, edits, multiplier) for edits in rows_edits]
    steering = BatchSteering.build(rows, hidden.device, hidden.dtype)
    return hidden if steering is None else steering.apply(hidden)


def _unit(sae, feature):
    d = sae.W_dec[feature].float()
    return d / d.norm()


def test_orthogonal_rescales_only_the_component_along_the_feature(sae):
    hidden = torch.randn(1, 5, D)
    d = _unit(sae, 3)
    for coeff in (0.0, 0.5, 2.0, -1.0):
        out = _apply(sae, [[Edit(3, coeff, "orthogonal")]], hidden)
        expected = hidden + (coeff - 1) * (hidden @ d)[..., None] * d  # (I - P)h + c P h
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(out @ d, coeff * (hidden @ d))  # along d: scaled by c
        rest = out - (out @ d)[..., None] * d
        torch.testing.assert_close(rest, hidden - (hidden @ d)[..., None] * d)  # the rest: untouched
    torch.testing.assert_close(_apply(sae, [[Edit(3, 1.0, "orthogonal")]], hidden), hidden)
    torch.testing.assert_close(_apply(sae, [[Edit(3, 4.0, "orthogonal")]], hidden, multiplier=0.5),
                               _apply(sae, [[Edit(3, 2.0, "orthogonal")]], hidden))  # fmt: skip


def test_cap_clamps_the_projection_at_what_the_feature_writes(sae):
    d = _unit(sae, 5)
    norm = float(sae.W_dec[5].norm())
    hidden = torch.randn(1, 6, D) + torch.linspace(-4, 4, 6)[None, :, None] * d
    strength, scale = 0.5, 2.0
    cap = strength * scale * norm
    out = _apply(sae, [[Edit(5, strength, "cap")]], hidden)
    before, after = hidden @ d, out @ d
    torch.testing.assert_close(after, before.clamp(max=cap))
    below = before <= cap
    torch.testing.assert_close(out[below], hidden[below])  # under the cap nothing moves
    torch.testing.assert_close(out - after[..., None] * d, hidden - before[..., None] * d)


def test_rows_of_one_batch_keep_their_own_operations(sae):
    hidden = torch.randn(3, 4, D)
    rows = [
        [Edit(3, 0.0, "orthogonal"), Edit(5, 0.1, "cap")],
        [],
        [Edit(7, 1.5, "nudge"), Edit(3, 2.0, "orthogonal")],
    ]
    batched = _apply(sae, rows, hidden)
    for r, edits in enumerate(rows):
        torch.testing.assert_close(batched[r : r + 1], _apply(sae, [edits], hidden[r : r + 1]))
    torch.testing.assert_close(batched[1], hidden[1])  # the unsteered row


def test_nudges_come_before_projections_and_pins_win(sae):
    hidden = torch.randn(1, 3, D)
    scales = torch.full((sae.d_sae,), 2.0)
    out = _apply(sae, [[Edit(3, 1.0, "nudge"), Edit(3 + 1, 0.0, "orthogonal")]], hidden, scales=scales)
    nudged = hidden + 2.0 * sae.W_dec[3]
    e = _unit(sae, 4)
    torch.testing.assert_close(out, nudged - (nudged @ e)[..., None] * e)
    pinned = _apply(sae, [[Edit(3, 0.0, "orthogonal"), Edit(3 + 2, 1.0, "pin")]], hidden, scales=scales)
    pre = pinned.float() @ sae.W_enc[:, 5] + sae.b_enc[5]  # the SAE does not subtract b_dec first
    torch.testing.assert_close(pre, torch.full_like(pre, 2.0), atol=1e-4, rtol=1e-4)  # the pin holds
