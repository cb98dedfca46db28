"""``build-map demo --serve`` hands over to ``explore``: a process of its own, so the builder never
imports the explorer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from build_map.cli.main import main


def test_serve_replaces_the_builder_with_explore(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bundle"
    monkeypatch.setattr("build_map.pipeline.demo.demo_bundle", lambda *args: (out, None))
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    assert main(["demo", "--serve", "--host", "127.0.0.1", "--port", "5077", "--device", "cpu"]) == 0
    assert calls == [
        (sys.executable, [sys.executable, "-m", "explorer", str(out), "--host", "127.0.0.1", "--port", "5077",
                          "--device", "cpu"])
    ]  # fmt: skip
    assert f"Using the cached demo bundle {out}" in capsys.readouterr().out


def test_the_explorer_runs_as_a_module():
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-m", "explorer", "--help"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: explore")
