"""The ``build-map`` command line: one small function per subcommand.

Each subcommand is an ``add_*`` function that adds its parser and sets ``run`` to a function
``(args) -> int``; to add one, write the pair and append the ``add_*`` function to SUBCOMMANDS.
``--help`` texts come from the docstrings under the config dataclasses' fields (``config_help``).
The project's errors (ValueError subclasses defined in build_map) print as ``error: ...`` with
exit status 2; anything else is a bug and keeps its traceback.
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

logger = logging.getLogger(__name__)

ERROR_EXIT = 2


# ---------------------------------------------------------------- helpers for subcommands


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
    if field.default is not MISSING and field.default is not None:
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def add_config_argument(
    parser: argparse.ArgumentParser, cls: type, name: str, *flags: str, **kwargs
) -> argparse.Action:
    """An option for config field ``name``: default and help come from the dataclass."""
    field = next(f for f in fields(cls) if f.name == name)
    kwargs.setdefault("default", None if field.default is MISSING else field.default)
    kwargs.setdefault("help", config_help(cls, name))
    return parser.add_argument(*flags, dest=name, **kwargs)


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


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``build-map train -v ...``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv: debug)"
    )
    return parent


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


# ---------------------------------------------------------------- train


def add_train(subparsers: argparse._SubParsersAction) -> None:
    from build_map.corpus import CorpusConfig
    from build_map.harvest import HarvestConfig
    from build_map.train import TrainConfig

    parser = subparsers.add_parser(
        "train",
        parents=[common_options()],
        help="harvest activations and train a TopK SAE on them",
        description="Harvest residual-stream activations of a model at a hookpoint, train a TopK sparse "
        "autoencoder on them and save it (cfg.json + sae.safetensors + metrics.json).",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument(
        "--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)"
    )
    model.add_argument("--hookpoint", default=None, help="e.g. model.layers.15 or 15 (default: middle layer)")
    model.add_argument("--tokens", type=count, default=1_000_000, help="tokens to harvest (default: 1M)")
    model.add_argument("--corpus", type=source_list, default=CorpusConfig().sources, dest="sources",
                       help="comma-separated sources: chitchat, chatterbot, .jsonl or text files "
                       "(default: chitchat,chatterbot)")  # fmt: skip
    model.add_argument("--buffer", default=None, help="folder for the activation buffer (default: the cache)")
    add_config_argument(model, HarvestConfig, "compute_dtype", "--harvest-dtype")
    sae = parser.add_argument_group("SAE and training")
    add_config_argument(sae, TrainConfig, "n_latents", "--latents", type=count)
    add_config_argument(sae, TrainConfig, "k", "--k", "-k", type=count)
    add_config_argument(sae, TrainConfig, "lr", "--lr", type=float)
    add_config_argument(sae, TrainConfig, "batch_size", "--batch-size", type=count)
    add_config_argument(sae, TrainConfig, "epochs", "--epochs", type=count)
    add_config_argument(sae, TrainConfig, "aux_k", "--aux-k", type=count)
    add_config_argument(sae, TrainConfig, "dead_tokens", "--dead-tokens", type=count)
    add_config_argument(sae, TrainConfig, "holdout_fraction", "--holdout-fraction", type=float)
    add_config_argument(sae, TrainConfig, "seed", "--seed", type=int)
    add_config_argument(sae, TrainConfig, "device", "--device")
    parser.add_argument("--out", required=True, help="folder to save the SAE in")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from build_map.corpus import CorpusConfig
    from build_map.harvest import HarvestConfig
    from build_map.train import TrainConfig, harvest_and_train

    # Build every config first: a bad setting fails now, not after a long harvest.
    cfg = TrainConfig(
        n_latents=args.n_latents,
        k=args.k,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        aux_k=args.aux_k,
        dead_tokens=args.dead_tokens,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        device=args.device,
    )
    corpus = CorpusConfig(sources=args.sources, seed=args.seed)
    harvest = HarvestConfig(compute_dtype=args.compute_dtype)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the model-loading bars too
    run = harvest_and_train(
        args.model, args.hookpoint, corpus, args.tokens, cfg, args.out,
        buffer=args.buffer, harvest=harvest, progress=not args.no_progress,
    )  # fmt: skip
    print(train_summary(run, cfg))
    return 0


def train_summary(run, cfg) -> str:
    m = run.metrics
    dead = round(m.dead_fraction * cfg.n_latents)
    return "\n".join(
        [
            f"SAE saved to {run.folder}",
            f"  {run.hookpoint} · {cfg.n_latents:,} latents · k={cfg.k} · {m.tokens_seen:,} training tokens "
            f"({run.n_tokens:,} harvested in {run.buffer_folder})",
            f"  held-out ({m.heldout_tokens:,} tokens): FVU {m.fvu:.3f} · mean L0 {m.mean_l0:.1f} · "
            f"dead {m.dead_fraction:.1%} ({dead} latents)",
            f"  time: load {run.load_seconds:.0f} s · harvest {run.harvest_seconds:.0f} s · "
            f"train {run.train_seconds:.0f} s",
        ]
    )


# ---------------------------------------------------------------- entry point


def add_build(subparsers: argparse._SubParsersAction) -> None:
    from build_map.cli_build import add_build as add

    add(subparsers)


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from build_map.cli_build import add_demo as add

    add(subparsers)


def add_export(subparsers: argparse._SubParsersAction) -> None:
    from build_map.export import add_export_arguments, run_export

    parser = subparsers.add_parser(
        "export", parents=[common_options()], help="write one self-contained, offline HTML file from a bundle",
        description="Export a bundle to a single HTML file: the map, search, and a card for every visible feature.",
    )  # fmt: skip
    add_export_arguments(parser)
    parser.set_defaults(run=run_export)


def add_sweep(subparsers: argparse._SubParsersAction) -> None:
    # The sweep runs the steering engine, which lives in explorer/; only this CLI shell reaches
    # into it (lazily), the build_map library never does.
    from explorer.sweep import add_sweep_arguments, run_sweep

    parser = subparsers.add_parser(
        "sweep", parents=[common_options()], help="strength sweep: effect and coherence vs steering strength",
        description="Generate at a range of strengths for a feature (or a recipe) and a prompt set; measure the "
        "feature's effect and the reply's coherence under the unsteered model; write Parquet, PNG and HTML.",
    )  # fmt: skip
    add_sweep_arguments(parser)
    parser.set_defaults(run=run_sweep)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train, add_build, add_demo, add_export, add_sweep,
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build-map",
        description="Turn a sparse autoencoder into a feature-map bundle (and train one if needed).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except ValueError as exc:
        if not type(exc).__module__.startswith(("build_map", "explorer")):
            raise  # not one of ours: a bug, keep the traceback
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
