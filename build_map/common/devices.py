"""The one choice of device and dtype: what the machine has, unless the user says otherwise.

``auto`` means CUDA when a GPU is visible, else the CPU; bf16 where it is native (CUDA, or a CPU
with AVX512-BF16 or AMX), fp32 elsewhere: emulated bf16 is several times slower than fp32. The
choice is made from hardware flags, never from timing, so seeded runs stay reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
COMPUTE_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")
"""Choices for the dtype of forward passes over a loaded model (see ``resolve_compute_dtype``)."""


class DeviceError(ValueError):
    """A device or dtype cannot be used on this machine; the message says what to pass instead."""


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) → CUDA when present, else CPU; anything else is checked to exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"Unknown device {str(device)!r}; pass auto, cpu, cuda or cuda:N.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu.")
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DeviceError(f"Unsupported device {str(device)!r}; pass auto, cpu, cuda or cuda:N.")
    return resolved


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """``auto`` → bf16 where it is native (CUDA, or a CPU with AVX512-BF16/AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(DTYPES))}.")
    return DTYPES[dtype]


def resolve_compute_dtype(model: nn.Module, name: str) -> torch.dtype:
    """The dtype to run ``model``'s forward passes in: ``model`` → as loaded; ``auto`` → bf16 for a
    float32 model on a CPU with native bf16, else as loaded; anything else names a dtype."""
    current = next(model.parameters()).dtype
    if name == "model":
        return current
    if name == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        fast = current == torch.float32 and on_cpu and cpu_has_fast_bf16()
        return torch.bfloat16 if fast else current
    return pick_dtype(torch.device("cpu"), name)


@contextlib.contextmanager
def model_in_dtype(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """The model in ``dtype``: itself when it already is, else a temporary cast copy (the caller's
    model is never changed: casting down and back would lose its precision)."""
    current = next(model.parameters()).dtype
    if current == dtype:
        yield model
        return
    logger.info("Running the forward passes with a %s copy of the %s model", dtype, current)
    cast = copy.deepcopy(model).to(dtype)
    try:
        yield cast
    finally:
        del cast
