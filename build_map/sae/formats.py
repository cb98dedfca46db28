"""Loaders for the SAE formats researchers actually have, and this project's own format.

Formats ``load_sae`` detects:
  goodfire  a ``.pth`` state dict: encoder_linear.{weight,bias}, decoder_linear.{weight,bias}; ReLU.
  saelens   folder with cfg.json + sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec, threshold).
  sparsify  folder with cfg.json + sae.safetensors (encoder.weight, encoder.bias, W_dec, b_dec); TopK.
  native    this project's own: cfg.json with "format": "sae-feature-map" + sae.safetensors.
Every bad file is an ``SAEError`` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from build_map.sae.model import SAEConfig, SAEError, SparseAutoencoder, check_matches_model

logger = logging.getLogger(__name__)

NATIVE_FORMAT = "sae-feature-map"
NATIVE_WEIGHTS = "sae.safetensors"


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise SAEError(f"SAE path {path} does not exist.")
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            return "goodfire"
        if path.name in ("cfg.json", NATIVE_WEIGHTS, "sae_weights.safetensors"):
            return detect_format(path.parent)
        raise SAEError(
            f"{path}: unknown SAE layout. Pass a Goodfire .pth file, or a folder with cfg.json plus "
            "sae_weights.safetensors (SAELens) or sae.safetensors (sparsify / this project)."
        )
    cfg_path = path / "cfg.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if cfg.get("format") == NATIVE_FORMAT:
            return "native"
        if (path / "sae_weights.safetensors").is_file():
            return "saelens"
        if (path / NATIVE_WEIGHTS).is_file():
            return "sparsify"
    pth = sorted(path.glob("*.pth"))
    if len(pth) == 1 and not cfg_path.exists():
        return "goodfire"
    nested = sorted(p.parent.name for p in path.glob("*/cfg.json"))
    hint = f" It holds SAEs in subfolders: pass one of {', '.join(nested[:8])}." if nested else ""
    raise SAEError(
        f"{path}: unknown SAE layout (expected cfg.json with sae_weights.safetensors or sae.safetensors, "
        f"or a Goodfire .pth file).{hint}"
    )


def load_sae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    d_model: int | None = None,
    hookpoint: str | None = None,
) -> SparseAutoencoder:
    """Load any supported SAE; with ``d_model`` given, refuse one that does not fit the model."""
    path = Path(path)
    fmt = detect_format(path)
    loader = {
        "goodfire": _load_goodfire,
        "saelens": _load_saelens,
        "sparsify": _load_sparsify,
        "native": _load_native,
    }[fmt]
    sae = loader(path)
    _check_finite(sae, path)
    if d_model is not None:
        check_matches_model(sae, d_model, hookpoint or "the hookpoint", source=str(path))
    logger.info("Loaded %s SAE from %s: %d features × d_in %d", fmt, path, sae.d_sae, sae.d_in)
    return sae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_goodfire(path: Path) -> SparseAutoencoder:
    file = path if path.is_file() else next(path.glob("*.pth"))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch refuses objects beyond tensors and plain containers
        raise SAEError(
            f"{file} holds Python objects besides tensors, and loading it would run code from the file, so "
            "it is refused. Save the SAE as a plain state dict of tensors (torch.save(sae.state_dict(), …)) "
            "or as safetensors."
        ) from exc
    except Exception as exc:  # zip/truncation errors have many types
        raise SAEError(
            f"{file}: cannot read it as a torch state dict ({type(exc).__name__}); is the file complete?"
        ) from exc
    if not isinstance(state, dict):
        raise SAEError(f"{file}: expected a state dict, found {type(state).__name__}.")
    tensors = _require(
        state,
        ["encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"],
        file,
        "Goodfire",
    )
    d_sae, d_in = tensors["encoder_linear.weight"].shape
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, activation="relu", source_format="goodfire"))
    return _fill(
        sae,
        file,
        {
            "W_enc": tensors["encoder_linear.weight"].T,
            "b_enc": tensors["encoder_linear.bias"],
            "W_dec": tensors["decoder_linear.weight"].T,
            "b_dec": tensors["decoder_linear.bias"],
        },
    )


def _load_saelens(path: Path) -> SparseAutoencoder:
    cfg = _read_json(path / "cfg.json")
    file = path / "sae_weights.safetensors"
    tensors = _require(_read_safetensors(file), ["W_enc", "W_dec", "b_enc", "b_dec"], file, "SAELens")
    d_in, d_sae = tensors["W_enc"].shape
    arch = str(cfg.get("architecture", "standard")).lower()
    activation_fn = str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))).lower()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    activation = (
        "jumprelu"
        if arch == "jumprelu"
        else "topk"
        if (arch == "topk" or activation_fn == "topk")
        else "relu"
    )
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise SAEError(
            f"{path / 'cfg.json'}: SAELens architecture {arch!r} is not supported; "
            "supported: standard, topk, jumprelu."
        )
    if arch == "gated":
        raise SAEError(
            f"{path / 'cfg.json'}: gated SAEs are not supported yet; convert to standard or jumprelu."
        )
    if activation == "jumprelu" and "threshold" not in tensors:
        raise SAEError(f"{file}: a jumprelu SAE needs a 'threshold' tensor; the file lacks it.")
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            activation=activation,
            k=int(k) if k else None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
            hookpoint=cfg.get("hook_name") or cfg.get("hook_point"),
            source_format="saelens",
        )
    )
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if activation == "jumprelu" else [])
    return _fill(sae, file, {name: tensors[name] for name in names})


def _load_sparsify(path: Path) -> SparseAutoencoder:
    cfg = _read_json(path / "cfg.json")
    file = path / NATIVE_WEIGHTS
    tensors = _require(
        _read_safetensors(file), ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], file, "sparsify"
    )
    d_sae, d_in = tensors["encoder.weight"].shape
    k = cfg.get("k")
    if not k:
        raise SAEError(f"{path / 'cfg.json'}: a sparsify SAE needs 'k' in cfg.json.")
    sae = SparseAutoencoder(
        SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            activation="topk",
            k=int(k),
            apply_b_dec_to_input=True,
            source_format="sparsify",
        )
    )
    return _fill(
        sae,
        file,
        {
            "W_enc": tensors["encoder.weight"].T,
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        },
    )


def _load_native(path: Path) -> SparseAutoencoder:
    cfg = _read_json(path / "cfg.json")
    file = path / NATIVE_WEIGHTS
    fields = {name: cfg[name] for name in SAEConfig.__dataclass_fields__ if name in cfg}
    missing = {"d_in", "d_sae"} - fields.keys()
    if missing:
        raise SAEError(
            f"{path / 'cfg.json'}: missing {', '.join(sorted(missing))}; re-save the SAE with save_sae."
        )
    sae = SparseAutoencoder(SAEConfig(**{**fields, "source_format": "native"}))
    tensors = _require(
        _read_safetensors(file), ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], file, "native"
    )
    return _fill(sae, file, tensors)


def save_sae(sae: SparseAutoencoder, folder: str | Path, extra: dict | None = None) -> Path:
    """Write cfg.json + sae.safetensors (this project's format); ``extra`` goes into cfg.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"format": NATIVE_FORMAT, "format_version": 1, **asdict(sae.cfg), **(extra or {})}
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in sae.state_dict().items()
    }
    save_file(tensors, str(folder / NATIVE_WEIGHTS))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return folder


# ---------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEError(f"{path} is missing; an SAE folder needs its cfg.json.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEError(f"{path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise SAEError(f"{path} must hold a JSON object.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(f"{path} is missing; the SAE folder needs its weights file.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise SAEError(f"{path}: cannot read safetensors ({exc}); is the file complete?") from exc


def _require(tensors: dict, keys: list[str], file: Path, layout: str) -> dict[str, torch.Tensor]:
    missing = [key for key in keys if key not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:8]) or "nothing"
        raise SAEError(f"{file}: not a complete {layout} SAE: missing {', '.join(missing)} (found {found}).")
    return tensors


def _fill(sae: SparseAutoencoder, file: Path, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    state = sae.state_dict()
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise SAEError(
                f"{file}: inconsistent shapes: {name} is {tuple(tensor.shape)}, expected {tuple(state[name].shape)} "
                f"for d_in={sae.d_in}, d_sae={sae.d_sae}; the file is corrupt or mixes two SAEs."
            )
        state[name] = tensor.detach().to(torch.float32)
    sae.load_state_dict(state)
    return sae


def _check_finite(sae: SparseAutoencoder, file: Path) -> None:
    for name, tensor in sae.state_dict().items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise SAEError(
                f"{file}: {name} has {bad} NaN/Inf values; the SAE is corrupt, re-export or retrain it."
            )
