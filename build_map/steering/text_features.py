"""The SAE features a text carries, read without steering: the features of a chat reply (what the
model sees in the text, so a steered feature shows up only if the text itself carries it) and the
features of free text typed in the search box ("search by meaning").

Both are ranked by *specificity*: a feature's activation relative to its usual level in the corpus,
``density × mean_act`` (the expected activation per token, from the bundle's statistics). A raw
activation ranking puts the features that fire on nearly every token (',', 'I', the chat template)
at the top of every list; relative to their usual level they score about 1×, while a feature that
rarely fires scores high where it does. On 263 demo features, reading one of each feature's
quantile examples back as a search, the feature itself ranks at a median of 122 of 4,517 this way
against 234 by activation / max activation (the ranking before; ``bench/bench_meaning_search.py``).
"""

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
MAX_QUERY_TOKENS = 256
"""Free text read at most: a search box, not a document (the rest is left out, and said so)."""
_SCORE_CHUNK = 256  # tokens encoded at once (d_sae can be 65,536 wide)


def usual_levels(bundle: Bundle) -> torch.Tensor:
    """Each feature's expected activation per corpus token (``density × mean_act``), 0 where the
    feature never fired, is hidden or has no statistics."""
    features = bundle.features
    level = torch.as_tensor(features["density"].to_numpy(float) * features["mean_act"].to_numpy(float))
    level = torch.nan_to_num(level, nan=0.0, posinf=0.0).clamp_min(0.0)
    excluded = torch.as_tensor(features["hidden"].to_numpy(bool) | features["dead"].to_numpy(bool))
    return torch.where(excluded, torch.zeros(()), level.double())


class TextFeatures:
    """Ranks SAE features on a text from the hookpoint activations of its tokens.

    The forward pass stops at the hookpoint (the layers above it are not needed) and is observed
    through a scoped hook (``build_map.lm.hooks``): only this thread's pass, no hook added while
    other threads generate. Score of a feature = its mean activation over the text's tokens divided
    by its usual level (``usual_levels``): "N× its usual". Hidden, dead and unmeasured features are
    never listed.
    """

    def __init__(self, engine: SteeringEngine, bundle: Bundle):
        self.engine = engine
        self.levels = usual_levels(bundle)
        install_dispatch(resolve_hookpoint(engine.model, engine.hookpoint))  # now, not while others generate

    def on_reply(
        self, messages: Sequence[dict], reply: str, n: int = N_REPLY_FEATURES
    ) -> list[tuple[int, float]]:
        """[(feature, score)] of the ``n`` most specific features of ``reply`` in its conversation."""
        prompt_ids = self.engine.prompt_ids(list(messages))
        reply_ids = self.engine.encode(reply)
        if not reply_ids:
            return []
        return self.top(self._mean_activations(prompt_ids + reply_ids, len(prompt_ids), len(reply_ids)), n)

    def on_text(self, text: str, n: int) -> tuple[list[tuple[int, float]], int]:
        """The ``n`` most specific features of ``text`` (``read_text``), and how many of its tokens
        were left out."""
        mean, left_out = self.read_text(text)
        return (self.top(mean, n) if mean is not None else []), left_out

    def read_text(self, text: str) -> tuple[torch.Tensor | None, int]:
        """Each feature's mean activation (d_sae,) over ``text`` read as a user's chat message (the
        setting the SAE's corpus is in), None for no tokens; and how many tokens were left out
        (over ``MAX_QUERY_TOKENS``)."""
        content = self.engine.encode(text)
        if not content:
            return None, 0
        kept = content[:MAX_QUERY_TOKENS]
        message = text if len(kept) == len(content) else self.engine.decode(kept)
        ids = self.engine.prompt_ids([{"role": "user", "content": message}])
        start = _find(ids, kept)
        if start is None:  # the template merged a token at the edge: read the text on its own
            ids, start = kept, 0
        return self._mean_activations(ids, start, len(kept)), len(content) - len(kept)

    def specificity(self, mean: torch.Tensor) -> torch.Tensor:
        """Mean activations (d_sae,) as multiples of each feature's usual level; 0 where unmeasured."""
        return torch.where(self.levels > 0, mean / self.levels.clamp_min(1e-30), torch.zeros(()))

    def top(self, mean: torch.Tensor, n: int) -> list[tuple[int, float]]:
        """[(feature, specificity)] of the ``n`` most specific features with a positive score."""
        values, indices = self.specificity(mean).topk(min(n, mean.shape[0]))
        return [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]

    def _mean_activations(self, ids: list[int], start: int, length: int) -> torch.Tensor:
        """Mean SAE activation (float64, on the CPU) over positions ``start`` to ``start + length``."""
        hidden = cut_forward(self.engine.model, self.engine.hookpoint, torch.tensor([ids]))[
            0, start : start + length
        ]
        sae = self.engine.sae
        total = torch.zeros(sae.d_sae, dtype=torch.float64)
        with torch.inference_mode():
            for at in range(0, hidden.shape[0], _SCORE_CHUNK):
                chunk = hidden[at : at + _SCORE_CHUNK].to(sae.W_dec.device, sae.W_dec.dtype)
                total += sae.encode(chunk).double().sum(0).cpu()
        return total / length


def _find(ids: list[int], part: list[int]) -> int | None:
    """Where ``part`` starts in ``ids`` (last occurrence: the message comes after the system text)."""
    for start in range(len(ids) - len(part), -1, -1):
        if ids[start : start + len(part)] == part:
            return start
    return None
