"""Edits as interp-engine steering specs: the one translation a backend built on interp-engine
(its eager backend on CPU, its vLLM backend on CUDA) steers with, so both run the arithmetic of
``steering.vectors`` (docs/ARCHITECTURE.md, "Steering modes").

``nudge`` → ``AddSpec(W_dec[i], v_i)``; ``orthogonal`` → ``OrthogonalDecompSpec(W_dec[i], c)``;
``cap`` → ``ProjectionCapSpec(W_dec[i], max=v_i ‖W_dec[i]‖)``; written at ``resid_post.L``, the
output of ``model.layers[L]``, which is the hookpoint. interp-engine applies a layer's ops one
after another, so the adds come first and the projections follow in edit order, as here.
``pin`` needs the SAE's encoder inside the forward pass, which no interp-engine spec expresses:
it is refused with the backend that can serve it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from build_map.lm.hookpoints import HookpointError
from build_map.sae.model import SparseAutoencoder
from build_map.steering.requests import Edit, SteeringError


def resid_post_layer(hookpoint: str) -> int:
    """``model.layers.19`` → 19: interp-engine's ``resid_post.19`` is that block's output."""
    head, _, index = hookpoint.rpartition(".")
    if not head.endswith("layers") or not index.isdigit():
        raise HookpointError(
            f"hookpoint {hookpoint!r} is not a decoder block's output (model.layers.N); interp-engine "
            "steers at resid_post.N only."
        )
    return int(index)


def steering_spec(
    edits: Sequence[Edit], multiplier: float, sae: SparseAutoencoder, scales: torch.Tensor, hookpoint: str
):
    """The interp-engine ``SteeringSpec`` of a request's (validated) edits; None for no steering."""
    import interp_engine as ie

    pins = [e.feature for e in edits if e.mode == "pin"]
    if pins:
        raise SteeringError(
            f"pin (features {pins}) needs the SAE encoder inside the forward pass, which interp-engine's "
            "specs cannot express; use the hf backend for pins, or nudge instead."
        )
    decoder = sae.W_dec.detach().float().cpu()
    adds, projections = [], []
    for edit in edits:
        direction = decoder[edit.feature]
        amount = float(edit.strength * multiplier * scales[edit.feature])
        if edit.mode == "nudge" and amount != 0:
            adds.append(ie.AddSpec(vector=direction, scale=amount))
        elif edit.mode == "orthogonal" and edit.strength * multiplier != 1:
            projections.append(
                ie.OrthogonalDecompSpec(vector=direction, coeff=float(edit.strength * multiplier))
            )
        elif edit.mode == "cap":
            projections.append(ie.ProjectionCapSpec(vector=direction, max=amount * float(direction.norm())))
    ops = adds + projections
    return ie.SteeringSpec.at(f"resid_post.{resid_post_layer(hookpoint)}", *ops) if ops else None
