"""Labels a user fixed in the explorer, kept beside the bundle in ``NAME.labels.csv``.

Beside, not inside: a rebuild replaces the bundle folder atomically (``bundle.write``), which
would take edits stored inside with it. The file sits in the bundle's parent folder, holds one
``feature,label`` row per edited feature (UTF-8, written through a temporary file and a rename)
and is the label-file format ``build-map build --labels`` reads, so a rebuild can take it in.

This room sits below ``build_map.labels``, so it cannot use ``labels.files`` or ``labels.text``:
it reads the two columns itself, and the text given to ``save_label_edit`` is expected to be
cleaned already (the explorer cleans it with ``labels.text.clean_label``). A label read back is
only trimmed; renderers escape it like every other label.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path

import pandas as pd

from build_map.common.files import write_text_atomic

EDITED = "edited"
"""``label_source`` of a label the user set."""
SUFFIX = ".labels.csv"

_SAVING = threading.Lock()  # sessions of one server save through one read-modify-write at a time


class LabelEditsError(ValueError):
    """A label-edits file cannot be used; the message names the file and says what to do."""


def label_edits_path(bundle_path: str | os.PathLike) -> Path:
    """``PARENT/NAME.labels.csv`` for the bundle folder ``PARENT/NAME`` (``.`` and ``..`` resolved)."""
    folder = Path(os.path.abspath(bundle_path))
    return folder.with_name(folder.name + SUFFIX)


def read_label_edits(bundle_path: str | os.PathLike, n_features: int) -> dict[int, str]:
    """The saved edits, ``{feature: label}``; {} when there is no file. Rows with an empty label
    are skipped (as ``--labels`` skips them)."""
    path = label_edits_path(bundle_path)
    if not path.is_file():
        return {}
    fix = f"fix it (columns feature,label; ids 0..{n_features - 1}) or move it away; it is left as it is"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, csv.Error) as exc:  # pandas' parser errors are ValueErrors
        raise LabelEditsError(f"{path}: cannot read it as CSV ({exc}); {fix}.") from None
    if not {"feature", "label"} <= set(frame.columns):
        raise LabelEditsError(
            f"{path}: needs columns feature,label (found: {', '.join(frame.columns)}); {fix}."
        )
    edits: dict[int, str] = {}
    for value, label in zip(frame["feature"], frame["label"], strict=True):
        text = str(value).strip()
        if not text.isdigit() or int(text) >= n_features:
            raise LabelEditsError(f"{path}: feature id {value!r} is not one of this bundle's; {fix}.")
        if str(label).strip():
            edits[int(text)] = str(label).strip()
    return edits


def save_label_edit(
    bundle_path: str | os.PathLike, feature: int, label: str, n_features: int
) -> dict[int, str]:
    """Record ``label`` for ``feature`` ("" removes its row: the built label again) and return all
    edits. A file that cannot be read is a ``LabelEditsError`` and is never overwritten."""
    if not 0 <= int(feature) < n_features:
        raise LabelEditsError(
            f"Feature {feature} is out of range: this bundle has features 0..{n_features - 1}."
        )
    with _SAVING:
        edits = read_label_edits(bundle_path, n_features)
        if label.strip():
            edits[int(feature)] = label.strip()
        else:
            edits.pop(int(feature), None)
        path = label_edits_path(bundle_path)
        if edits:
            write_text_atomic(path, _csv_text(edits))
        else:
            path.unlink(missing_ok=True)  # nothing edited any more: no file to pick up
    return edits


def _csv_text(edits: dict[int, str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["feature", "label"])
    writer.writerows(sorted(edits.items()))
    return out.getvalue()


def set_label(features: pd.DataFrame, built: dict[int, tuple[str, str]], feature: int, label: str) -> None:
    """Show ``label`` for ``feature`` in ``features`` (source "edited"), in place, keeping the built
    label and source in ``built`` the first time; "" puts the built ones back."""
    label_col, source_col = features.columns.get_loc("label"), features.columns.get_loc("label_source")
    if label:
        built.setdefault(feature, (features.iat[feature, label_col], features.iat[feature, source_col]))
        features.iat[feature, label_col], features.iat[feature, source_col] = label, EDITED
    elif feature in built:
        features.iat[feature, label_col], features.iat[feature, source_col] = built.pop(feature)
