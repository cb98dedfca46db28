"""Forward hooks that act only in the thread (context) that asked for them.

Adding or removing a forward hook while another thread runs the model is unsafe (PyTorch iterates
the module's hook dict during the forward), and a hook added for one request would also see every
other thread's forward passes: an attribution next to a streaming chat would read, or even
rewrite, the chat's activations. So a module gets one dispatching hook, installed once; each
caller says what it does for the forward passes of its own context:

    with scoped_forward_hook(module, fn):   # fn(module, args, output) -> None | new output
        model(ids)                          # other threads' forwards are untouched

Servers call ``install_dispatch(module)`` at start-up so no hook is ever added while serving.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

HookFn = Callable[[nn.Module, Any, Any], Any]

_DISPATCH_ATTR = "_sae_map_forward_hook"
_install_lock = threading.Lock()


class _Dispatch:
    """The one hook of a module: calls what the current context set, if anything."""

    def __init__(self) -> None:
        self.current: contextvars.ContextVar[HookFn | None] = contextvars.ContextVar(
            f"forward_hook_{id(self)}", default=None
        )

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        fn = self.current.get()
        return None if fn is None else fn(module, args, output)

    # A copied or pickled model (deepcopy for a bf16 copy, torch.save) gets a fresh dispatcher.
    def __deepcopy__(self, memo: dict) -> _Dispatch:
        return _Dispatch()

    def __reduce__(self) -> tuple:
        return (_Dispatch, ())


def install_dispatch(module: nn.Module) -> _Dispatch:
    """The module's dispatching hook, registered on the first call."""
    with _install_lock:
        dispatch = module.__dict__.get(_DISPATCH_ATTR)
        if dispatch is None:
            dispatch = _Dispatch()
            module.register_forward_hook(dispatch)
            module.__dict__[_DISPATCH_ATTR] = dispatch  # a plain attribute, not a submodule or buffer
    return dispatch


@contextmanager
def scoped_forward_hook(module: nn.Module, fn: HookFn) -> Iterator[None]:
    """Run ``fn`` as a forward hook of ``module`` for this context's forward passes only."""
    current = install_dispatch(module).current
    token = current.set(fn)
    try:
        yield
    finally:
        current.reset(token)
