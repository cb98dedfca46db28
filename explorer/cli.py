"""``explore BUNDLE``: load a map bundle, its model and SAE, and serve the explorer.

The bundle's manifest names what to load (``--model`` / ``--sae`` override it):
  manifest["model"]["spec"]   HF id, folder or .gguf; None or "embedded" = the embedded default
  manifest["hookpoint"]       e.g. "model.layers.15"
  manifest["sae"]["path"]     SAE file or folder (relative paths: against the bundle folder first)
  manifest["sae"]["sha256"]   checked against the file, so stale bundles are caught
  manifest["sae"]["format"]   informational (load_sae detects the format)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from build_map.bundle import Bundle, BundleError, load_bundle

logger = logging.getLogger(__name__)

EMBEDDED_SPECS = (None, "", "embedded", "default")


class ExploreError(ValueError):
    """The explorer cannot start; the message says what to pass instead."""


def _origin(text: str) -> str:
    from explorer.server import check_origin

    try:
        return check_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    parser.add_argument("--port", type=int, default=5006, help="port (default 5006; 0 picks a free one)")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        type=_origin,
        metavar="HOST[:PORT]",
        help="also accept pages served under this name (a proxy or DNS alias); repeatable",
    )
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
    parser.add_argument("--no-show", action="store_true", help="do not open a browser tab")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def model_spec(bundle: Bundle, override: str | None) -> str | None:
    if override:
        return override
    spec = (bundle.manifest.get("model") or {}).get("spec")
    return None if spec in EMBEDDED_SPECS else str(spec)


def sae_path(bundle: Bundle, override: str | None) -> Path:
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise ExploreError(f"--sae {override}: no such file or folder.")
        return path
    raw = (bundle.manifest.get("sae") or {}).get("path")
    if not raw:
        raise ExploreError(f"{bundle.path / 'manifest.json'} names no SAE (sae.path); pass --sae PATH.")
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else [bundle.path / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ExploreError(
        f"The SAE this bundle was built from is not at {raw} (manifest sae.path); pass --sae PATH to it."
    )


def check_sae_hash(bundle: Bundle, path: Path, explicit: bool) -> None:
    """Refuse an SAE other than the bundle's (its map would describe other features)."""
    from build_map.sae import file_sha256

    expected = (bundle.manifest.get("sae") or {}).get("sha256")
    if not expected:
        return
    actual = file_sha256(path)
    if actual == expected:
        return
    message = (
        f"{path} (sha256 {actual[:12]}…) is not the SAE this bundle was built from (sha256 {expected[:12]}…)"
    )
    if explicit:
        logger.warning("%s; using it as you asked, but the map and cards describe the other SAE.", message)
        return
    raise ExploreError(f"{message}. Rebuild the bundle for this SAE, or pass --sae to use it anyway.")


def load_shared(args: argparse.Namespace):
    """Bundle, model, SAE, engine: everything the sessions share."""
    from explorer.app import SharedState
    from explorer.chat import ReplyFeatures
    from explorer.session import load_parts, make_engine

    bundle = load_bundle(args.bundle)
    loaded, sae, hookpoint = load_parts(
        bundle, device=args.device, dtype=args.dtype, model=args.model, sae=args.sae
    )
    engine = make_engine(bundle, loaded, sae, hookpoint)
    title = f"SAE feature explorer — {bundle.path.name}"
    return SharedState(bundle, engine, ReplyFeatures(engine, bundle), title=title)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from build_map.models import HookpointError, ModelLoadError
    from build_map.sae import SAEError
    from explorer.server import make_server, run, url_for
    from explorer.steering import SteeringError

    try:
        shared = load_shared(args)
    except (BundleError, ExploreError, ModelLoadError, HookpointError, SAEError, SteeringError) as exc:
        print(f"explore: error: {exc}", file=sys.stderr)
        return 2
    try:
        server = make_server(
            shared, host=args.host, port=args.port, show=not args.no_show, allowed_origins=args.allow_origin
        )
    except OSError as exc:
        print(
            f"explore: error: cannot listen on {args.host}:{args.port} ({exc}); pass another --port.",
            file=sys.stderr,
        )
        return 2
    print(f"Explorer ready at {url_for(args.host, server.port)}  (Ctrl+C to stop)", flush=True)
    try:
        run(server)
    finally:
        shared.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
