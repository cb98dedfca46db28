"""``build-map label BUNDLE`` and ``build-map score BUNDLE``: renew a bundle's labels or their
scores in place."""

from __future__ import annotations

import argparse

from build_map.cli.base import common_options

_WHO = "offline (no model), self (the bundle's own chat model) or the URL of an OpenAI-compatible endpoint"


def add_label(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label", parents=[common_options()], help="relabel an existing bundle (and rename its clusters)",
        description="Label every live feature again, name the clusters from the new labels, score the labels "
        "and rewrite the bundle in place. LLM answers are cached per prompt: an interrupted run continues.",
    )  # fmt: skip
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--labeler", default="offline", help=f"who labels: {_WHO} (default: offline)")
    parser.add_argument(
        "--judge", default="offline", help=f"who scores the labels: {_WHO} (default: offline)"
    )
    parser.add_argument("--no-score", action="store_true", help="do not score the new labels")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the prompt of one feature and the estimated tokens, send nothing")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (for self)")
    parser.set_defaults(run=run_label)


def run_label(args: argparse.Namespace) -> int:
    from build_map.pipeline.label_stage import check_spec
    from build_map.pipeline.relabel import label_dry_run, relabel_bundle

    check_spec(args.labeler, "--labeler")
    check_spec(args.judge, "--judge")
    if args.dry_run:
        if args.labeler == "offline":
            print("--dry-run shows what an LLM labeller would be sent; the offline labeller sends nothing.")
            return 0
        print(label_dry_run(args.bundle, args.labeler, args.device))
        return 0
    summary = relabel_bundle(args.bundle, args.labeler, None if args.no_score else args.judge, args.device)
    print(summary.line() if summary else "labels renewed (not scored)")
    print(f"wrote {args.bundle}")
    return 0


def add_score(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", parents=[common_options()], help="score an existing bundle's labels (detection, fuzzing)",
        description="Score every label on held-out examples: detection (pick the feature's example among "
        "three of its neighbours', chance 0.25) and fuzzing (pick the words it fires on, chance 0.5); the "
        "scores go into features.parquet with the judge's name, the bundle is rewritten in place.",
    )  # fmt: skip
    parser.add_argument("bundle", help="bundle folder")
    parser.add_argument("--judge", default="offline", help=f"who judges: {_WHO} (default: offline)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (for self)")
    parser.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> int:
    from build_map.pipeline.label_stage import check_spec
    from build_map.pipeline.relabel import rescore_bundle

    check_spec(args.judge, "--judge")
    print(rescore_bundle(args.bundle, args.judge, args.device).line())
    print(f"wrote {args.bundle}")
    return 0
