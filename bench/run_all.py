"""Run every benchmark in turn with its defaults; each prints its own figures and ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench_harvest.py", "bench_train.py", "bench_projection.py", "bench_steering.py",
           "bench_export.py", "bench_sweep_attribution.py", "bench_steer_probe.py", "bench_labels.py",
           "bench_soak.py"]  # fmt: skip


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name}", flush=True)
        if subprocess.call([sys.executable, str(here / name)]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
