"""Probe a bundle that exists: ``build-map probe BUNDLE`` fills in (or renews) the output probe's
columns and re-renders the map (its steerability colouring), keeping everything else. This is how
a bundle built before the probe gets calibrated clicks without a rebuild."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from build_map.bundle.read import load_bundle
from build_map.bundle.write import write_bundle
from build_map.features.output_probe import clear_share
from build_map.features.probe_config import ProbeConfig
from build_map.pipeline.build import write_map
from build_map.pipeline.probe_stage import ProbeSummary, probe_stage
from build_map.steering.session import load_parts


def reprobe_bundle(
    path: str | Path, device: str = "auto", cfg: ProbeConfig | None = None
) -> tuple[ProbeSummary, float]:
    """Probe the bundle at ``path`` in place (an atomic rewrite); the probe's summary and the share
    of features that steer clearly."""
    bundle = load_bundle(path, label_edits=False)  # the user's label edits stay beside it, not baked in
    cfg = cfg or ProbeConfig()
    loaded, sae, hookpoint = load_parts(bundle, device)
    features, summary = probe_stage(loaded, sae, hookpoint, bundle.features, cfg)
    manifest = dict(bundle.manifest)
    manifest["probe"] = summary.manifest()
    manifest["build"] = {**manifest.get("build", {}), "probe": asdict(cfg)}
    model = manifest.get("model") or {}
    title = f"{model.get('name') or model.get('spec')} · {hookpoint} · {sae.d_sae:,} SAE features"
    write_bundle(bundle.path, manifest=manifest, features=features, examples=bundle.examples,
                 clusters=bundle.clusters, render_map=lambda folder: write_map(folder, features, title),
                 overwrite=True)  # fmt: skip
    return summary, clear_share(features)
