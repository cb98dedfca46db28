"""Benchmark `build-map export` on a synthetic bundle the size of Goodfire's SAEs.

    python bench/bench_export.py [--features 65536] [--no-browser]

Synthesises a bundle with realistic card data (10 top examples x 20 tokens drawn from a Zipf
"corpus" over a 49k vocabulary, 10 logit-lens tokens each way, 10 neighbours, 3 cluster levels,
1% hidden), exports it and prints: export time, file size and its parts, and how fast it opens in
headless Chromium (navigation -> the map on screen and the card data parsed, from the page's own
clock; median of --paint-runs fresh launches), with when the WebGL map takes over. Targets: export
<= 60 s on 2 cores, file <= 40 MB, first paint <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from build_map.bundle import schema as bundle_format  # noqa: E402
from build_map.render.export.page import export_bundle  # noqa: E402

VOCAB = 49152


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 9))) for _ in range(VOCAB - 6)]
    spaced = [(" " + w if i % 3 else w) for i, w in enumerate(words)]
    return np.array(["\n", " <b>", "&amp;", "'", ".", ","] + spaced, dtype=object)


def _list_array(values: np.ndarray, width: int, type_: pa.DataType) -> pa.ListArray:
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=type_))


def synthesize_bundle(
    out: Path, n_features: int, *, seed: int = 0, n_examples: int = 10, n_tokens: int = 20
) -> Path:
    """Write a bundle with realistic card data straight from Arrow (pandas would take minutes)."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    corpus = np.minimum(rng.zipf(1.15, size=3_200_000) - 1, VOCAB - 1)  # token ids of a chat corpus
    features, names = _synthetic_features(rng, vocab, n_features)
    examples = _synthetic_examples(rng, vocab, corpus, n_features, n_examples, n_tokens)
    clusters = [
        {"level": lv, "cluster": c, "name": str(n), "size": 1, "x": 0.0, "y": 0.0,
         "parent": -1 if lv == 0 else c // 6}
        for lv in range(len(names))
        for c, n in enumerate(names[lv])
    ]  # fmt: skip
    _write_bundle(out, features, examples, clusters, len(names))
    return out


def _synthetic_features(rng: np.random.Generator, vocab: np.ndarray, n_features: int) -> tuple[dict, list]:
    """Feature columns (Arrow arrays) in three nested cluster levels, and each level's names."""
    n_levels, fanout = 3, (12, 6, 6)
    fine = rng.integers(0, np.prod(fanout), size=n_features)
    centres = rng.normal(size=(np.prod(fanout), 2)) * 8
    xy = centres[fine] + rng.normal(size=(n_features, 2))
    paths = [fine // int(np.prod(fanout[level + 1 :])) for level in range(n_levels)]
    names = [
        np.array([f"{'ABC'[level]}{i} topic" for i in range(int(np.prod(fanout[: level + 1])))])
        for level in range(n_levels)
    ]

    def token_lists(width: int) -> pa.ListArray:
        return _list_array(vocab[rng.integers(0, VOCAB, size=n_features * width)], width, pa.string())

    features = {
        "feature": pa.array(np.arange(n_features, dtype=np.int32)),
        "x": pa.array(xy[:, 0].astype(np.float32)),
        "y": pa.array(xy[:, 1].astype(np.float32)),
        "label": pa.array(
            [
                f"{vocab[rng.integers(0, VOCAB)].strip()} and {vocab[rng.integers(0, VOCAB)].strip()} #{i}"
                for i in range(n_features)
            ]
        ),
        "label_source": pa.array(["auto"] * n_features),
        "density": pa.array(rng.lognormal(-7, 1.5, size=n_features).astype(np.float32)),
        "max_act": pa.array(rng.gamma(4, 2, size=n_features).astype(np.float32)),
        "mean_act": pa.array(rng.gamma(2, 1, size=n_features).astype(np.float32)),
        "top_tokens": token_lists(10),
        "top_logits": token_lists(10),
        "bottom_logits": token_lists(10),
        "neighbors": _list_array(
            rng.integers(0, n_features, size=n_features * 10).astype(np.int32), 10, pa.int32()
        ),
        "dead": pa.array(np.zeros(n_features, dtype=bool)),
        "hidden": pa.array(rng.random(n_features) < 0.01),
    }
    for level in range(n_levels):
        features[f"cluster_{level}"] = pa.array(names[level][paths[level]])
    return features, names


def _synthetic_examples(
    rng: np.random.Generator, vocab: np.ndarray, corpus: np.ndarray, n_features: int, n_examples: int,
    n_tokens: int,
) -> dict:  # fmt: skip
    """Top examples: windows of the Zipf corpus with sparse activations and one peak each."""
    n_rows = n_features * n_examples
    starts = rng.integers(0, corpus.size - n_tokens, size=n_rows)
    tokens = corpus[starts[:, None] + np.arange(n_tokens)]  # (rows, n_tokens)
    acts = np.where(rng.random((n_rows, n_tokens)) < 0.15, rng.exponential(1.0, (n_rows, n_tokens)), 0.0)
    focus = rng.integers(n_tokens // 2, n_tokens, size=n_rows)
    peak = rng.gamma(4, 2, size=n_rows)
    acts[np.arange(n_rows), focus] = peak
    return {
        "feature": pa.array(np.repeat(np.arange(n_features, dtype=np.int32), n_examples)),
        "rank": pa.array(np.tile(np.arange(n_examples, dtype=np.int32), n_features)),
        "bucket": pa.array(["top"] * n_rows),
        "act": pa.array(peak.astype(np.float32)),
        "tokens": _list_array(vocab[tokens.ravel()], n_tokens, pa.string()),
        "acts": _list_array(acts.astype(np.float32).ravel(), n_tokens, pa.float32()),
    }


def _write_bundle(out: Path, features: dict, examples: dict, clusters: list, n_levels: int) -> None:
    out.mkdir(parents=True)
    schema = bundle_format.features_schema(n_levels)
    pq.write_table(
        pa.table(features).select(schema.names).cast(schema), out / bundle_format.FEATURES, compression="zstd"
    )
    pq.write_table(
        pa.table(examples).cast(bundle_format.EXAMPLE_SCHEMA),
        out / bundle_format.EXAMPLES,
        compression="zstd",
    )
    pq.write_table(
        pa.Table.from_pylist(clusters, schema=bundle_format.CLUSTER_SCHEMA), out / bundle_format.CLUSTERS
    )
    (out / bundle_format.MAP_HTML).write_text("<html></html>")
    manifest = {
        "format_version": bundle_format.FORMAT_VERSION,
        "model": {"spec": "synthetic"},
        "hookpoint": "layers.19",
    }
    (out / bundle_format.MANIFEST).write_text(json.dumps(manifest))


def first_paint_seconds(html: Path, timeout_s: float = 120) -> dict[str, float]:
    """One fresh headless Chromium opening ``html`` from file://: when things happened, in seconds.

    From the page's own clock (performance.now(), since navigation start): ``first_paint_s``, the
    map on screen (the preview picture committed to the screen, static/map_preview.js);
    ``cards_s``, the card data parsed; ``open_s``, the later of the two (the benchmark's figure: the
    map is visible and a click on it opens a card); ``live_s``, the WebGL map shown.
    """
    # The project's offline Chromium: requests outside the machine are aborted.
    from tests.support.browser import offline_browser

    with offline_browser() as browser:
        page = browser.new_page((1400, 900))
        cpu_before = _chromium_cpu_seconds()
        page.goto(html.as_uri(), wait_until="commit", timeout=timeout_s * 1000)
        page.wait_for_function(
            "window.saeCards && window.saeCards.ready && window.saeCards.timings.first_paint_ms",
            timeout=timeout_s * 1000,
        )
        page.wait_for_function("window.saeCards.mapReady", timeout=timeout_s * 1000)
        cpu = _chromium_cpu_seconds() - cpu_before
        page.evaluate("location.hash = '#feature=12345'")
        page.wait_for_selector(".sae-panel.sae-open .sae-card", timeout=timeout_s * 1000)
        if browser.blocked:
            raise RuntimeError(f"the page tried to reach the network: {browser.blocked[:3]}")
        timings = page.evaluate("window.saeCards.timings")
        preview_ms = page.evaluate("window.saeMap.previewMs")
        paint, cards = timings["first_paint_ms"] / 1000, timings["cards_ms"] / 1000
        return {
            "first_paint_s": paint,
            "cards_s": cards,
            "open_s": max(paint, cards),
            "live_s": timings["map_ms"] / 1000,
            "cpu_s": cpu,
            "card_ms": timings["card_ms"],
            "preview_ms": preview_ms,
        }


def _chromium_cpu_seconds() -> float:
    """CPU time used so far by the Chromium processes this script started (NaN without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count() or 0} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument(
        "--no-browser", action="store_true", help="Skip the headless Chromium first-paint figure."
    )
    parser.add_argument("--keep", type=Path, default=None, help="Also copy the exported HTML here.")
    parser.add_argument(
        "--paint-runs", type=int, default=3, help="Fresh Chromium launches for the first paint (median)."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        synthesize_bundle(tmp / "bundle", args.features)
        print(f"synthetic bundle: {args.features} features, {time.perf_counter() - t0:.1f} s to write")
        cpu = time.process_time()
        summary = export_bundle(tmp / "bundle", tmp / "export.html")
        cpu = time.process_time() - cpu
        print(f"export: {summary.seconds:.1f} s wall, {cpu:.1f} s CPU (target <= 60 s; {_load()})")
        print(
            f"file: {summary.html_bytes / 1e6:.1f} MB (target <= 40 MB); card data {summary.card_data_bytes / 1e6:.1f} MB, "
            f"map and libraries {(summary.html_bytes - summary.card_data_bytes) / 1e6:.1f} MB"
        )
        print(
            f"cards: {summary.n_features} visible ({summary.n_hidden} hidden left out), {summary.n_examples} examples, "
            f"{summary.n_token_strings} distinct tokens"
        )
        if args.keep:
            args.keep.write_bytes((tmp / "export.html").read_bytes())
        if not args.no_browser:
            runs = [first_paint_seconds(tmp / "export.html") for _ in range(max(1, args.paint_runs))]
            opens = sorted(run["open_s"] for run in runs)
            median = sorted(runs, key=lambda run: run["open_s"])[len(runs) // 2]
            print(
                f"opens (headless Chromium, file://, median of {len(runs)} fresh launches): map on screen and "
                f"card data parsed at {median['open_s']:.2f} s (runs {', '.join(f'{o:.2f}' for o in opens)} s; "
                f"target <= 5 s; {_load()}); in the median run: map on screen {median['first_paint_s']:.2f} s "
                f"(its picture drawn in {median['preview_ms']:.0f} ms), "
                f"cards parsed {median['cards_s']:.2f} s, "
                f"WebGL map shown {median['live_s']:.2f} s, Chromium CPU {median['cpu_s']:.1f} s; "
                f"a card is decoded and built in {median['card_ms']:.0f} ms"
            )


if __name__ == "__main__":
    main()
