"""The builder: model + SAE + corpus → map bundle (statistics, labels, UMAP, named clusters, map.html).

Every input is checked before the expensive stages run (output folder, SAE/model fit, hookpoint,
label and hide files), so a mistake costs seconds, not a rebuild.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from build_map.activations.buffer import ActivationBuffer
from build_map.activations.replay import HarvestReplay
from build_map.bundle.schema import MAP_HTML, cluster_columns
from build_map.bundle.write import check_can_write, write_bundle
from build_map.features.config import StatsConfig
from build_map.features.output_probe import clear_share
from build_map.features.probe_config import CLEAR_STEERABILITY, ProbeConfig
from build_map.features.stats import compute_feature_stats
from build_map.geometry.clusters import ClusterConfig, cluster_levels, cluster_parents
from build_map.geometry.config import ProjectConfig
from build_map.geometry.projection import project_directions, trustworthiness_sample
from build_map.labels.cluster_names import name_levels
from build_map.labels.files import read_hide_file, read_label_file
from build_map.labels.scores import ScoreSummary
from build_map.labels.text import topic_words
from build_map.lm.corpus import CorpusConfig, check_sources, token_sequences
from build_map.lm.hookpoints import d_model, default_hookpoint, normalize_hookpoint
from build_map.lm.models import LoadedModel, load_model
from build_map.pipeline.label_stage import check_spec, judge_for, label_features, score_stage
from build_map.pipeline.manifest import build_manifest
from build_map.pipeline.probe_stage import probe_stage
from build_map.render.map_page import render_map_html
from build_map.sae.formats import load_sae
from build_map.sae.model import SparseAutoencoder, check_matches_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    sae: str
    """SAE path: Goodfire .pth, SAELens or sparsify folder, or one saved by `build-map train`."""
    out: str
    """Bundle folder to write (replaced only with overwrite)."""
    model: str | None = None
    """Hugging Face id, local folder or .gguf; None = the embedded SmolLM2 default."""
    hookpoint: str | None = None
    """Residual-stream hookpoint the SAE reads, e.g. model.layers.19; None = the SAE's own or the middle layer."""
    n_tokens: int = 100_000
    """Corpus tokens for the per-feature statistics."""
    corpus: tuple[str, ...] = ("chitchat", "chatterbot")
    """Corpus sources: chitchat, chatterbot, or .jsonl / text files."""
    activations: str | None = None
    """Activation buffer harvested from this corpus (``build-map train --buffer``): the statistics
    read the activations from it instead of running the model over the corpus again."""
    labels: str | None = None
    """CSV/JSON/Parquet with feature,label; these labels win over automatic ones. The explorer's
    label edits (NAME.labels.csv beside the bundle NAME) are such a file."""
    hide: str | None = None
    """Features to moderate out: kept in the bundle as hidden, not drawn, not steerable."""
    labeler: str = "offline"
    """Who labels features: offline (what the activating contexts share; no model), self (the
    bundle's own chat model, e.g. Llama-3.1-8B-Instruct on a GPU) or the URL of an OpenAI-compatible
    endpoint (a local vLLM, llama.cpp or Ollama server; model from $SAE_MAP_LLM_MODEL)."""
    judge: str = "offline"
    """Who scores the labels (detection, fuzzing on held-out examples): offline, self or a URL."""
    score: bool = True
    """Score every label (cheap with the offline judge)."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    overwrite: bool = False
    """Replace an existing bundle at `out`."""
    title: str | None = None
    """Map title; defaults to the model and hookpoint."""
    seed: int = 0
    """Seed for corpus order, UMAP and clustering."""
    probe: bool = True
    """Run the output-effect probe (each feature's click strength, steerability and output tokens);
    without it the explorer falls back to the default strength."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(
                f"--seed {self.seed} is out of range; give a whole number from 0 to {2**32 - 1}."
            )
        if self.n_tokens < 1:
            raise ValueError(f"--tokens {self.n_tokens}: give a positive number of corpus tokens.")
        check_spec(self.labeler, "--labeler")
        check_spec(self.judge, "--judge")


@dataclass
class BuildSummary:
    out: Path
    n_features: int
    n_live: int
    n_dead: int
    n_hidden: int
    clusters_per_level: list[int]
    trustworthiness: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    clear_share: float | None = None
    """Share of probed features with a clear effect at their steer_strength (None: not probed)."""
    n_probed: int = 0
    scores: ScoreSummary | None = None

    def lines(self) -> list[str]:
        stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.stage_seconds.items())
        return [
            f"bundle: {self.out}",
            f"features: {self.n_features} ({self.n_live} live, {self.n_dead} dead, {self.n_hidden} hidden)",
            f"clusters per level (coarse→fine): {' / '.join(map(str, self.clusters_per_level))}",
            f"trustworthiness (k=10, sample): {self.trustworthiness:.3f}",
            self._probe_line(),
            self.scores.line() if self.scores else "label scores: not run",
            f"time: {stages}; total {sum(self.stage_seconds.values()):.1f}s",
        ]

    def _probe_line(self) -> str:
        if self.clear_share is None:
            return "output probe: not run (clicks use the default strength)"
        return (
            f"output probe: {self.n_probed} features; {100 * self.clear_share:.0f}% steer clearly at their "
            f"steer_strength (one click moves >= {100 * CLEAR_STEERABILITY:.0f}% of next-token probability "
            "onto their own words)"
        )


class _Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        logger.info("%s …", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def build_bundle(cfg: BuildConfig, loaded: LoadedModel | None = None) -> BuildSummary:
    stage = _Stages()
    out = check_can_write(cfg.out, cfg.overwrite)
    with stage("load"):
        inputs = _load_inputs(cfg, loaded)
    corpus = CorpusConfig(sources=tuple(cfg.corpus), seed=cfg.seed)
    with stage("statistics"):
        sequences = _sequences(inputs.loaded, corpus, cfg.n_tokens)
        stats_cfg = StatsConfig(n_tokens=cfg.n_tokens, seed=cfg.seed)
        stats = compute_feature_stats(
            inputs.loaded, inputs.sae, inputs.hookpoint, sequences, stats_cfg, inputs.replay
        )
    with stage("labels"):
        features = label_features(stats.features, stats.examples, inputs.imported, cfg.labeler, inputs.loaded)
        features["hidden"] = features["feature"].isin(inputs.hidden)
    scores = None
    if cfg.score:
        with stage("scores"):
            features, scores = score_stage(features, stats.examples, judge_for(cfg.judge, inputs.loaded))
    probe_cfg = ProbeConfig()
    probe = None
    if cfg.probe:
        with stage("probe"):
            features, probe = probe_stage(inputs.loaded, inputs.sae, inputs.hookpoint, features, probe_cfg)
    directions = inputs.sae.decoder_directions.detach().float().cpu().numpy()
    project_cfg = ProjectConfig(seed=cfg.seed, device=cfg.device)
    with stage("projection"):
        xy = project_directions(directions, project_cfg)
        trust = trustworthiness_sample(directions, xy, seed=cfg.seed)
    cluster_cfg = ClusterConfig(seed=cfg.seed)
    with stage("clusters"):
        levels = cluster_levels(directions, xy, cluster_cfg)
        features, clusters = named_clusters(features, xy, levels)
    configs = {"project": project_cfg, "cluster": cluster_cfg, **({"probe": probe_cfg} if probe else {})}
    manifest = build_manifest(cfg, inputs.loaded, inputs.sae, inputs.hookpoint, stats, corpus, configs, trust)
    if probe:
        manifest["probe"] = probe.manifest()
    if scores:
        manifest["label_scores"] = scores.manifest()
    with stage("map"):
        title = cfg.title or f"{inputs.loaded.spec} · {inputs.hookpoint} · {inputs.sae.d_sae:,} SAE features"
        write_bundle(out, manifest=manifest, features=features, examples=stats.examples, clusters=clusters,
                     render_map=lambda folder: write_map(folder, features, title), overwrite=cfg.overwrite)  # fmt: skip
    return BuildSummary(
        out=out,
        n_features=inputs.sae.d_sae,
        n_live=int((~features["dead"]).sum()),
        n_dead=int(features["dead"].sum()),
        n_hidden=len(inputs.hidden),
        clusters_per_level=[int(len(np.unique(level))) for level in levels],
        trustworthiness=trust,
        stage_seconds=stage.seconds,
        clear_share=clear_share(features) if probe else None,
        n_probed=probe.n_probed if probe else 0,
        scores=scores,
    )


@dataclass
class _Inputs:
    """Everything checked before the slow stages run."""

    loaded: LoadedModel
    sae: SparseAutoencoder
    hookpoint: str
    imported: pd.Series | None
    hidden: set[int]
    replay: HarvestReplay | None
    """The activation buffer the statistics read from (None: they run the model)."""


def _load_inputs(cfg: BuildConfig, loaded: LoadedModel | None) -> _Inputs:
    check_sources(CorpusConfig(sources=tuple(cfg.corpus), seed=cfg.seed))  # before anything slow
    sae = load_sae(cfg.sae)  # cheap, so a bad SAE file fails before the model loads
    buffer = ActivationBuffer.open(cfg.activations) if cfg.activations else None
    loaded = loaded or load_model(cfg.model, device=cfg.device)
    sae = sae.to(loaded.device)
    hookpoint = normalize_hookpoint(loaded.model, cfg.hookpoint or _sae_hookpoint(sae, loaded))
    check_matches_model(sae, d_model(loaded.model), hookpoint, source=cfg.sae)
    imported = read_label_file(cfg.labels, sae.d_sae) if cfg.labels else None
    hidden = read_hide_file(cfg.hide, sae.d_sae) if cfg.hide else set()
    replay = HarvestReplay(buffer, loaded.spec, hookpoint) if buffer else None
    return _Inputs(loaded, sae, hookpoint, imported, hidden, replay)


def _sae_hookpoint(sae: SparseAutoencoder, loaded: LoadedModel) -> str:
    if sae.cfg.hookpoint:
        return sae.cfg.hookpoint
    hookpoint = default_hookpoint(loaded.model)
    logger.warning(
        "The SAE does not say where it reads; using the middle layer %s (pass --hookpoint).", hookpoint
    )
    return hookpoint


def _sequences(loaded: LoadedModel, corpus: CorpusConfig, n_tokens: int) -> list[list[int]]:
    """Enough corpus sequences for ``n_tokens`` kept tokens (first positions are skipped)."""
    sequences, total = [], 0
    for ids in token_sequences(loaded.tokenizer, corpus):
        sequences.append(ids)
        total += len(ids) - 1
        if total >= n_tokens:
            break
    return sequences


def named_clusters(
    features: pd.DataFrame, xy: np.ndarray, levels: list[np.ndarray]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Name every level's clusters from the members' labels; the features with their coordinates
    and cluster names, and the cluster table."""
    parents = cluster_parents(levels)
    # Dead features' placeholder label must not name the regions they sit in.
    live_labels = [
        None if dead else topic_words(label, source)
        for label, source, dead in zip(
            features["label"], features["label_source"], features["dead"], strict=True
        )
    ]
    names = name_levels(live_labels, levels, parents)
    return _with_clusters(features, xy, levels, parents, names)


def _with_clusters(
    features: pd.DataFrame,
    xy: np.ndarray,
    levels: list[np.ndarray],
    parents: list[dict[int, int]],
    names: list[dict[int, str]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    features = features.copy()
    features["x"], features["y"] = xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)
    rows = []
    for level, (ids, level_names) in enumerate(zip(levels, names, strict=True)):
        features[f"cluster_{level}"] = [level_names.get(int(c), "Unlabelled") for c in ids]
        for cluster in np.unique(ids):
            members = ids == cluster
            rows.append(
                {
                    "level": level,
                    "cluster": int(cluster),
                    "name": level_names.get(int(cluster), "Unlabelled"),
                    "size": int(members.sum()),
                    "x": float(xy[members, 0].mean()),
                    "y": float(xy[members, 1].mean()),
                    "parent": int(parents[level][int(cluster)]),
                }
            )
    return features, pd.DataFrame(rows)


def write_map(folder: Path, features: pd.DataFrame, title: str) -> None:
    subtitle = f"{int(features['dead'].sum()):,} dead features not drawn"
    page = render_map_html(features, cluster_columns(features), title=title, subtitle=subtitle)
    (folder / MAP_HTML).write_text(page, encoding="utf-8")
