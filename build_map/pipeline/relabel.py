"""Label or score a bundle that exists: ``build-map label BUNDLE`` renews the labels (and the
cluster names and map drawn from them, and the scores), ``build-map score BUNDLE`` renews the
scores alone. Both rewrite the bundle atomically and keep everything else."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from build_map.bundle import sources
from build_map.bundle.read import Bundle, load_bundle
from build_map.bundle.schema import SCORE_SCHEMA
from build_map.bundle.write import write_bundle
from build_map.labels.llm import chat_for, dry_run
from build_map.labels.scores import ScoreSummary, labelling_examples
from build_map.lm.models import LoadedModel, load_model
from build_map.pipeline.build import named_clusters, write_map
from build_map.pipeline.label_stage import OFFLINE, SELF, judge_for, label_features, score_stage

logger = logging.getLogger(__name__)


def relabel_bundle(
    path: str | Path, labeler: str = OFFLINE, judge: str | None = OFFLINE, device: str = "auto"
) -> ScoreSummary | None:
    """New labels from ``labeler`` (imported labels from the build are kept where the manifest
    names a file that still exists), new cluster names from them, then scores by ``judge``
    (None: no scores)."""
    bundle = load_bundle(path, label_edits=False)
    loaded = _model(bundle, device) if SELF in (labeler, judge) else None
    imported = _imported(bundle)
    features = label_features(bundle.features, bundle.examples, imported, labeler, loaded)
    xy = features[["x", "y"]].to_numpy(np.float64)
    features, clusters = named_clusters(features, xy, _levels(bundle))
    summary = None
    if judge is None:  # scores of the old labels say nothing of the new ones
        features = features.drop(columns=[c for c in SCORE_SCHEMA.names if c in features.columns])
    else:
        features, summary = score_stage(features, bundle.examples, judge_for(judge, loaded))
    _rewrite(bundle, features, clusters, {"labeler": labeler, "judge": judge}, summary)
    return summary


def rescore_bundle(path: str | Path, judge: str = OFFLINE, device: str = "auto") -> ScoreSummary:
    bundle = load_bundle(path, label_edits=False)
    loaded = _model(bundle, device) if judge == SELF else None
    features, summary = score_stage(bundle.features, bundle.examples, judge_for(judge, loaded))
    _rewrite(bundle, features, bundle.clusters, {"judge": judge}, summary)
    return summary


def label_dry_run(path: str | Path, labeler: str, device: str = "auto") -> str:
    """What an LLM labeller would be sent: the first live feature's prompt and the token estimate."""
    bundle = load_bundle(path, label_edits=False)
    chat = chat_for(labeler, _model(bundle, device) if labeler == SELF else None)
    text, tokens, total = dry_run(bundle.features, labelling_examples(bundle.examples), chat)
    n_live = int((~bundle.features["dead"].astype(bool)).sum())
    return (
        f"{text}\n\n-- labeller {chat.name}: this prompt is {tokens:,} tokens; {n_live:,} live features "
        f"take about {total:,} prompt tokens (+ up to 32 answer tokens each). Nothing was sent."
    )


def _model(bundle: Bundle, device: str) -> LoadedModel:
    return load_model(sources.model_spec(bundle, None), device)


def _imported(bundle: Bundle) -> pd.Series | None:
    from build_map.labels.files import read_label_file

    name = (bundle.manifest.get("build") or {}).get("labels_file")
    if not name:
        return None
    if not Path(name).is_file():
        logger.warning(
            "The bundle was built with --labels %s, which is gone; its imported labels give way to the new "
            "ones. Rebuild with --labels to keep them.", name,
        )  # fmt: skip
        return None
    return read_label_file(name, bundle.n_features)


def _levels(bundle: Bundle) -> list[np.ndarray]:
    """Each level's cluster id per feature, from the names (distinct within a level)."""
    levels = []
    for level, column in enumerate(bundle.cluster_columns):
        rows = bundle.clusters[bundle.clusters["level"] == level]
        ids = dict(zip(rows["name"], rows["cluster"].astype(int), strict=True))
        levels.append(bundle.features[column].map(ids).fillna(-1).to_numpy(np.int64))
    return levels


def _rewrite(bundle: Bundle, features: pd.DataFrame, clusters: pd.DataFrame, build: dict,
             summary: ScoreSummary | None) -> None:  # fmt: skip
    manifest = dict(bundle.manifest)
    manifest["build"] = {**manifest.get("build", {}), **build}
    if summary is not None:
        manifest["label_scores"] = summary.manifest()
    model = manifest.get("model") or {}
    hookpoint = manifest.get("hookpoint", "")
    title = f"{model.get('name') or model.get('spec')} · {hookpoint} · {bundle.n_features:,} SAE features"
    write_bundle(bundle.path, manifest=manifest, features=features, examples=bundle.examples,
                 clusters=clusters, render_map=lambda folder: write_map(folder, features, title),
                 overwrite=True)  # fmt: skip
