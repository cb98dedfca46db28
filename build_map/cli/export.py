"""``build-map export BUNDLE OUT.html``: one self-contained, offline HTML file from a bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from build_map.cli.base import add_config_argument, common_options, config_from_args

logger = logging.getLogger(__name__)


def add(subparsers: argparse._SubParsersAction) -> None:
    from build_map.render.export.cards import ExportConfig

    parser = subparsers.add_parser(
        "export", parents=[common_options()], help="write one self-contained, offline HTML file from a bundle",
        description="Export a bundle to a single HTML file: the map, search, and a card for every visible feature.",
    )  # fmt: skip
    parser.add_argument("bundle", type=Path, help="The map bundle folder (from `build-map build`).")
    parser.add_argument("out", type=Path, help="The HTML file to write, e.g. features.html.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists.")
    parser.add_argument("--title", default=None, help="Page title (default: the model and hookpoint).")
    add_config_argument(parser, ExportConfig, "max_examples", "--max-examples", type=int)
    add_config_argument(parser, ExportConfig, "include_dead", "--include-dead", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from build_map.render.export.cards import ExportConfig
    from build_map.render.export.page import export_bundle

    config = config_from_args(ExportConfig, args)
    summary = export_bundle(args.bundle, args.out, overwrite=args.overwrite, config=config, title=args.title)
    logger.info("%s", summary)
    print(summary)  # the command's one line of output
    return 0
