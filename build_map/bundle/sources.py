"""What a bundle was built from, as its manifest names it: the model, the hookpoint and the SAE.

  manifest["model"]["spec"]   HF id, folder or .gguf; None or "embedded" = the embedded default
  manifest["hookpoint"]       e.g. "model.layers.15"
  manifest["sae"]["path"]     SAE file or folder (relative paths: against the bundle folder first)
  manifest["sae"]["sha256"]   checked against the file, so stale bundles are caught
  manifest["sae"]["format"]   informational (load_sae detects the format)

Explicit overrides (``--model``, ``--sae``) win; an SAE other than the bundle's is refused unless
it was asked for explicitly (then only a warning: the map describes the other SAE's features).
"""

from __future__ import annotations

import logging
from pathlib import Path

from build_map.bundle.read import Bundle
from build_map.bundle.schema import MANIFEST, BundleError
from build_map.common.files import file_sha256

logger = logging.getLogger(__name__)

EMBEDDED_SPECS = (None, "", "embedded", "default")


class BundleSourceError(BundleError):
    """The model, hookpoint or SAE a bundle names cannot be used; the message says what to pass."""


def stored_model_spec(spec: str | None) -> str | None:
    """A model spec as a manifest stores it: local folders and files as absolute paths, so the
    explorer finds them from any working directory; Hugging Face ids as given."""
    return str(Path(spec).resolve()) if spec is not None and Path(spec).exists() else spec


def model_spec(bundle: Bundle, override: str | None = None) -> str | None:
    """The model to load: ``override``, else the manifest's (None: the embedded default)."""
    if override:
        return override
    spec = (bundle.manifest.get("model") or {}).get("spec")
    return None if spec in EMBEDDED_SPECS else str(spec)


def hookpoint(bundle: Bundle) -> str:
    value = bundle.manifest.get("hookpoint")
    if not value:
        raise BundleSourceError(f"{bundle.path / MANIFEST} names no hookpoint; rebuild the bundle.")
    return str(value)


def sae_path(bundle: Bundle, override: str | None = None) -> Path:
    """The SAE file or folder: ``override`` (which must exist), else the manifest's."""
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise BundleSourceError(f"--sae {override}: no such file or folder.")
        return path
    raw = (bundle.manifest.get("sae") or {}).get("path")
    if not raw:
        raise BundleSourceError(f"{bundle.path / MANIFEST} names no SAE (sae.path); pass --sae PATH.")
    path = Path(raw).expanduser()
    candidates = [path] if path.is_absolute() else [bundle.path / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise BundleSourceError(
        f"The SAE this bundle was built from is not at {raw} (manifest sae.path); pass --sae PATH to it."
    )


def check_sae_hash(bundle: Bundle, path: Path, explicit: bool) -> None:
    """Refuse an SAE other than the bundle's (its map would describe other features)."""
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
    raise BundleSourceError(f"{message}. Rebuild the bundle for this SAE, or pass --sae to use it anyway.")
