"""``build-map build`` and ``build-map demo``: from an SAE to a bundle (and, for the demo, a server)."""

from __future__ import annotations

import argparse
import os
import sys

from build_map.cli.base import add_config_argument, common_options, config_from_args, count, source_list


def add_build(subparsers: argparse._SubParsersAction) -> None:
    from build_map.pipeline.build import BuildConfig

    parser = subparsers.add_parser(
        "build", parents=[common_options()], help="build a map bundle from a model and an SAE",
        description="Compute per-feature statistics and labels, project and cluster the decoder directions, "
        "and write a map bundle (Parquet + manifest + map.html).",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)"
    )
    parser.add_argument(
        "--hookpoint", default=None, help="e.g. model.layers.19 (default: the SAE's own, else middle)"
    )
    add_config_argument(parser, BuildConfig, "sae", "--sae", required=True)
    add_config_argument(parser, BuildConfig, "out", "--out", required=True)
    add_config_argument(parser, BuildConfig, "n_tokens", "--tokens", type=count)
    parser.add_argument("--corpus", type=source_list, default=BuildConfig.corpus, help="comma-separated sources: "
                        "chitchat, chatterbot, .jsonl or text files (default: chitchat,chatterbot)")  # fmt: skip
    add_config_argument(parser, BuildConfig, "activations", "--activations")
    add_config_argument(parser, BuildConfig, "labels", "--labels")
    add_config_argument(parser, BuildConfig, "hide", "--hide")
    add_config_argument(parser, BuildConfig, "labeler", "--labeler")
    add_config_argument(parser, BuildConfig, "judge", "--judge")
    add_config_argument(parser, BuildConfig, "score", "--no-score", action="store_false",
                        help="skip scoring the labels (detection and fuzzing on held-out examples)")  # fmt: skip
    add_config_argument(parser, BuildConfig, "device", "--device")
    add_config_argument(parser, BuildConfig, "overwrite", "--overwrite", action="store_true")
    add_config_argument(parser, BuildConfig, "title", "--title")
    add_config_argument(parser, BuildConfig, "seed", "--seed", type=int)
    add_config_argument(parser, BuildConfig, "probe", "--no-probe", action="store_false",
                        help="skip the output-effect probe (clicks then use the default strength)")  # fmt: skip
    parser.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    from build_map.pipeline.build import BuildConfig, build_bundle

    summary = build_bundle(config_from_args(BuildConfig, args, corpus=tuple(args.corpus)))
    print("\n".join(summary.lines()))
    return 0


def add_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe", parents=[common_options()], help="run the output-effect probe on an existing bundle",
        description="Measure every live, visible feature's click strength, steerability and output tokens "
        "(the output-effect probe) and write them into the bundle, which is rewritten in place; a bundle "
        "built before the probe gets calibrated clicks this way.",
    )  # fmt: skip
    parser.add_argument("bundle", help="bundle folder (its manifest names the model and SAE)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(run=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from build_map.features.probe_config import CLEAR_STEERABILITY
    from build_map.pipeline.reprobe import reprobe_bundle

    summary, share = reprobe_bundle(args.bundle, device=args.device)
    how = (
        "cached"
        if summary.cached
        else f"{summary.seconds:.0f} s, {summary.positions_per_second:.0f} positions/s"
    )
    print(f"output probe: {summary.n_probed} features ({how}); {100 * share:.0f}% steer clearly at their "
          f"steer_strength (one click moves >= {100 * CLEAR_STEERABILITY:.0f}% of next-token probability onto "
          f"their own words); wrote {args.bundle}")  # fmt: skip
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from build_map.pipeline.demo import DEMO_STATS_TOKENS

    parser = subparsers.add_parser(
        "demo", parents=[common_options()], help="the embedded default end to end (cached), optionally served",
        description="Train (or reuse) the demo SAE on layer 22 of SmolLM2-135M-Instruct, build its bundle "
        "into the cache (or --out), and with --serve start the explorer on it.",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="bundle folder (default: in the user cache, reused)")
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild the bundle even if a cached one exists"
    )
    parser.add_argument("--retrain", action="store_true", help="retrain the demo SAE even if one is cached")
    parser.add_argument("--tokens", type=count, default=DEMO_STATS_TOKENS, dest="n_tokens",
                        help=f"corpus tokens for the statistics (default: {DEMO_STATS_TOKENS:,})")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--serve", action="store_true", help="start the explorer on the bundle afterwards")
    parser.add_argument(
        "--host", default="127.0.0.1", help="with --serve: address to bind (default: localhost)"
    )
    parser.add_argument("--port", type=int, default=5006, help="with --serve: port (default: 5006)")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from build_map.pipeline.demo import demo_bundle

    out, summary = demo_bundle(args.out, args.n_tokens, args.device, args.rebuild, args.retrain)
    if summary is None:
        print(f"Using the cached demo bundle {out} (pass --rebuild to rebuild it)")
    else:
        print("\n".join(summary.lines()))
    if not args.serve:
        print(f"Serve it with: explore {out}")
        return 0
    serve_demo([str(out), "--host", args.host, "--port", str(args.port), "--device", args.device])
    return 0  # not reached: serve_demo replaces this process


def serve_demo(explore_args: list[str]) -> None:
    """Hand over to ``explore`` in this process's place. The builder never imports the explorer
    (it sits above the library); replacing the process also frees the build's memory first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "explorer", *explore_args])
