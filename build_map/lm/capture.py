"""Reading the residual stream at a hookpoint: the one place that knows a decoder block's output.

In transformers 5 a Llama decoder layer returns a plain tensor; older versions return a tuple
whose first item is the hidden state. Indexing a tensor with ``[0]`` would pick batch row 0, so
the two are told apart by type (``hidden_of`` / ``with_hidden``), everywhere: harvesting,
statistics, sweeps, reply features, attribution and steering all go through here.

Hooks are scoped (``build_map.lm.hooks``): a capture sees only the forward passes of the thread
that asked, even while other threads generate with the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from build_map.lm.hookpoints import input_device, resolve_hookpoint
from build_map.lm.hooks import scoped_forward_hook


class CaptureError(ValueError):
    """The hookpoint's output cannot be read; the message says which hookpoint to pick."""


class _StopForward(Exception):
    """Raised by a capture hook to skip the layers after the hookpoint."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state (batch, seq, d_model) in a decoder block's output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"Cannot read a hookpoint output of type {type(output).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden state. Pick a decoder block output as hookpoint."
    )


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden state replaced by ``hidden`` (same structure)."""
    if isinstance(output, torch.Tensor):
        return hidden
    hidden_of(output)  # the same check and message
    return (hidden, *output[1:])


@contextmanager
def capturing(model: nn.Module, hookpoint: str) -> Iterator[list[torch.Tensor]]:
    """Record the hookpoint output of every forward pass this context runs (the rest of the
    forward pass goes on): ``with capturing(model, hp) as seen: logits = model(ids).logits``."""
    seen: list[torch.Tensor] = []

    def record(_module: nn.Module, _args: Any, output: Any) -> None:
        seen.append(hidden_of(output))

    with scoped_forward_hook(resolve_hookpoint(model, hookpoint), record):
        yield seen


def cut_forward(
    model: nn.Module,
    hookpoint: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream at ``hookpoint``, (batch, seq, d_model), computing no layer after it:
    the hook stores the output and raises, so the later layers and the LM head never run."""
    module = resolve_hookpoint(model, hookpoint)
    captured: list[torch.Tensor] = []

    def stop(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(hidden_of(output))
        raise _StopForward

    ids = input_ids.to(input_device(model))
    mask = None if attention_mask is None else attention_mask.to(ids.device)
    try:
        with scoped_forward_hook(module, stop), torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    if not captured:
        raise CaptureError(f"The model's forward pass never reached hookpoint {hookpoint!r}.")
    return captured[0]
