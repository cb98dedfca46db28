"""The map bundle: the one contract between the builder and the explorer.

BUNDLE/
  manifest.json     how the bundle was made (model, hookpoint, SAE source/format/sha256, ...)
  features.parquet  one row per feature (FEATURE_SCHEMA plus cluster_0..cluster_{L-1}, coarse→fine)
  examples.parquet  activating contexts per feature (EXAMPLE_SCHEMA)
  clusters.parquet  one row per named cluster per level (CLUSTER_SCHEMA)
  map.html          the DataMapPlot map

Bundles are written into a temporary sibling folder and renamed into place only when complete,
so a failed build never leaves a half-written bundle behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.parquet"
EXAMPLES = "examples.parquet"
CLUSTERS = "clusters.parquet"
MAP_HTML = "map.html"
REQUIRED_FILES = (MANIFEST, FEATURES, EXAMPLES, CLUSTERS, MAP_HTML)

FEATURE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("label", pa.string()),
        ("label_source", pa.string()),  # auto | imported | llm
        ("density", pa.float32()),  # fraction of tokens where the feature is active
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),  # mean over the tokens where it is active
        ("top_tokens", pa.list_(pa.string())),  # tokens it fires on most
        ("top_logits", pa.list_(pa.string())),  # logit lens: tokens the direction promotes
        ("bottom_logits", pa.list_(pa.string())),  # ... and suppresses
        ("neighbors", pa.list_(pa.int32())),  # nearest features by decoder cosine
        ("dead", pa.bool_()),
        ("hidden", pa.bool_()),  # moderated out: not drawn, cannot be steered
    ]
)
EXAMPLE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("rank", pa.int32()),  # order within the bucket
        ("bucket", pa.string()),  # "top" or an activation quantile such as "q50"
        ("act", pa.float32()),  # the activation at the example's focus token
        ("tokens", pa.list_(pa.string())),
        ("acts", pa.list_(pa.float32())),  # per-token activation of this feature
    ]
)
CLUSTER_SCHEMA = pa.schema(
    [
        ("level", pa.int32()),  # 0 = coarsest
        ("cluster", pa.int32()),
        ("name", pa.string()),
        ("size", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("parent", pa.int32()),  # cluster id at level-1, -1 at level 0
    ]
)


class BundleError(ValueError):
    """A bundle is missing, incomplete, of another version, or would be overwritten."""


def cluster_columns(features: pd.DataFrame) -> list[str]:
    """``cluster_0`` (coarsest) … ``cluster_{L-1}`` (finest)."""
    names = [c for c in features.columns if c.startswith("cluster_") and c[8:].isdigit()]
    return sorted(names, key=lambda c: int(c[8:]))


def features_schema(n_levels: int) -> pa.Schema:
    schema = FEATURE_SCHEMA
    for level in range(n_levels):
        schema = schema.append(pa.field(f"cluster_{level}", pa.string()))
    return schema


@dataclass
class Bundle:
    path: Path
    manifest: dict
    features: pd.DataFrame
    clusters: pd.DataFrame
    _examples: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def cluster_columns(self) -> list[str]:
        return cluster_columns(self.features)

    @property
    def map_html(self) -> Path:
        return self.path / MAP_HTML

    @property
    def examples(self) -> pd.DataFrame:
        if self._examples is None:
            self._examples = pq.read_table(self.path / EXAMPLES).to_pandas()
        return self._examples

    def examples_for(self, feature: int) -> pd.DataFrame:
        rows = self.examples[self.examples["feature"] == feature]
        return rows.sort_values(
            ["bucket", "rank"], key=lambda s: s.map(_bucket_order) if s.name == "bucket" else s
        )

    def feature(self, feature: int) -> pd.Series:
        self.check_feature(feature)
        return self.features.iloc[feature]

    def check_feature(self, feature: int) -> None:
        if not 0 <= int(feature) < self.n_features:
            raise BundleError(
                f"Feature {feature} is out of range: this bundle has features 0..{self.n_features - 1}."
            )


def _bucket_order(bucket: str) -> float:
    """ "top" first, then quantile buckets from high to low."""
    return -1e9 if bucket == "top" else -float(bucket.lstrip("q") or 0)


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"No bundle at {path}; build one with `build-map build ... --out {path}` or `build-map demo`."
        )
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise BundleError(
            f"{path} is not a complete bundle: missing {', '.join(missing)}. Rebuild it with build-map."
        )
    manifest = read_manifest(path)
    features = pq.read_table(path / FEATURES).to_pandas()
    absent = [name for name in FEATURE_SCHEMA.names if name not in features.columns]
    if absent:
        raise BundleError(f"{path / FEATURES} lacks columns {', '.join(absent)}; rebuild the bundle.")
    if not (features["feature"].to_numpy() == range(len(features))).all():
        raise BundleError(f"{path / FEATURES} must hold one row per feature, in order; rebuild the bundle.")
    clusters = pq.read_table(path / CLUSTERS).to_pandas()
    return Bundle(path, manifest, features, clusters)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path / MANIFEST} cannot be read ({exc}); rebuild the bundle.") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format_version {version!r}; this version of the tool reads format_version "
            f"{FORMAT_VERSION}. Rebuild it with this version's `build-map build`, or use the matching tool version."
        )
    return manifest


def check_can_write(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any expensive work) when ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose another --out.")
    return out


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

    ``render_map(folder)`` writes map.html into the temporary folder.
    """
    out = check_can_write(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_levels = len(cluster_columns(features))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_table(features, features_schema(n_levels), tmp / FEATURES)
        _write_table(examples, EXAMPLE_SCHEMA, tmp / EXAMPLES)
        _write_table(clusters, CLUSTER_SCHEMA, tmp / CLUSTERS)
        render_map(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION}, indent=2))
        load_bundle(tmp)  # never publish a bundle the explorer cannot read
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_table(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise BundleError(f"Internal error: {path.name} is missing columns {', '.join(missing)}.")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path, compression="zstd")


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
