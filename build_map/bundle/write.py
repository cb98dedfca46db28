"""Writing a bundle: into a temporary sibling folder, validated by reading it back, then renamed
into place, so a failed build never leaves a half-written bundle and an existing one survives."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from build_map.bundle.read import load_bundle
from build_map.bundle.schema import (
    CLUSTER_SCHEMA,
    CLUSTERS,
    EXAMPLE_SCHEMA,
    EXAMPLES,
    FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    add_probe_defaults,
    add_score_defaults,
    cluster_columns,
    features_schema,
)
from build_map.common.files import atomic_folder, recover_folder


def check_can_write(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any expensive work) when ``out`` exists and may not be replaced. A
    bundle an interrupted replace left as ``.NAME.old`` is put back first."""
    out = Path(out)
    recover_folder(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()) and not is_bundle_folder(out):
        raise BundleError(
            f"{out} holds files but is not a bundle (no {MANIFEST} with a format_version), so --overwrite "
            "will not replace it: choose another --out, or empty that folder yourself."
        )
    return out


def is_bundle_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a bundle (its manifest names a format version): the only kind of
    folder ``--overwrite`` may replace."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def write_bundle(
    out: str | Path,
    *,
    manifest: dict,
    features: pd.DataFrame,
    examples: pd.DataFrame,
    clusters: pd.DataFrame,
    render_map: Callable[[Path], None],
    overwrite: bool = False,
) -> Path:
    """Write every file into a temporary sibling folder, then rename it into place.

    ``render_map(folder)`` writes map.html into the temporary folder. A feature table without the
    probe's columns is written as not probed (``add_probe_defaults``), one without label scores as
    not scored.
    """
    out = check_can_write(out, overwrite)
    features = features.copy()
    add_probe_defaults(features)
    add_score_defaults(features)
    n_levels = len(cluster_columns(features))
    with atomic_folder(out) as tmp:
        _write_table(features, features_schema(n_levels), tmp / FEATURES)
        _write_table(examples, EXAMPLE_SCHEMA, tmp / EXAMPLES)
        _write_table(clusters, CLUSTER_SCHEMA, tmp / CLUSTERS)
        render_map(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION}, indent=2))
        load_bundle(tmp, label_edits=False)  # never publish a bundle the explorer cannot read
    return out


def _write_table(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise BundleError(f"Internal error: {path.name} is missing columns {', '.join(missing)}.")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path, compression="zstd")
