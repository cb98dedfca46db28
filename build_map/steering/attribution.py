"""Which SAE features made the model predict a token: activation × gradient attribution.

At the hookpoint the residual ``x`` is replaced by ``decode(f) + e`` with ``f = encode(x)`` a leaf
that requires grad and the SAE error ``e = x - decode(f)`` held constant, so the forward pass is
unchanged but ``log p(target)`` becomes a function of the feature activations. One forward and one
backward give ``g = ∂ log p / ∂ f`` at every position; a feature's attribution is ``f · g`` summed
over the positions 0..``position`` (later positions cannot affect the prediction).

What the numbers mean: ``Σ_features f·g`` is the first-order change of log p when every feature is
scaled to zero at once (the error term and ``b_dec`` kept), i.e. ``d/dc log p(c·f)`` at c = 1; one
feature's attribution is the same for that feature alone. A positive score means the feature's
presence raised the target's probability. It is a linear estimate: large ablations can differ.

Steering composes: inside ``SteeringEngine.steered`` (whose hook was registered first, so it runs
first) the features are read from the steered residual, explaining the steered model's choice.

Layers before the hookpoint run without autograd (the graph starts at ``f``), so the cost is one
forward plus a backward through the layers after the hookpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from build_map.lm.capture import hidden_of, with_hidden
from build_map.lm.hookpoints import input_device, resolve_hookpoint
from build_map.lm.hooks import scoped_forward_hook
from build_map.sae.model import SparseAutoencoder
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import DEFAULT_SCOPE, Edit, SteeringScope
from build_map.steering.vectors import hidden_mask


class AttributionError(ValueError):
    """The attribution request is malformed; the message says which value and what is allowed."""


def attribute_token(
    model: nn.Module,
    sae: SparseAutoencoder,
    hookpoint: str,
    input_ids: torch.Tensor | Sequence[int],
    position: int = -1,
    target_token: int | None = None,
    top_k: int = 20,
    hidden: Any = None,
    per_position: bool = False,
) -> pd.DataFrame:
    """Top features by |attribution| to log p(target | tokens 0..position).

    ``position``: the position whose next-token prediction is explained (negative counts from the
    end). ``target_token``: default the next token in ``input_ids`` when there is one, else the
    model's most likely token. To explain the token at index t of a text, pass ``position=t-1``.
    ``hidden``: bool mask (d_sae,) or ids of features to leave out of the list (they still count in
    ``attrs["total_attribution"]``).

    Returns one row per feature: ``feature``, ``activation`` and ``gradient`` at ``position``,
    ``attribution`` (f·g summed over positions 0..position) and ``attribution_here`` (at
    ``position`` only). ``attrs`` holds target_token, position, logprob, total_attribution and, with
    ``per_position``, a long frame (position, feature, activation, gradient, attribution) of the
    listed features' nonzero entries.
    """
    ids = _as_ids(input_ids)
    position = _check_position(position, ids.shape[1])
    if target_token is None:
        target_token = default_target(ids, position)
    ids = ids[:, : position + 1]  # later tokens cannot change this prediction
    features, grads, logprob, target = _features_and_gradients(
        model, sae, hookpoint, ids, position, target_token
    )
    scores = features * grads  # (seq, d_sae)
    total = scores.sum(0)
    candidates = total.clone()
    if hidden is not None:
        mask = hidden_mask(np.asarray(hidden), sae.d_sae)
        candidates[mask.to(candidates.device)] = 0.0
    order = candidates.abs().argsort(descending=True)[:top_k]
    order = order[candidates[order] != 0]  # only features that contributed
    frame = pd.DataFrame(
        {
            "feature": order.cpu().numpy().astype(np.int64),
            "activation": features[position, order].cpu().numpy(),
            "gradient": grads[position, order].cpu().numpy(),
            "attribution": total[order].cpu().numpy(),
            "attribution_here": scores[position, order].cpu().numpy(),
        }
    )
    frame.attrs.update(
        target_token=target, position=position, logprob=logprob, total_attribution=float(total.sum())
    )
    if per_position:
        frame.attrs["per_position"] = _per_position(features, grads, scores, order)
    return frame


def _features_and_gradients(
    model: nn.Module,
    sae: SparseAutoencoder,
    hookpoint: str,
    ids: torch.Tensor,
    position: int,
    target_token: int | None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(seq, d_sae) activations and gradients of log p(target at position), the log p and target."""
    leaf: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        # The forward runs under no_grad; autograd starts here, so the layers before the hookpoint
        # keep no graph. no_grad's exit restores the previous mode whatever we set in between.
        torch.set_grad_enabled(True)
        hidden = hidden_of(output)
        x = hidden[0].to(sae.W_enc.device, sae.W_enc.dtype)  # (seq, d_in)
        f = sae.encode(x).detach().requires_grad_(True)
        error = (x - sae.decode(f)).detach()
        leaf.append(f)
        return with_hidden(output, (sae.decode(f) + error).to(hidden.device, hidden.dtype).unsqueeze(0))

    with scoped_forward_hook(resolve_hookpoint(model, hookpoint), hook), torch.no_grad():
        logits = model(input_ids=ids.to(input_device(model)), use_cache=False, **_last_logits(model)).logits
        logprobs = _at_least_fp32(logits[0, -1]).log_softmax(-1)  # ids end at ``position``
        target = int(logprobs.argmax()) if target_token is None else int(target_token)
        if not 0 <= target < logprobs.shape[0]:
            raise AttributionError(
                f"target_token {target} is outside the vocabulary (0 to {logprobs.shape[0] - 1})."
            )
        (grads,) = torch.autograd.grad(logprobs[target], leaf[0])
    return leaf[0].detach(), grads.detach(), float(logprobs[target].detach()), target


def default_target(input_ids: torch.Tensor, position: int) -> int | None:
    """The next token of the text when there is one (None: the model's argmax is used)."""
    ids = _as_ids(input_ids)
    position = _check_position(position, ids.shape[1])
    return int(ids[0, position + 1]) if position + 1 < ids.shape[1] else None


def _per_position(
    features: torch.Tensor, grads: torch.Tensor, scores: torch.Tensor, order: torch.Tensor
) -> pd.DataFrame:
    sub = features[:, order]
    positions, columns = (sub != 0).nonzero(as_tuple=True)
    picked = order[columns]
    return pd.DataFrame(
        {
            "position": positions.cpu().numpy(),
            "feature": picked.cpu().numpy(),
            "activation": features[positions, picked].cpu().numpy(),
            "gradient": grads[positions, picked].cpu().numpy(),
            "attribution": scores[positions, picked].cpu().numpy(),
        }
    )


def _as_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise AttributionError(
            f"input_ids must be one non-empty sequence, (seq,) or (1, seq); got shape {tuple(ids.shape)}."
        )
    return ids


def _check_position(position: int, length: int) -> int:
    if not -length <= position < length:
        raise AttributionError(f"position {position} is outside the sequence of {length} tokens.")
    return position % length


def _last_logits(model: nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only where the model supports it (the unembedding of
    every position is ~20% of a small model's forward)."""
    return {"logits_to_keep": 1} if getattr(model, "_supports_logits_to_keep", lambda: False)() else {}


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@dataclass
class ReplyTokens:
    """A conversation with its reply as token ids, ready to explain one reply token."""

    ids: list[int]
    """Prompt (chat-templated messages) then reply."""
    start: int
    """Index of the reply's first token in ``ids``."""
    pieces: list[str]
    """Each reply token as text."""


def reply_tokens(engine: SteeringEngine, messages: Sequence[dict], reply: str) -> ReplyTokens:
    prompt = engine.prompt_ids(list(messages))
    tokens = engine.encode(reply)
    return ReplyTokens(prompt + tokens, len(prompt), [engine.decode([t]) for t in tokens])


def attribute_with_engine(
    engine: SteeringEngine,
    input_ids: torch.Tensor | Sequence[int],
    position: int = -1,
    edits: Sequence[Edit] = (),
    multiplier: float = 1.0,
    prompt_length: int | None = None,
    scope: SteeringScope = DEFAULT_SCOPE,
    **kwargs: Any,
) -> pd.DataFrame:
    """``attribute_token`` on the engine's model and SAE; with ``edits`` the steered model is
    explained (the engine's steering hook runs before the attribution's), steered on the positions
    ``scope`` names when ``prompt_length`` says where the prompt ends (else everywhere)."""
    ids = torch.as_tensor(list(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids).reshape(
        1, -1
    )
    prompts = (
        None if prompt_length is None else (ids[:, :prompt_length], torch.ones_like(ids[:, :prompt_length]))
    )
    with engine.steered([tuple(edits)], multiplier, scope, prompts):
        return attribute_token(engine.model, engine.sae, engine.hookpoint, input_ids, position, **kwargs)
