"""Label and hide files: imported labels win, bad files fail clearly and name the fix."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from build_map.labels.contexts import context_labels
from build_map.labels.files import LabelFileError, read_hide_file, read_label_file
from build_map.labels.text import apply_labels
from tests.support.label_tables import N


@pytest.mark.parametrize("kind", ["csv", "json-list", "json-map", "parquet"])
def test_imported_labels_win(tmp_path, label_tables, kind):
    features, examples = label_tables
    rows = pd.DataFrame({"feature": [0, 3, 7], "label": ["Food words", "dead but named", "<b>x</b>\x07"]})
    if kind == "csv":
        path = tmp_path / "labels.csv"
        rows.to_csv(path, index=False)
    elif kind == "json-list":
        path = tmp_path / "labels.json"
        path.write_text(json.dumps(rows.to_dict(orient="records")))
    elif kind == "json-map":
        path = tmp_path / "labels.json"
        path.write_text(
            json.dumps({str(f): label for f, label in zip(rows.feature, rows.label, strict=True)})
        )
    else:
        path = tmp_path / "labels.parquet"
        rows.to_parquet(path)
    imported = read_label_file(path, N)
    assert imported.to_dict() == {0: "Food words", 3: "dead but named", 7: "<b>x</b>"}
    out = apply_labels(features, context_labels(features, examples), imported)
    assert out.loc[0, "label"] == "Food words" and out.loc[0, "label_source"] == "imported"
    assert out.loc[3, "label"] == "dead but named"
    assert out.loc[1, "label_source"] == "auto"
    assert (out["label_source"] == "imported").sum() == 3


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("labels.txt", "0,a\n", r"unknown label file type '\.txt'; use \.csv"),
        ("labels.csv", "id,label\n0,a\n", r"missing column\(s\) feature"),
        ("labels.csv", "feature,name\n0,a\n", r"missing column\(s\) label"),
        ("labels.csv", "feature,label\nfirst,a\n", r"feature ids must be integers; found 'first'"),
        ("labels.csv", "feature,label\n10,a\n", r"feature id 10 is out of range; valid ids are 0\.\.9"),
        ("labels.json", '[{"feature": -1, "label": "a"}]', r"out of range; valid ids are 0\.\.9"),
        ("labels.json", '{"2.5": "a"}', "must be integers"),
        ("labels.json", '"just text"', "must be a list of"),
        ("labels.json", "{not json", "not valid JSON"),
        ("labels.csv", "feature,label\n1,a\n1,b\n", "feature 1 has conflicting labels 'a' and 'b'"),
    ],
)
def test_bad_label_files(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(LabelFileError, match=message) as info:
        read_label_file(path, N)
    assert str(path) in str(info.value)


def test_label_file_missing_and_duplicates(tmp_path):
    with pytest.raises(LabelFileError, match=r"does not exist") as info:
        read_label_file(tmp_path / "nope.csv", N)
    assert "nope.csv" in str(info.value)
    same = _write(tmp_path, "same.csv", "feature,label\n1,a\n1,a\n2,\n")
    assert read_label_file(same, N).to_dict() == {1: "a"}  # identical duplicates and empty labels are fine


def test_hide_files(tmp_path):
    text = _write(tmp_path, "hide.txt", "# features to hide\n3\n\n 7  # too spicy\n3\n")
    assert read_hide_file(text, N) == {3, 7}
    assert read_hide_file(_write(tmp_path, "h.csv", "feature,why\n1,x\n2,y\n"), N) == {1, 2}
    assert read_hide_file(_write(tmp_path, "bare.csv", "4\n5\n"), N) == {4, 5}
    assert read_hide_file(_write(tmp_path, "h.json", "[0, 9]"), N) == {0, 9}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("hide.txt", "1\nten\n", r"feature ids must be integers; found 'ten'"),
        ("hide.txt", "12\n", r"valid ids are 0\.\.9"),
        ("hide.json", '{"hide": [1]}', "must be a list of feature ids"),
        ("hide.csv", "a,b\n1,2\n", "needs a 'feature' column"),
        ("hide.xlsx", "1", r"unknown hide file type '\.xlsx'"),
    ],
)
def test_bad_hide_files(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(LabelFileError, match=message) as info:
        read_hide_file(path, N)
    assert str(path) in str(info.value)
    with pytest.raises(LabelFileError, match="does not exist"):
        read_hide_file(tmp_path / "missing.txt", N)
