"""``build-map build`` and ``build-map demo``: from an SAE to a bundle (and, for the demo, a server)."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

from build_map.build import BuildConfig, build_bundle
from build_map.cli import add_config_argument, common_options, count, source_list

logger = logging.getLogger(__name__)

DEMO_STATS_TOKENS = 100_000
_DEMO_BUNDLE_VERSION = "3"  # bump when the builder's output changes, to rebuild cached demo bundles


def add_build(subparsers: argparse._SubParsersAction) -> None:
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
    _add_build_options(parser)
    parser.set_defaults(run=run_build)


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, BuildConfig, "n_tokens", "--tokens", type=count)
    parser.add_argument("--corpus", type=source_list, default=BuildConfig.corpus, help="comma-separated sources: "
                        "chitchat, chatterbot, .jsonl or text files (default: chitchat,chatterbot)")  # fmt: skip
    add_config_argument(parser, BuildConfig, "labels", "--labels")
    add_config_argument(parser, BuildConfig, "hide", "--hide")
    add_config_argument(parser, BuildConfig, "llm_labels", "--llm-labels", action="store_true")
    add_config_argument(parser, BuildConfig, "device", "--device")
    add_config_argument(parser, BuildConfig, "overwrite", "--overwrite", action="store_true")
    add_config_argument(parser, BuildConfig, "title", "--title")
    add_config_argument(parser, BuildConfig, "seed", "--seed", type=int)


def _config(args: argparse.Namespace, **overrides) -> BuildConfig:
    values = {name: getattr(args, name) for name in BuildConfig.__dataclass_fields__ if hasattr(args, name)}
    values["corpus"] = tuple(args.corpus)
    return BuildConfig(**{**values, **overrides})


def run_build(args: argparse.Namespace) -> int:
    summary = build_bundle(_config(args))
    print("\n".join(summary.lines()))
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[common_options()], help="the embedded default end to end (cached), optionally served",
        description="Train (or reuse) the demo SAE on SmolLM2-135M-Instruct's middle layer, build its bundle "
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


def demo_bundle_folder(sae_folder: Path, n_tokens: int) -> Path:
    from build_map.paths import cache_dir

    key = hashlib.sha256(f"{sae_folder.name}|{n_tokens}|{_DEMO_BUNDLE_VERSION}".encode()).hexdigest()[:12]
    return cache_dir("demo") / f"bundle-{key}"


def run_demo(args: argparse.Namespace) -> int:
    from build_map.bundle import MANIFEST
    from build_map.demo_sae import DEMO_HOOKPOINT, demo_sae

    sae_folder = demo_sae(device=args.device, retrain=args.retrain)
    out = Path(args.out) if args.out else demo_bundle_folder(sae_folder, args.n_tokens)
    if (out / MANIFEST).is_file() and not (args.rebuild or args.retrain):
        print(f"Using the cached demo bundle {out} (pass --rebuild to rebuild it)")
    else:
        cfg = BuildConfig(sae=str(sae_folder), out=str(out), hookpoint=DEMO_HOOKPOINT, n_tokens=args.n_tokens,
                          device=args.device, overwrite=True)  # fmt: skip
        print("\n".join(build_bundle(cfg).lines()))
    if args.serve:
        from explorer.cli import main as explore_main

        return explore_main(
            [str(out), "--host", args.host, "--port", str(args.port), "--device", args.device]
        )
    print(f"Serve it with: explore {out}")
    return 0
