"""`explore` on the command line: bad options and stale bundles fail with one clear line."""

from __future__ import annotations

import argparse
import json

import pytest

from build_map.bundle.read import load_bundle
from build_map.bundle.sources import BundleSourceError
from build_map.steering.requests import SamplingConfig
from explorer.cli import load_shared, main


def test_allow_origin_with_a_scheme_is_refused_clearly(capsys):
    from explorer.cli import parse_args

    assert parse_args(["b", "--allow-origin", "proxy.example:443"]).allow_origin == ["proxy.example:443"]
    with pytest.raises(SystemExit):
        parse_args(["b", "--allow-origin", "https://proxy.example/app"])
    assert "leave out the scheme" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_one_clear_line(port, capsys):
    from explorer.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["b", "--port", port])
    assert "give 0 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "kept"), [("0", 0), ("1024", 1024), ("7", None), ("-5", None), ("lots", None)]
)
def test_history_tokens_option(value, kept, capsys):
    from explorer.cli import parse_args

    if kept is not None:
        assert parse_args(["b", "--history-tokens", value]).history_tokens == kept
        return
    with pytest.raises(SystemExit):
        parse_args(["b", "--history-tokens", value])
    assert "give 0 (no limit) or a number of tokens from 32 up" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, tiny_bundle_dir, capsys):
    assert main([str(tmp_path / "missing"), "--no-show"]) == 2
    assert "No bundle at" in capsys.readouterr().err
    manifest = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    args = argparse.Namespace(bundle=str(tiny_bundle_dir), model=None, sae=None, device="cpu", dtype="auto")
    try:
        (tiny_bundle_dir / "manifest.json").write_text(
            json.dumps({**manifest, "sae": {**manifest["sae"], "sha256": "0" * 64}})
        )
        with pytest.raises(BundleSourceError, match="not the SAE this bundle was built from"):
            load_shared(args)
        (tiny_bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "sae": {"path": "nowhere"}}))
        with pytest.raises(BundleSourceError, match="pass --sae"):
            load_shared(args)
    finally:
        (tiny_bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(tiny_bundle_dir).manifest == manifest


def test_explore_backend_option_reaches_the_engine(tiny_bundle_dir):
    pytest.importorskip("interp_engine", reason="interp-engine needs Python >= 3.11")
    from explorer.cli import parse_args

    args = parse_args(
        [str(tiny_bundle_dir), "--backend", "eager", "--device", "cpu", "--history-tokens", "64"]
    )
    shared = load_shared(args)
    try:
        assert shared.engine.generator is not None and shared.engine.generator.backend == "eager"
        assert shared.history_tokens == 64
        assert (
            shared.engine.generate("hello", [], SamplingConfig(temperature=0.0, max_new_tokens=4)) is not None
        )
    finally:
        shared.engine.close()
    with pytest.raises(SystemExit):
        parse_args([str(tiny_bundle_dir), "--backend", "tpu"])
