"""Where the residual stream is: a model's decoder blocks, their names, and the modules around them.

A hookpoint names a module whose output is the residual stream, normally the output of a decoder
block (``model.layers.15`` for Llama). Users may also write ``15``, ``layers.15`` or SAELens'
``blocks.15.hook_resid_post``.
"""

from __future__ import annotations

import torch
from torch import nn


class HookpointError(ValueError):
    """The hookpoint names no module of the model; the message lists valid ones."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (``model.model.layers`` for Llama-style models)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        module = _get_submodule(model, path)
        if isinstance(module, nn.ModuleList):
            return module
    raise HookpointError(
        "Cannot find the decoder layers of this model; pass a full module path as hookpoint."
    )


def hookpoint_names(model: nn.Module) -> list[str]:
    """Residual-stream hookpoints: the output of each decoder block."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [f"{prefix}.{i}" for i in range(len(layers))]


def normalize_hookpoint(model: nn.Module, hookpoint: str) -> str:
    """Accept ``model.layers.15``, ``layers.15``, ``15`` or SAELens' ``blocks.15.hook_resid_post``."""
    names = hookpoint_names(model)
    text = hookpoint.strip()
    if text in names:
        return text
    for candidate in names:
        index = candidate.rsplit(".", 1)[1]
        if text in (index, f"layers.{index}", f"blocks.{index}.hook_resid_post"):
            return candidate
    if _get_submodule(model, text) is not None:
        return text
    shown = f"{names[0]} … {names[-1]}" if len(names) > 4 else ", ".join(names)
    raise HookpointError(
        f"Unknown hookpoint {hookpoint!r}: this model's residual-stream hookpoints are {shown} "
        f"({len(names)} layers). Pass one of them with --hookpoint."
    )


def resolve_hookpoint(model: nn.Module, hookpoint: str) -> nn.Module:
    """The module whose output is the residual stream at ``hookpoint``."""
    module = _get_submodule(model, normalize_hookpoint(model, hookpoint))
    assert module is not None
    return module


def default_hookpoint(model: nn.Module) -> str:
    """The middle layer, where features tend to be most abstract and steerable."""
    names = hookpoint_names(model)
    return names[len(names) // 2]


def d_model(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding (``model.model.norm`` for Llama)."""
    paths = ("model.norm", "model.final_layernorm", "model.decoder.final_layer_norm", "transformer.ln_f",
             "gpt_neox.final_layer_norm")  # fmt: skip
    for path in paths:
        module = _get_submodule(model, path)
        if module is not None:
            return module
    raise HookpointError(
        "Cannot find this model's final norm for the logit lens (looked for model.norm, "
        "transformer.ln_f, ...)."
    )


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the token embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def hidden_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the residual stream: that of the token embeddings."""
    return model.get_input_embeddings().weight.dtype


def module_device(module: nn.Module, model: nn.Module) -> torch.device:
    """The device a module computes on (a parameter-free module: the model's input device)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else input_device(model)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
