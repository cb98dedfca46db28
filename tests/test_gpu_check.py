"""``bench/gpu_check.py`` runs on CPU (the hf and eager paths; the vLLM one needs CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_finds_parity():
    pytest.importorskip("interp_engine", reason="interp-engine needs Python >= 3.11")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--backend", "hf,eager", "--tokens", "6",
         "--concurrent", "2", "--d-sae", "8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf: single stream" in result.stdout and "eager: single stream" in result.stdout
    assert "greedy tokens equal to hf: 9 / 9" in result.stdout
