"""Running a model on from a hookpoint: only the layers after it, from a residual cached there.

The output-effect probe adds thousands of decoder directions at the hookpoint of the same few
contexts. The layers below the hookpoint would compute the same thing every time, so
``Continuation`` computes them once per context. The context's prefix goes into a KV cache, and
the probed positions' residual stream is read at the hookpoint. After that, every batch of
candidate residuals runs through the decoder layers after the hookpoint and the LM head only.

How: the model's own decoder forward runs with ``inputs_embeds`` set to the residual and its
``layers`` list swapped for the layers after the hookpoint, for the duration of one call. The
model then builds its own masks, rotary embeddings and cache updates (each attention layer keeps
its ``layer_idx``, so the cache's later layers are the ones extended). This holds for Llama-style
models, whose decoder adds nothing to ``inputs_embeds``. Each context checks the shortcut against
a plain forward. Where the two disagree, for example a model that scales its embeddings, every
batch runs the whole model instead, with the hookpoint's output replaced. That is slower, but
right for any architecture.

The swap changes the shared model for one call, so a continuation must not run while other
threads use the same model (the build is single-threaded; the explorer never uses this).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from build_map.lm.capture import capturing, with_hidden
from build_map.lm.hookpoints import decoder_layers, input_device, normalize_hookpoint, resolve_hookpoint
from build_map.lm.hooks import scoped_forward_hook

logger = logging.getLogger(__name__)

_AGREEMENT = 1e-3  # largest |Δ logit| / logit scale at which the shortcut counts as exact


@dataclass
class ContextState:
    """One context, computed once: its prefix in a KV cache, and the probed positions."""

    cache: Any
    """The model's KV cache of the prefix (batch 1)."""
    new_ids: torch.Tensor
    """(1, L) ids of the probed positions (after the prefix)."""
    positions: torch.Tensor
    """(1, L) their position ids."""
    residual: torch.Tensor
    """(L, d_model) the unsteered residual stream at the hookpoint, probed positions."""
    logits: torch.Tensor
    """(L, vocab) the unsteered next-token logits at the probed positions (float32)."""


class Continuation:
    """``logits(context, residual)``: next-token logits when the hookpoint output at a context's
    probed positions is ``residual`` (B, L, d_model), every row with its own residual."""

    def __init__(self, model: nn.Module, hookpoint: str):
        self.model = model
        self.hookpoint = normalize_hookpoint(model, hookpoint)
        self._module = resolve_hookpoint(model, self.hookpoint)
        layers = decoder_layers(model)
        index = next((i for i, layer in enumerate(layers) if layer is self._module), None)
        self._decoder = _decoder_owning(model, layers)
        self._after = (
            None if index is None or self._decoder is None else nn.ModuleList(list(layers)[index + 1 :])
        )
        self._cache_arg = _cache_argument(model)
        self.shortcut = self._after is not None
        """Whether batches run the layers after the hookpoint only (False: the whole model)."""

    def context(self, prefix_ids: list[int], new_ids: list[int]) -> ContextState:
        """Run ``prefix_ids + new_ids`` once, unsteered; the probed positions are ``new_ids``."""
        if not prefix_ids or not new_ids:
            raise ValueError("a probe context needs a non-empty prefix and at least one probed token")
        device = input_device(self.model)
        prefix = torch.tensor([prefix_ids], device=device)
        new = torch.tensor([new_ids], device=device)
        with torch.inference_mode():
            out = self.model(input_ids=prefix, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            positions = torch.arange(len(prefix_ids), len(prefix_ids) + len(new_ids), device=device)[None]
            with capturing(self.model, self.hookpoint) as seen:
                logits = self._call(_batch_cache(cache, 1), positions, input_ids=new).logits
        state = ContextState(cache, new, positions, seen[0][0].detach(), logits[0].float())
        if self.shortcut and not self._agrees(state):
            logger.warning(
                "Running the layers after %s alone does not reproduce the model's logits; the probe "
                "runs the whole model instead (slower).", self.hookpoint,
            )  # fmt: skip
            self.shortcut = False
        return state

    def logits(self, state: ContextState, residual: torch.Tensor) -> torch.Tensor:
        """(B, L, vocab) float32 logits with the hookpoint output at the probed positions replaced
        by ``residual`` (B, L, d_model)."""
        rows = residual.shape[0]
        cache = _batch_cache(state.cache, rows)
        positions = state.positions.expand(rows, -1)
        with torch.inference_mode():
            if self.shortcut:
                return self._after_hookpoint(residual, cache, positions).float()
            replace = _Replace(residual)
            with scoped_forward_hook(self._module, replace):
                out = self._call(cache, positions, input_ids=state.new_ids.expand(rows, -1))
            return out.logits.float()

    def _after_hookpoint(self, residual: torch.Tensor, cache: Any, positions: torch.Tensor) -> torch.Tensor:
        decoder, layers = self._decoder, self._decoder.layers
        dtype = next(self.model.get_output_embeddings().parameters()).dtype  # there may be no layer after
        decoder.layers = self._after
        try:
            hidden = decoder(
                inputs_embeds=residual.to(dtype), position_ids=positions, use_cache=True,
                **{self._cache_arg: cache},
            ).last_hidden_state  # fmt: skip
        finally:
            decoder.layers = layers
        return self.model.get_output_embeddings()(hidden)

    def _call(self, cache: Any, positions: torch.Tensor, **inputs: Any) -> Any:
        return self.model(position_ids=positions, use_cache=True, **{self._cache_arg: cache}, **inputs)

    def _agrees(self, state: ContextState) -> bool:
        shortcut = self._after_hookpoint(state.residual[None], _batch_cache(state.cache, 1), state.positions)[
            0
        ].float()
        scale = float(state.logits.abs().max().clamp(min=1.0))
        return bool(((shortcut - state.logits).abs().max() / scale) <= _AGREEMENT)


class _Replace:
    """A forward hook that replaces the hookpoint output with a given residual stream."""

    def __init__(self, residual: torch.Tensor):
        self.residual = residual

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        return with_hidden(output, self.residual.to(hidden.device, hidden.dtype))


def _batch_cache(cache: Any, rows: int) -> Any:
    """A fresh cache of ``rows`` copies of a batch-1 cache, the original left as it is. With
    transformers' layered caches the copies are views (``expand``): the first update concatenates
    anyway, so copying every layer's prefix ``rows`` times first would be wasted memory traffic."""
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        fresh = copy.copy(cache)
        fresh.layers = [copy.copy(layer) for layer in layers]
        for layer in fresh.layers:
            layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            layer.values = layer.values.expand(rows, *layer.values.shape[1:])
        return fresh
    fresh = copy.deepcopy(cache)
    fresh.batch_repeat_interleave(rows)
    return fresh


def _decoder_owning(model: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The module whose ``layers`` attribute is the decoder layer list (``model.model`` for Llama)."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    return decoder if getattr(decoder, "layers", None) is layers else None


def _cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (earlier)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
