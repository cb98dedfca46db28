"""``build-map sweep``: a bad --out is one clear line before the model loads."""

from __future__ import annotations

from build_map.cli.main import main


def test_sweep_out_that_is_a_file_is_refused_first(tiny_bundle_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["sweep", str(tiny_bundle_dir), "--feature", "1", "--out", str(a_file)]) == 2
    assert "is a file; the sweep writes a folder" in capsys.readouterr().err
    assert main(["sweep", str(tiny_bundle_dir), "--feature", "1", "--out", str(a_file / "sub")]) == 2
    assert "cannot be made" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
