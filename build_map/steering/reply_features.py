"""The SAE features most active on a reply, read without steering: what the model sees in the text,
so a steered feature shows up only if the text itself carries it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from build_map.bundle.read import Bundle
from build_map.lm.capture import cut_forward
from build_map.lm.hookpoints import resolve_hookpoint
from build_map.lm.hooks import install_dispatch
from build_map.steering.engine import SteeringEngine

N_REPLY_FEATURES = 8
"""Features listed per reply."""
_SCORE_CHUNK = 256  # reply tokens encoded at once (d_sae can be 65,536 wide)


class ReplyFeatures:
    """Ranks SAE features on a reply from the hookpoint activations of its conversation.

    The forward pass stops at the hookpoint (the layers above it are not needed) and is observed
    through a scoped hook (``build_map.lm.hooks``): only this thread's pass, no hook added while
    other threads generate. Score of a feature = sum over reply tokens of activation / max
    activation, i.e. "how many strongest firings' worth" (comparable across features, the unit of
    steering strengths). Hidden and dead features are never listed.
    """

    def __init__(self, engine: SteeringEngine, bundle: Bundle):
        self.engine = engine
        self.excluded = torch.as_tensor(
            bundle.features["hidden"].to_numpy(bool) | bundle.features["dead"].to_numpy(bool)
        )
        install_dispatch(resolve_hookpoint(engine.model, engine.hookpoint))  # now, not while others generate

    def top(self, messages: Sequence[dict], reply: str, n: int = N_REPLY_FEATURES) -> list[tuple[int, float]]:
        """[(feature, score)] of the ``n`` highest-scoring visible features on ``reply``."""
        prompt_ids = self.engine.prompt_ids(list(messages))
        reply_ids = self.engine.encode(reply)
        if not reply_ids:
            return []
        hidden = cut_forward(self.engine.model, self.engine.hookpoint, torch.tensor([prompt_ids + reply_ids]))
        return self._rank(hidden[0, len(prompt_ids) :], n)  # (reply tokens, d_model)

    def _rank(self, hidden: torch.Tensor, n: int) -> list[tuple[int, float]]:
        sae = self.engine.sae
        scale = self.engine.feature_scale.to(sae.W_dec.device)
        total = torch.zeros(sae.d_sae, device=sae.W_dec.device)
        with torch.inference_mode():
            for start in range(0, hidden.shape[0], _SCORE_CHUNK):
                chunk = hidden[start : start + _SCORE_CHUNK].to(sae.W_dec.device, sae.W_dec.dtype)
                total += (sae.encode(chunk).float() / scale).sum(0)
        total = total.cpu()
        total[self.excluded] = 0.0
        values, indices = total.topk(min(n, sae.d_sae))
        return [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]
