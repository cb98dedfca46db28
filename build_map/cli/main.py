"""``build-map COMMAND``: train an SAE, build a bundle, run the demo, export, sweep."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from build_map.cli import build, export, labels, sweep, train
from build_map.cli.base import run_command, setup_logging

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    train.add, build.add_build, build.add_probe, labels.add_label, labels.add_score, build.add_demo,
    export.add, sweep.add,
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
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
