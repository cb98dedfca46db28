"""``explore BUNDLE``: load a map bundle, its model and SAE, and serve the explorer.

The bundle's manifest names what to load (``--model`` / ``--sae`` override it; see
``build_map.bundle.sources``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from build_map.cli.base import add_bundle_model_options, run_command

logger = logging.getLogger(__name__)


class ExploreError(ValueError):
    """The explorer cannot start; the message says what to pass instead."""


def _origin(text: str) -> str:
    from explorer.server import check_origin

    try:
        return check_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0: a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give 0 to 65535.") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {port} is out of range; give 0 to 65535 (0 picks a free one)."
        )
    return port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="explore",
        description="Serve a feature map bundle next to a steering chat (Panel).",
    )
    parser.add_argument(
        "bundle", help="bundle folder written by `build-map` (holds manifest.json, map.html, ...)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=port_number, default=5006, help="port (default 5006; 0 picks a free one)"
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        type=_origin,
        metavar="HOST[:PORT]",
        help="also accept pages served under this name (a proxy or DNS alias); repeatable",
    )
    add_bundle_model_options(parser)
    parser.add_argument("--no-show", action="store_true", help="do not open a browser tab")
    parser.add_argument("--backend", default="hf", choices=("hf", "eager", "vllm"),
                        help="who generates: hf (this project's engine, the default), eager or vllm "
                        "(interp-engine; vllm needs CUDA and the vllm extra). Pins, attribution and "
                        "sweeps run on the hf model either way.")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="with --backend vllm: GPUs to split the model across (e.g. 4 for 70B)")  # fmt: skip
    parser.add_argument("--history-tokens", type=_history_tokens, default=None, metavar="N",
                        help="prompt tokens a chat reply sees at most; older turns are left out and the chat "
                        "says so (default: 256; 0: no limit, each turn then re-reads the whole chat)")  # fmt: skip
    parser.add_argument("--no-memory-trim", action="store_true",
                        help="leave freed memory to glibc (no arena cap, no malloc_trim after replies): "
                        "only to measure what trimming saves (bench/bench_soak.py)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _history_tokens(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else -1
    if value < 0 or 0 < value < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (no limit) or a number of tokens from 32 up")
    return value


def load_shared(args: argparse.Namespace):
    """Bundle, model, SAE, engine: everything the sessions share."""
    from build_map.bundle.read import load_bundle
    from build_map.common.memory import limit_malloc_arenas
    from build_map.steering.requests import BatchingConfig
    from build_map.steering.session import backend_generator, load_parts, make_engine
    from build_map.steering.text_features import TextFeatures
    from explorer.ui.app import SharedState

    trim = not getattr(args, "no_memory_trim", False)
    if trim:
        limit_malloc_arenas(2)  # before the model's and the server's threads first allocate
    bundle = load_bundle(args.bundle)
    loaded, sae, hookpoint = load_parts(
        bundle, device=args.device, dtype=args.dtype, model=args.model, sae=args.sae
    )
    generator = backend_generator(
        bundle, loaded, getattr(args, "backend", "hf"), args.model, getattr(args, "tensor_parallel_size", 1)
    )
    engine = make_engine(
        bundle, loaded, sae, hookpoint, batching=BatchingConfig(trim_memory=trim), generator=generator
    )
    title = f"SAE feature explorer — {bundle.path.name}"
    history = getattr(args, "history_tokens", None)
    chat = {} if history is None else {"history_tokens": history or None}
    return SharedState(bundle, engine, TextFeatures(engine, bundle), title=title, **chat)


def serve(args: argparse.Namespace) -> int:
    from explorer.server import make_server, run, url_for

    shared = load_shared(args)
    try:
        try:
            server = make_server(
                shared,
                host=args.host,
                port=args.port,
                show=not args.no_show,
                allowed_origins=args.allow_origin,
            )
        except OSError as exc:
            raise ExploreError(
                f"cannot listen on {args.host}:{args.port} ({exc}); pass another --port."
            ) from exc
        print(f"Explorer ready at {url_for(args.host, server.port)}  (Ctrl+C to stop)", flush=True)
        run(server)
    finally:
        shared.engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(lambda: serve(args), prefix="explore: error: ")


if __name__ == "__main__":
    sys.exit(main())
