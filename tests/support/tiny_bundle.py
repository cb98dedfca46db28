"""A tiny, complete bundle on disk for the explorer's tests: conftest's tiny Llama and chat
tokenizer (saved as a model folder), a random 48-feature SAE (saved in this
project's format), synthetic features / examples / clusters, and a real DataMapPlot map.html.

Planted on purpose: feature 5's label holds HTML (escaping), feature 7 is hidden, feature 9 is
dead, labels "apple …" / "Apricot …" for search, click strengths ``CLICK_STRENGTHS[i % 4]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from build_map.bundle.schema import cluster_columns
from build_map.bundle.write import write_bundle
from build_map.common.files import file_sha256
from build_map.sae.formats import save_sae
from build_map.sae.model import SAEConfig, SparseAutoencoder
from tests.support.tiny import TINY_D_MODEL, make_tiny_model, make_tiny_tokenizer

D_MODEL, N_FEATURES, HOOKPOINT = TINY_D_MODEL, 48, "model.layers.1"
HTML_LABEL = '<script>alert("x")</script> & <b>bold</b>'
HTML_FEATURE, HIDDEN_FEATURE, DEAD_FEATURE = 5, 7, 9
CLICK_STRENGTHS = np.array([2.0, 2.8284, 4.0, 1.4142], dtype=np.float32)
"""Planted steer_strength of feature i: CLICK_STRENGTHS[i % 4]."""
_WORDS = [
    "apple",
    "Apricot",
    "bridge",
    "river",
    "ocean",
    "code",
    "python",
    "music",
    "jazz",
    "cat",
    "dog",
    "sun",
]


def tiny_sae() -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(1)
    directions = torch.randn(N_FEATURES, D_MODEL, generator=gen)
    directions = directions / directions.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(SAEConfig(d_in=D_MODEL, d_sae=N_FEATURES, activation="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.copy_(-0.05 * torch.rand(N_FEATURES, generator=gen))
    return sae.eval().requires_grad_(False)


def feature_tables(n: int = N_FEATURES) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    coarse = np.arange(n) % 3
    fine = np.arange(n) % 6
    centres = np.array([[0, 0], [8, 0], [4, 7]], dtype=float)
    xy = centres[coarse] + rng.normal(0, 1.0, (n, 2)) + (fine[:, None] // 3) * 1.5
    labels = [f"{_WORDS[i % len(_WORDS)]} feature {i}" for i in range(n)]
    labels[HTML_FEATURE] = HTML_LABEL
    coarse_names = ["Fruit & food", "Water <places>", "Code"]
    unprobed = (np.arange(n) == DEAD_FEATURE) | (np.arange(n) == HIDDEN_FEATURE)
    features = pd.DataFrame(
        {
            "feature": np.arange(n),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "label": labels,
            "label_source": "auto",
            "density": rng.uniform(1e-4, 0.05, n),
            "max_act": rng.uniform(1.0, 5.0, n),
            "mean_act": rng.uniform(0.2, 1.0, n),
            "top_tokens": [[" " + _WORDS[i % len(_WORDS)], "<b>", "\n"] for i in range(n)],
            "top_logits": [["up1", "up2"] for _ in range(n)],
            "bottom_logits": [["down1", "<i>"] for _ in range(n)],
            "neighbors": [[(i + 1) % n, (i + 2) % n, HIDDEN_FEATURE] for i in range(n)],
            "dead": np.arange(n) == DEAD_FEATURE,
            "hidden": np.arange(n) == HIDDEN_FEATURE,
            # the output probe's columns; dead and hidden features are not probed
            "steer_strength": np.where(unprobed, np.nan, CLICK_STRENGTHS[np.arange(n) % 4]),
            "steerability": np.where(unprobed, np.nan, (np.arange(n) % 5) / 10),
            "steer_kl": np.where(unprobed, np.nan, 1.2),
            "output_promotes": [
                [] if unprobed[i] else [_WORDS[(i + 1) % len(_WORDS)], "<em>"] for i in range(n)
            ],
            "output_suppresses": [[] if unprobed[i] else ["never"] for i in range(n)],
            # label scores; dead and hidden features are not scored
            "detection": np.where(unprobed, np.nan, 0.25 + (np.arange(n) % 4) / 8),
            "fuzzing": np.where(unprobed, np.nan, 0.6),
            "label_judge": "offline-overlap",
            "cluster_0": [coarse_names[c] for c in coarse],
            "cluster_1": [f"{coarse_names[c]} / part {f}" for c, f in zip(coarse, fine, strict=True)],
        }
    )
    examples = []
    for i in range(n):
        for rank in range(3):
            tokens = [
                "The",
                " quick",
                " <b>" if i == HTML_FEATURE else " brown",
                " fox",
                " jumps",
                "\n",
                " over",
            ]
            acts = np.zeros(len(tokens), dtype=np.float32)
            acts[2 + rank] = features.max_act[i] * (1 - 0.2 * rank)
            acts[1] = features.max_act[i] * 0.3
            examples.append(
                {
                    "feature": i,
                    "rank": rank,
                    "bucket": "top",
                    "act": float(acts.max()),
                    "tokens": tokens,
                    "acts": acts.tolist(),
                }
            )
        examples.append(
            {
                "feature": i,
                "rank": 0,
                "bucket": "q50",
                "act": 0.5,
                "tokens": ["a", " dog"],
                "acts": [0.0, 0.5],
            }
        )
    clusters = pd.DataFrame(
        [
            {
                "level": 0,
                "cluster": c,
                "name": coarse_names[c],
                "size": int((coarse == c).sum()),
                "x": centres[c, 0],
                "y": centres[c, 1],
                "parent": -1,
            }
            for c in range(3)
        ]
        + [
            {
                "level": 1,
                "cluster": f,
                "name": f"{coarse_names[f % 3]} / part {f}",
                "size": int((fine == f).sum()),
                "x": centres[f % 3, 0],
                "y": centres[f % 3, 1],
                "parent": f % 3,
            }
            for f in range(6)
        ]
    )
    return features, pd.DataFrame(examples), clusters


def _render_map(features: pd.DataFrame, folder: Path, real_map: bool) -> None:
    if real_map:
        from build_map.render.map_page import render_map_html

        page = render_map_html(features, cluster_columns(features), title="Tiny test map")
    else:
        page = "<!doctype html><html><body>map placeholder</body></html>"
    (folder / "map.html").write_text(page, encoding="utf-8")


def write_tables_bundle(out: Path, overwrite: bool = False) -> Path:
    """Only the bundle of ``feature_tables`` (no model, no SAE, a placeholder map) at ``out``."""
    features, examples, clusters = feature_tables()
    manifest = {"model": {"id": "tiny-llama"}, "hookpoint": HOOKPOINT, "n_features": N_FEATURES}
    return write_bundle(
        out,
        manifest=manifest,
        features=features,
        examples=examples,
        clusters=clusters,
        render_map=lambda folder: _render_map(features, folder, real_map=False),
        overwrite=overwrite,
    )


def make_tiny_bundle(root: Path, real_map: bool = True) -> Path:
    """Write model/, sae/ and bundle/ under ``root``; returns the bundle folder."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, max_position_embeddings=512)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sae_dir = save_sae(tiny_sae(), root / "sae")
    features, examples, clusters = feature_tables()
    manifest = {
        "model": {"spec": str(root / "model"), "name": "tiny-llama"},
        "hookpoint": HOOKPOINT,
        "sae": {"path": str(sae_dir), "sha256": file_sha256(sae_dir), "format": "native"},
        "d_model": D_MODEL,
        "n_features": N_FEATURES,
    }
    return write_bundle(
        root / "bundle",
        manifest=manifest,
        features=features,
        examples=examples,
        clusters=clusters,
        render_map=lambda folder: _render_map(features, folder, real_map),
    )
