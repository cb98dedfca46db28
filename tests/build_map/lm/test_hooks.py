"""Scoped forward hooks act only in the context that set them and are installed once per module."""

from __future__ import annotations

import threading

import torch
from torch import nn

from build_map.lm.hooks import install_dispatch, scoped_forward_hook


def _double(_module, _args, output):
    return output * 2


def test_hook_applies_in_its_context_only_and_is_installed_once():
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    plain = layer(x)
    with scoped_forward_hook(layer, _double):
        assert torch.allclose(layer(x), plain * 2)
        with scoped_forward_hook(layer, lambda _m, _a, out: out + 1):  # the inner one wins, then restores
            assert torch.allclose(layer(x), plain + 1)
        assert torch.allclose(layer(x), plain * 2)
    assert torch.allclose(layer(x), plain)
    install_dispatch(layer)
    assert len(layer._forward_hooks) == 1


def test_other_threads_forward_passes_are_untouched():
    """While one thread holds a hook that rewrites the output, another thread's forwards are plain."""
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    plain = layer(x).detach()
    install_dispatch(layer)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def hooked() -> None:
        with scoped_forward_hook(layer, _double):
            inside.set()
            done.wait(10)
            seen["hooked"] = layer(x).detach()

    def plain_thread() -> None:
        inside.wait(10)
        seen["other"] = layer(x).detach()
        done.set()

    threads = [threading.Thread(target=hooked), threading.Thread(target=plain_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert torch.allclose(seen["other"], plain)
    assert torch.allclose(seen["hooked"], plain * 2)


def test_copied_module_gets_its_own_dispatcher():
    """deepcopy (the harvest's bf16 copy) works, and the copy's hook is independent of the original's."""
    import copy

    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with scoped_forward_hook(layer, _double):
        twin = copy.deepcopy(layer)
        assert torch.allclose(twin(x), layer(x) / 2)
    with scoped_forward_hook(twin, _double):
        assert torch.allclose(twin(x), layer(x) * 2)
    assert len(twin._forward_hooks) == 1
