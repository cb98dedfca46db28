"""``build-map probe``: a bundle built before the probe gets calibrated clicks in place."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq

from build_map.bundle.read import load_bundle
from build_map.bundle.schema import PROBE_SCHEMA
from build_map.cli.main import main
from build_map.steering.click import is_calibrated


def test_probe_calibrates_an_old_bundle_in_place(tiny_bundle_dir, tmp_path, capsys):
    bundle_dir = tmp_path / "old"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    table = pq.read_table(bundle_dir / "features.parquet")
    pq.write_table(table.drop_columns(PROBE_SCHEMA.names), bundle_dir / "features.parquet")
    old = load_bundle(bundle_dir)
    assert not old.probed and not is_calibrated(old, 3)
    built_label = old.features.loc[3, "label"]
    old.edit_label(3, "my own label")  # kept beside the bundle, not baked into the rewrite

    assert main(["probe", str(bundle_dir), "--device", "cpu"]) == 0
    assert "output probe: " in capsys.readouterr().out
    new = load_bundle(bundle_dir)
    visible = ~new.features["dead"] & ~new.features["hidden"]
    assert new.probed and new.features.loc[visible, "steer_strength"].notna().all()
    assert new.features.loc[~visible, "steer_strength"].isna().all()
    assert new.manifest["probe"]["n_probed"] == int(visible.sum())
    assert new.examples.equals(old.examples) and new.clusters.equals(old.clusters)  # the rest is kept
    assert "Steerability" in (bundle_dir / "map.html").read_text(encoding="utf-8")
    assert pq.read_table(bundle_dir / "features.parquet").column("label")[3].as_py() == built_label
    assert new.features.loc[3, ["label", "label_source"]].tolist() == ["my own label", "edited"]
