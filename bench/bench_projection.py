"""Benchmark: our projection + clustering vs default umap-learn on a Goodfire-8B-shaped decoder.

A synthetic 65,536 x 4,096 float32 decoder with structure like a real SAE's: feature families
(a few thousand centres of very different sizes, themselves grouped in topics), per-feature
spread, 20 % isolated features and varied norms. Each method runs in a fresh process, so times
include imports and numba compilation:

  ours cold   first process with an empty numba cache
  ours warm   the next process (numba cache filled)
  umap-learn  ``umap.UMAP(metric="cosine").fit_transform(W_dec)``, its defaults, in a fresh process

Trustworthiness (cosine in the decoder space, k=10) is computed on the same sample for both.

    python bench/bench_projection.py                  # full size (several minutes)
    python bench/bench_projection.py --n 8192 --d 512 # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERBOSE = "--verbose" in sys.argv


def synthetic_decoder(
    n: int = 65536,
    d: int = 4096,
    n_families: int = 3000,
    n_topics: int = 40,
    isolated: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 decoder rows and each row's family (-1: isolated)."""
    rng = np.random.default_rng(seed)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    topics = unit(rng.standard_normal((n_topics, d), dtype=np.float32))
    topic_of = rng.integers(0, n_topics, n_families)
    families = unit(topics[topic_of] + 1.2 * unit(rng.standard_normal((n_families, d), dtype=np.float32)))
    weights = rng.pareto(1.5, n_families) + 1.0  # heavy-tailed family sizes
    n_grouped = int(n * (1 - isolated))
    family = np.full(n, -1)
    family[:n_grouped] = rng.choice(n_families, size=n_grouped, p=weights / weights.sum())
    family = rng.permutation(family)  # isolated rows anywhere, so any prefix is a fair subsample
    rows = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 8192):  # in blocks: one (n, d) noise array is enough memory
        stop = min(start + 8192, n)
        noise = unit(rng.standard_normal((stop - start, d), dtype=np.float32))
        fam = family[start:stop]
        spread = rng.uniform(0.7, 1.6, (stop - start, 1)).astype(np.float32)
        block = np.where(fam[:, None] >= 0, families[np.maximum(fam, 0)] + spread * noise, noise)
        rows[start:stop] = block * rng.lognormal(0.0, 0.3, (stop - start, 1)).astype(np.float32)
    return rows, family


# ---------------------------------------------------------------- child processes (timed)


def _child(method: str, data_path: str, out_path: str, verbose: bool = False) -> None:
    """Run one method in this fresh process; write its layout and timings. Reading the .npy is
    not timed; imports, numba compilation and compute are."""
    sys.path.insert(0, str(ROOT))
    if verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="  %(relativeCreated)7.0f ms [%(name)s] %(message)s")
    directions = np.load(data_path)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}
    if method == "ours":
        from build_map.geometry.clusters import ClusterConfig, cluster_levels
        from build_map.geometry.config import ProjectConfig
        from build_map.geometry.projection import project_directions

        xy = project_directions(directions, ProjectConfig())
        timings["projection_s"] = time.perf_counter() - start
        levels = cluster_levels(directions, xy, ClusterConfig())
        timings["clustering_s"] = time.perf_counter() - start - timings["projection_s"]
        timings["level_sizes"] = [int(level.max()) + 1 for level in levels]  # type: ignore[assignment]
    elif method == "umap":
        import umap

        xy = umap.UMAP(metric="cosine").fit_transform(directions)
    elif method == "umap-warmup":  # fill the numba cache for NN-descent on a tiny input
        import umap

        umap.UMAP(metric="cosine", n_epochs=5).fit_transform(directions[:5000, :64])
        xy = np.zeros((len(directions), 2), np.float32)
    else:
        raise ValueError(f"unknown method {method!r}; use ours, umap or umap-warmup")
    timings["wall_s"] = time.perf_counter() - start
    timings["cpu_s"] = _cpu_seconds() - cpu_start
    np.save(out_path, np.asarray(xy, dtype=np.float32))
    Path(out_path + ".json").write_text(json.dumps(timings))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(method: str, data_path: Path, work: Path, cache: Path, tag: str) -> tuple[np.ndarray, dict]:
    out = work / f"{tag}.npy"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--child", method, "--data", str(data_path), "--out", str(out)]
    cmd += ["--verbose"] if VERBOSE else []
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return np.load(out), json.loads(Path(str(out) + ".json").read_text())


# ---------------------------------------------------------------- report


def _trust(directions: np.ndarray, xy: np.ndarray, args: argparse.Namespace) -> float:
    from build_map.geometry.projection import trustworthiness_sample

    return trustworthiness_sample(directions, xy, n_sample=args.sample, k=args.k, seed=args.seed)


def _fmt(t: dict) -> str:
    return f"{t['wall_s']:.1f} s wall [{t['cpu_s']:.1f} s CPU]"


def main() -> None:
    args = _parse_args()
    if args.child:
        _child(args.child, args.data, args.out, args.verbose)
        return
    sys.path.insert(0, str(ROOT))
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start (other jobs slow wall times)"
    )
    directions, _ = synthetic_decoder(args.n, args.d, args.families, seed=args.seed)
    base_n = min(args.baseline_n or args.n, args.n)
    print(
        f"data: synthetic decoder {args.n} x {args.d} float32, {args.families} feature families, seed {args.seed}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_projection_") as tmp:
        work, cache = Path(tmp), Path(tmp) / "numba"
        np.save(work / "full.npy", directions)
        xy_cold, cold = _run("ours", work / "full.npy", work, cache, "ours_cold")
        print(
            f"ours cold (fresh process, empty numba cache): {_fmt(cold)} = projection {cold['projection_s']:.1f} s"
            f" + clustering {cold['clustering_s']:.1f} s"
        )
        _, warm = _run("ours", work / "full.npy", work, cache, "ours_warm")
        print(
            f"ours warm (fresh process, numba cache filled): {_fmt(warm)} = projection {warm['projection_s']:.1f} s"
            f" + clustering {warm['clustering_s']:.1f} s"
        )
        print(f"cluster levels: {' / '.join(map(str, warm['level_sizes']))} clusters")
        if args.skip_baseline:
            print(
                f"trustworthiness (k={args.k}, {args.sample}-row sample, cosine): ours {_trust(directions, xy_cold, args):.4f}"
            )
            return
        sub = directions[:base_n]
        if base_n < args.n:
            np.save(work / "sub.npy", sub)
            xy_ours, ours = _run("ours", work / "sub.npy", work, cache, "ours_sub")
            print(f"BASELINE ON A SUBSAMPLE: first {base_n} of {args.n} rows for both methods below")
            print(f"ours warm on the {base_n}-row subsample: {_fmt(ours)}")
        else:
            xy_ours, ours = xy_cold, warm
        _run("umap-warmup", work / "full.npy", work, cache, "umap_warmup")
        xy_umap, umap_t = _run(
            "umap", work / ("sub.npy" if base_n < args.n else "full.npy"), work, cache, "umap"
        )
        print(
            f"umap-learn default, UMAP(metric='cosine') on raw {args.d}-d rows ({base_n} rows, fresh process, "
            f"numba cache filled): {_fmt(umap_t)}"
        )
        print(
            f"speed-up, umap-learn / ours (both warm, {base_n} rows): {umap_t['wall_s'] / ours['wall_s']:.2f}x wall, "
            f"{umap_t['cpu_s'] / ours['cpu_s']:.2f}x CPU"
        )
        print(
            f"trustworthiness (k={args.k}, same {args.sample}-row sample, cosine in {args.d}-d): "
            f"ours {_trust(sub, xy_ours, args):.4f}, umap-learn {_trust(sub, xy_umap, args):.4f}"
        )


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=65536, help="features (decoder rows)")
    parser.add_argument("--d", type=int, default=4096, help="d_model (decoder columns)")
    parser.add_argument(
        "--families", type=int, default=3000, help="feature families in the synthetic decoder"
    )
    parser.add_argument(
        "--baseline-n",
        type=int,
        default=None,
        help="run the umap-learn baseline (and ours again, for the ratio) on the first N rows only",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="time ours only")
    parser.add_argument("--sample", type=int, default=2000, help="rows sampled for trustworthiness")
    parser.add_argument("--k", type=int, default=10, help="neighbours for trustworthiness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log each stage's time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
