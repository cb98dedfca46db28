"""The bundle contract: atomic writes, versioning, schema."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from build_map.bundle.read import load_bundle
from build_map.bundle.schema import PROBE_SCHEMA, BundleError, cluster_columns
from build_map.bundle.write import write_bundle


def synthetic_tables(n: int = 6):
    features = pd.DataFrame(
        {
            "feature": np.arange(n),
            "x": np.linspace(0, 1, n),
            "y": np.linspace(1, 0, n),
            "label": [f"feature {i}" for i in range(n)],
            "label_source": "auto",
            "density": 0.01,
            "max_act": 2.0,
            "mean_act": 1.0,
            "top_tokens": [["a", "b"]] * n,
            "top_logits": [["c"]] * n,
            "bottom_logits": [["d"]] * n,
            "neighbors": [[(i + 1) % n] for i in range(n)],
            "dead": False,
            "hidden": False,
            "cluster_0": "all",
            "cluster_1": ["left" if i < n // 2 else "right" for i in range(n)],
        }
    )
    examples = pd.DataFrame(
        {
            "feature": [0, 0],
            "rank": [0, 0],
            "bucket": ["top", "q50"],
            "act": [2.0, 1.0],
            "tokens": [["x", "y"], ["z"]],
            "acts": [[0.0, 2.0], [1.0]],
        }
    )
    clusters = pd.DataFrame(
        {
            "level": [0, 1, 1],
            "cluster": [0, 0, 1],
            "name": ["all", "left", "right"],
            "size": [n, n // 2, n - n // 2],
            "x": 0.5,
            "y": 0.5,
            "parent": [-1, 0, 0],
        }
    )
    return features, examples, clusters


def _write(out, overwrite=False, render=None, **overrides):
    features, examples, clusters = synthetic_tables()
    tables = {"features": features, "examples": examples, "clusters": clusters, **overrides}
    render = render or (lambda folder: (folder / "map.html").write_text("<html></html>"))
    return write_bundle(
        out, manifest={"model": {"spec": "tiny"}}, render_map=render, overwrite=overwrite, **tables
    )


def test_round_trip_schema(tmp_path):
    bundle = load_bundle(_write(tmp_path / "b"))
    assert bundle.n_features == 6
    assert cluster_columns(bundle.features) == ["cluster_0", "cluster_1"]
    assert bundle.manifest["format_version"] == 1
    schema = pq.read_schema(tmp_path / "b" / "features.parquet")
    assert str(schema.field("x").type) == "float"
    assert str(schema.field("neighbors").type) == "list<element: int32>"
    assert list(bundle.examples_for(0)["bucket"]) == ["top", "q50"]
    with pytest.raises(BundleError, match=r"out of range: this bundle has features 0\.\.5"):
        bundle.check_feature(6)


def test_existing_output_needs_overwrite(tmp_path):
    _write(tmp_path / "b")
    with pytest.raises(BundleError, match="--overwrite"):
        _write(tmp_path / "b")
    _write(tmp_path / "b", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failure_leaves_no_half_written_bundle(tmp_path):
    def broken(folder):
        raise RuntimeError("map failed")

    with pytest.raises(RuntimeError):
        _write(tmp_path / "b", render=broken)
    assert list(tmp_path.iterdir()) == []
    _write(tmp_path / "b")
    with pytest.raises(RuntimeError):
        _write(tmp_path / "b", overwrite=True, render=broken)
    assert load_bundle(tmp_path / "b").n_features == 6  # the old bundle survives


def test_a_bundle_left_as_dot_old_by_a_kill_is_restored_by_explore_or_the_next_build(tmp_path):
    _write(tmp_path / "b")
    (tmp_path / "b").rename(tmp_path / ".b.old")  # killed between the two renames of a replace
    assert load_bundle(tmp_path / "b").n_features == 6  # what `explore` does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    (tmp_path / "b").rename(tmp_path / ".b.old")
    with pytest.raises(BundleError, match="--overwrite"):  # the build sees the restored bundle
        _write(tmp_path / "b")
    _write(tmp_path / "b", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_unknown_format_version(tmp_path):
    out = _write(tmp_path / "b")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(out)


def test_missing_bundle_and_files(tmp_path):
    with pytest.raises(BundleError, match="No bundle at"):
        load_bundle(tmp_path / "nothing")
    out = _write(tmp_path / "b")
    (out / "examples.parquet").unlink()
    with pytest.raises(BundleError, match="missing examples.parquet"):
        load_bundle(out)


def test_bundles_built_before_the_probe_open_with_the_default_click(tmp_path):
    """A features.parquet without the probe's columns (written by an older build) still loads: not
    probed, no click strength, so clicks fall back to the default strength with a note."""
    from build_map.steering.click import click_strength, is_calibrated
    from build_map.steering.requests import DEFAULT_STRENGTH

    out = _write(tmp_path / "old")
    table = pq.read_table(out / "features.parquet")
    pq.write_table(table.drop_columns(PROBE_SCHEMA.names), out / "features.parquet")
    old = load_bundle(out)
    assert not old.probed and old.features["steer_strength"].isna().all()
    assert old.features["output_promotes"].map(len).eq(0).all()
    assert click_strength(old, 2) == DEFAULT_STRENGTH and not is_calibrated(old, 2)

    features, _, _ = synthetic_tables()
    features["steer_strength"] = np.float32(2.8284)
    features["steerability"], features["steer_kl"] = 0.3, 1.1
    features["output_promotes"] = [["music"]] * len(features)
    features["output_suppresses"] = [["never"]] * len(features)
    new = load_bundle(_write(tmp_path / "new", features=features))
    assert new.probed and click_strength(new, 2) == 2.8284 and is_calibrated(new, 2)
    assert list(new.features.at[0, "output_promotes"]) == ["music"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    """--overwrite on a user's folder (here: a thesis) is refused, and the folder is untouched."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    with pytest.raises(BundleError, match=r"holds files but is not a bundle.*choose another --out"):
        _write(folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "three years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_bundle(_write(empty, overwrite=True)).n_features == 6  # an empty folder is fine
    assert load_bundle(_write(empty, overwrite=True)).n_features == 6  # and so is a bundle


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("manifest.json", "[1, 2]", r"holds a JSON list, not the manifest object; rebuild"),
        ("features.parquet", None, r"features.parquet cannot be read .*truncated: rebuild"),
        ("clusters.parquet", b"PAR1 not really", r"clusters.parquet cannot be read .*truncated: rebuild"),
        ("manifest.json", '{"format_version": 1, "n_features": 5000}', r"says 5000 features but .* 6 rows"),
    ],
)
def test_a_damaged_bundle_is_one_clear_error(tmp_path, name, content, message):
    out = _write(tmp_path / "b")
    target = out / name
    if content is None:  # truncated
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(out)
