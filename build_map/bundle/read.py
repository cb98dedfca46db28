"""Reading a bundle: versioned, checked, examples loaded on first use."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from build_map.bundle.label_edits import (
    LabelEditsError,
    label_edits_path,
    read_label_edits,
    save_label_edit,
    set_label,
)
from build_map.bundle.schema import (
    CLUSTERS,
    EXAMPLES,
    FEATURE_SCHEMA,
    FEATURES,
    FORMAT_VERSION,
    MANIFEST,
    MAP_HTML,
    REQUIRED_FILES,
    BundleError,
    add_probe_defaults,
    add_score_defaults,
    cluster_columns,
)
from build_map.common.files import recover_folder

logger = logging.getLogger(__name__)


@dataclass
class Bundle:
    path: Path
    manifest: dict
    features: pd.DataFrame
    clusters: pd.DataFrame
    probed: bool = True
    """Whether the output-effect probe ran (bundles built before it have no steer_strength)."""
    _examples: pd.DataFrame | None = field(default=None, repr=False)
    built_labels: dict[int, tuple[str, str]] = field(default_factory=dict, repr=False)
    """(label, label_source) as built, of each feature whose label the user edited (``edit_label``)."""

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
            self._examples = _read_table(self.path / EXAMPLES)
        return self._examples

    def examples_for(self, feature: int) -> pd.DataFrame:
        rows = self.examples[self.examples["feature"] == feature]
        return rows.sort_values(
            ["bucket", "rank"], key=lambda s: s.map(_bucket_order) if s.name == "bucket" else s
        )

    def feature(self, feature: int) -> pd.Series:
        self.check_feature(feature)
        return self.features.iloc[feature]

    def search_labels(self, query: str) -> list[int]:
        """Visible features whose label contains ``query`` (case-insensitive), in feature order."""
        query = query.strip().casefold()
        if not query:
            return []
        labels = self.features["label"].fillna("").astype(str).str.casefold()
        match = labels.str.contains(query, regex=False).to_numpy() & ~self.features["hidden"].to_numpy(bool)
        return [int(i) for i in np.flatnonzero(match)]

    def edit_label(self, feature: int, label: str) -> str:
        """Save the user's ``label`` for ``feature`` beside the bundle (``label_edits``) and show it
        here at once; "" (or the built label itself) restores the built label. ``label`` should be
        cleaned first (``labels.text.clean_label``). Returns the label now shown."""
        self.check_feature(feature)
        feature = int(feature)
        if bool(self.features["hidden"].iat[feature]):
            raise LabelEditsError(f"Feature {feature} is hidden in this bundle; its label cannot be edited.")
        label = label.strip()
        built = self.built_labels.get(feature, (self.features["label"].iat[feature], None))[0]
        if label == str(built or "").strip():
            label = ""
        save_label_edit(self.path, feature, label, self.n_features)
        set_label(self.features, self.built_labels, feature, label)
        return str(self.features["label"].iat[feature] or "")

    def check_feature(self, feature: int) -> None:
        if not 0 <= int(feature) < self.n_features:
            raise BundleError(
                f"Feature {feature} is out of range: this bundle has features 0..{self.n_features - 1}."
            )


def _bucket_order(bucket: str) -> float:
    """ "top" first, then quantile buckets from high to low."""
    return -1e9 if bucket == "top" else -float(bucket.lstrip("q") or 0)


def load_bundle(path: str | Path, *, label_edits: bool = True) -> Bundle:
    """The bundle at ``path``, with the user's label edits beside it applied (``label_edits=False``:
    the labels as built, for code that rewrites the bundle)."""
    path = Path(path)
    if not path.exists():
        recover_folder(path)  # a kill between the two renames of a replace left .NAME.old
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
    features = _read_table(path / FEATURES)
    absent = [name for name in FEATURE_SCHEMA.names if name not in features.columns]
    if absent:
        raise BundleError(f"{path / FEATURES} lacks columns {', '.join(absent)}; rebuild the bundle.")
    if not (features["feature"].to_numpy() == range(len(features))).all():
        raise BundleError(f"{path / FEATURES} must hold one row per feature, in order; rebuild the bundle.")
    stated = manifest.get("n_features")
    if isinstance(stated, int) and stated != len(features):
        raise BundleError(
            f"{path / MANIFEST} says {stated} features but {path / FEATURES} holds {len(features)} rows; "
            "the bundle is damaged or mixed from two builds: rebuild it."
        )
    probed = add_probe_defaults(features)
    add_score_defaults(features)
    clusters = _read_table(path / CLUSTERS)
    bundle = Bundle(path, manifest, features, clusters, probed=probed)
    if label_edits:
        _apply_label_edits(bundle)
    return bundle


def _apply_label_edits(bundle: Bundle) -> None:
    """The saved edits, or none with a warning: a bad edits file must not keep the bundle shut."""
    try:
        edits = read_label_edits(bundle.path, bundle.n_features)
    except LabelEditsError as exc:
        logger.warning("%s Opening the bundle with its built labels.", exc)
        return
    for feature, label in edits.items():
        set_label(bundle.features, bundle.built_labels, feature, label)
    if edits:
        logger.info("Applied %d label edit(s) from %s", len(edits), label_edits_path(bundle.path))


def _read_table(file: Path) -> pd.DataFrame:
    """A Parquet table of the bundle; a truncated or corrupt file is a BundleError saying so."""
    try:
        return pq.read_table(file).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise BundleError(
            f"{file} cannot be read ({exc}); it may be truncated: rebuild the bundle."
        ) from None


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path / MANIFEST} cannot be read ({exc}); rebuild the bundle.") from exc
    if not isinstance(manifest, dict):
        raise BundleError(
            f"{path / MANIFEST} holds a JSON {type(manifest).__name__}, not the manifest object; rebuild the bundle."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format_version {version!r}; this version of the tool reads format_version "
            f"{FORMAT_VERSION}. Rebuild it with this version's `build-map build`, or use the matching tool version."
        )
    return manifest
