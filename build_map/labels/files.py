"""Label and hide files: published labels (CSV, JSON, Parquet) and moderation lists of feature ids."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from build_map.labels.text import clean_label

logger = logging.getLogger(__name__)

LABEL_EXTENSIONS = (".csv", ".json", ".parquet", ".pq")
HIDE_TEXT_EXTENSIONS = ("", ".txt", ".ids", ".lst")


class LabelFileError(ValueError):
    """A label or hide file cannot be used; the message names the file and the fix."""


def read_label_file(path: str | Path, n_features: int) -> pd.Series:
    """Labels from a CSV, JSON or Parquet file with columns feature,label → Series indexed by feature.

    JSON may also be a list of ``{"feature": …, "label": …}`` objects or a ``{"12": "label"}`` mapping.
    """
    path = Path(path)
    frame = _read_table(path, LABEL_EXTENSIONS, "label")
    missing = [column for column in ("feature", "label") if column not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise LabelFileError(
            f"{path}: missing column(s) {', '.join(missing)}; a label file needs columns feature,label "
            f"(found: {found})."
        )
    ids = _feature_ids(frame["feature"].tolist(), path, n_features)
    labels = [clean_label(text) for text in frame["label"].tolist()]
    chosen: dict[int, str] = {}
    empty = 0
    for feature, label in zip(ids, labels, strict=True):
        if not label:
            empty += 1
            continue
        if feature in chosen and chosen[feature] != label:
            raise LabelFileError(
                f"{path}: feature {feature} has conflicting labels {chosen[feature]!r} and {label!r}; "
                "keep one row per feature."
            )
        chosen[feature] = label
    if empty:
        logger.info("%s: %d rows with an empty label were skipped", path, empty)
    return pd.Series(chosen, dtype=object, name="label").sort_index()


def read_hide_file(path: str | Path, n_features: int) -> set[int]:
    """Feature ids to hide: text with one id per line (``#`` comments allowed), a CSV with a
    ``feature`` column (or a single column of ids), or a JSON list of ids."""
    path = Path(path)
    _check_exists(path, "hide")
    suffix = path.suffix.lower()
    if suffix in HIDE_TEXT_EXTENSIONS:
        lines = [line.split("#", 1)[0].strip() for line in _read_text(path).splitlines()]
        values: list = [line for line in lines if line]
    elif suffix == ".csv":
        frame = _read_table(path, (".csv",), "hide")
        if "feature" in frame.columns:
            values = frame["feature"].tolist()
        elif len(frame.columns) == 1:  # a headerless column of ids: the header is an id too
            frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
            values = frame.iloc[:, 0].tolist()
        else:
            raise LabelFileError(
                f"{path}: a hide CSV needs a 'feature' column (found: {', '.join(map(str, frame.columns))})."
            )
    elif suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise LabelFileError(f"{path}: a hide JSON file must be a list of feature ids, e.g. [3, 17].")
        values = [item.get("feature") if isinstance(item, dict) else item for item in data]
    else:
        raise LabelFileError(
            f"{path}: unknown hide file type {suffix!r}; use a .txt file with one id per line, "
            "a .csv with a feature column, or a .json list of ids."
        )
    return set(_feature_ids(values, path, n_features))


def _check_exists(path: Path, kind: str) -> None:
    if not path.is_file():
        raise LabelFileError(f"The {kind} file {path} does not exist; check the path.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path}: not UTF-8 text ({exc}).") from exc


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LabelFileError(f"{path}: not valid JSON ({exc}).") from exc


def _read_table(path: Path, extensions: tuple[str, ...], kind: str) -> pd.DataFrame:
    _check_exists(path, kind)
    suffix = path.suffix.lower()
    if suffix not in extensions:
        raise LabelFileError(
            f"{path}: unknown {kind} file type {suffix!r}; use {', '.join(extensions)} "
            "with columns feature,label."
        )
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many error types for a malformed file
        raise LabelFileError(f"{path}: cannot read it as {suffix[1:]} ({exc}).") from exc
    return _json_labels(path, _read_json(path))


def _json_labels(path: Path, data: object) -> pd.DataFrame:
    if isinstance(data, dict):
        return pd.DataFrame({"feature": list(data.keys()), "label": list(data.values())})
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return pd.DataFrame.from_records(data, columns=sorted({key for item in data for key in item}))
    raise LabelFileError(
        f'{path}: a label JSON file must be a list of {{"feature": id, "label": text}} objects '
        'or a {"id": "label"} mapping.'
    )


def _feature_ids(values: list, path: Path, n_features: int) -> list[int]:
    ids = []
    for row, value in enumerate(values, start=1):
        feature = _as_int(value)
        if feature is None:
            raise LabelFileError(f"{path}: feature ids must be integers; found {value!r} (entry {row}).")
        if not 0 <= feature < n_features:
            raise LabelFileError(
                f"{path}: feature id {feature} is out of range; valid ids are 0..{n_features - 1}."
            )
        ids.append(feature)
    return ids


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None
    text = str(value).strip()
    return int(text.split(".")[0]) if re.fullmatch(r"[+-]?\d+(\.0*)?", text) else None
