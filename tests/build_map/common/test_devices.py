"""The one device and dtype choice: what the machine has, and clear errors for what it has not."""

from __future__ import annotations

import pytest
import torch

from build_map.common import devices
from build_map.common.devices import DeviceError, model_in_dtype, pick_device, pick_dtype


def test_auto_picks_what_is_present():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(None) == pick_device("auto")


@pytest.mark.parametrize("name", ["bogus", "gpu0", "cuda:x"])
def test_unknown_devices_say_what_to_pass(name):
    with pytest.raises(DeviceError, match="pass auto, cpu, cuda or cuda:N"):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_to_use_the_cpu():
    with pytest.raises(DeviceError, match="no CUDA GPU is visible; use --device cpu"):
        pick_device("cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_is_bf16_only_where_it_is_native(monkeypatch, native_bf16):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: native_bf16)
    assert pick_dtype(torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "fp16") == torch.float16
    with pytest.raises(DeviceError, match="choose one of auto"):
        pick_dtype(torch.device("cpu"), "fp8")


def test_model_in_dtype_never_changes_the_callers_model(tiny_model):
    with model_in_dtype(tiny_model, torch.float32) as same:
        assert same is tiny_model
    with model_in_dtype(tiny_model, torch.bfloat16) as cast:
        assert cast is not tiny_model and next(cast.parameters()).dtype == torch.bfloat16
    assert next(tiny_model.parameters()).dtype == torch.float32
