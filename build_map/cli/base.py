"""What every command line of the project shares: options generated from config dataclasses (the
docstring under a field *is* its ``--help``), argument types, logging, and the one error-to-exit
wrapper.

A subcommand is a module with ``add(subparsers)``, which adds its parser and sets ``run`` to a
function ``(args) -> int``; ``build_map.cli.main`` lists them. The project's own errors (ValueError
subclasses defined in build_map or explorer) print as one line with exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable
from dataclasses import MISSING, fields
from functools import cache
from typing import Any, TypeVar

ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
_PROJECT_PACKAGES = ("build_map", "explorer")

Config = TypeVar("Config")


# ---------------------------------------------------------------- options from config dataclasses


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (sparsify style: the docstring *is* the help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def config_help(cls: type, name: str) -> str:
    """Help text for a config field: its docstring plus its default (% escaped for argparse)."""
    field = next(f for f in fields(cls) if f.name == name)
    text = field_docs(cls).get(name, "")
    if field.default is not MISSING and field.default not in (None, False):  # a flag's default is off
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def add_config_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    name: str,
    *flags: str,
    **kwargs: Any,
) -> argparse.Action:
    """An option for config field ``name``: default and help come from the dataclass."""
    field = next(f for f in fields(cls) if f.name == name)
    kwargs.setdefault("default", None if field.default is MISSING else field.default)
    kwargs.setdefault("help", config_help(cls, name))
    return parser.add_argument(*flags, dest=name, **kwargs)


def config_from_args(cls: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """An instance of config ``cls`` from the parsed options named after its fields (others keep
    their defaults), so building the config checks every value before any slow work starts."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **overrides})


# ---------------------------------------------------------------- argument types


def count(text: str) -> int:
    """A positive count; accepts 1000000, 1_000_000, 1e6, 200k or 1M."""
    cleaned = text.strip().lower().replace("_", "").replace(",", "")
    multiplier = {"k": 1_000, "m": 1_000_000}.get(cleaned[-1:], 1)
    try:
        value = float(cleaned[:-1] if multiplier > 1 else cleaned) * multiplier
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (try 1000000, 200k or 1M)") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a positive whole number; got {text!r}")
    return int(value)


def source_list(text: str) -> tuple[str, ...]:
    """Comma-separated corpus sources: chitchat, chatterbot or file paths."""
    sources = tuple(part.strip() for part in text.split(",") if part.strip())
    if not sources:
        raise argparse.ArgumentTypeError("give at least one source: chitchat, chatterbot or a file path")
    return sources


# ---------------------------------------------------------------- running


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``build-map train -v ...``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv: debug)"
    )
    return parent


def add_bundle_model_options(parser: argparse.ArgumentParser) -> None:
    """How a command that opens a bundle loads its model and SAE (``build_map.bundle.sources``)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, bfloat16, float16",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model to load instead of the one in the manifest (HF id, folder or .gguf)",
    )
    parser.add_argument("--sae", default=None, help="SAE to load instead of the one in the manifest")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def is_project_error(exc: BaseException) -> bool:
    """One of the project's ValueErrors, whose message says what to do (not a bug)."""
    return isinstance(exc, ValueError) and type(exc).__module__.startswith(_PROJECT_PACKAGES)


def run_command(command: Callable[[], int | None], prefix: str = "error: ") -> int:
    """Run a command's body and turn the project's errors into one line on stderr and exit status
    2, Ctrl+C into status 130; any other exception is a bug and keeps its traceback."""
    try:
        return int(command() or 0)
    except ValueError as exc:
        if not is_project_error(exc):
            raise
        print(f"{prefix}{exc}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
