"""The bundle contract: the one interface between the builder and the explorer.

BUNDLE/
  manifest.json     how the bundle was made (model, hookpoint, SAE source/format/sha256, ...)
  features.parquet  one row per feature (FEATURE_SCHEMA, PROBE_SCHEMA, SCORE_SCHEMA, cluster_0..cluster_{L-1} coarse→fine)
  examples.parquet  activating contexts per feature (EXAMPLE_SCHEMA)
  clusters.parquet  one row per named cluster per level (CLUSTER_SCHEMA)
  map.html          the DataMapPlot map
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.parquet"
EXAMPLES = "examples.parquet"
CLUSTERS = "clusters.parquet"
MAP_HTML = "map.html"
REQUIRED_FILES = (MANIFEST, FEATURES, EXAMPLES, CLUSTERS, MAP_HTML)

FEATURE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("label", pa.string()),
        ("label_source", pa.string()),  # auto | imported | llm
        ("density", pa.float32()),  # fraction of tokens where the feature is active
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),  # mean over the tokens where it is active
        ("top_tokens", pa.list_(pa.string())),  # tokens it fires on most
        ("top_logits", pa.list_(pa.string())),  # logit lens: tokens the direction promotes
        ("bottom_logits", pa.list_(pa.string())),  # ... and suppresses
        ("neighbors", pa.list_(pa.int32())),  # nearest features by decoder cosine
        ("dead", pa.bool_()),
        ("hidden", pa.bool_()),  # moderated out: not drawn, cannot be steered
    ]
)
# The output-effect probe (build_map.features.output_probe). Bundles built before it lack these
# columns; they still open, with the defaults of PROBE_DEFAULTS (not probed).
PROBE_SCHEMA = pa.schema(
    [
        ("steer_strength", pa.float32()),  # the strength one click sets (× max act); NaN: not probed
        ("steerability", pa.float32()),  # next-token probability moved onto its own tokens, 0..1
        ("steer_kl", pa.float32()),  # KL(steered || unsteered) at steer_strength, nats
        ("output_promotes", pa.list_(pa.string())),  # tokens it makes likelier, through the model
        ("output_suppresses", pa.list_(pa.string())),  # ... and less likely
    ]
)
# How well each label describes its feature on held-out examples (build_map.labels.scores). Bundles
# built before the scores lack these columns; they open with SCORE defaults (NaN: not scored).
SCORE_SCHEMA = pa.schema(
    [
        ("detection", pa.float32()),  # label picks the feature's example among its neighbours', 0..1
        ("fuzzing", pa.float32()),  # label picks the words the feature fires on in an example, 0..1
        ("label_judge", pa.string()),  # who judged: "offline-overlap", an LLM's name
    ]
)
EXAMPLE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("rank", pa.int32()),  # order within the bucket
        ("bucket", pa.string()),  # "top" or an activation quantile such as "q50"
        ("act", pa.float32()),  # the activation at the example's focus token
        ("tokens", pa.list_(pa.string())),
        ("acts", pa.list_(pa.float32())),  # per-token activation of this feature
    ]
)
CLUSTER_SCHEMA = pa.schema(
    [
        ("level", pa.int32()),  # 0 = coarsest
        ("cluster", pa.int32()),
        ("name", pa.string()),
        ("size", pa.int32()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("parent", pa.int32()),  # cluster id at level-1, -1 at level 0
    ]
)


def add_probe_defaults(features: pd.DataFrame) -> bool:
    """Give a feature table without probe columns the not-probed defaults (NaN strength and
    steerability, no output tokens), in place; True when some feature was probed."""
    probed = all(name in features.columns for name in PROBE_SCHEMA.names) and bool(
        features["steer_strength"].notna().any()
    )
    for name in PROBE_SCHEMA.names:
        if name not in features.columns:
            is_list = pa.types.is_list(PROBE_SCHEMA.field(name).type)
            features[name] = [[] for _ in range(len(features))] if is_list else float("nan")
    return probed


def add_score_defaults(features: pd.DataFrame) -> bool:
    """Give a feature table without label scores NaN scores and no judge, in place; True when some
    feature was scored."""
    scored = "detection" in features.columns and bool(features["detection"].notna().any())
    for name in SCORE_SCHEMA.names:
        if name not in features.columns:
            features[name] = None if name == "label_judge" else float("nan")
    return scored


class BundleError(ValueError):
    """A bundle is missing, incomplete, of another version, or would be overwritten."""


def cluster_columns(features: pd.DataFrame) -> list[str]:
    """``cluster_0`` (coarsest) … ``cluster_{L-1}`` (finest)."""
    names = [c for c in features.columns if c.startswith("cluster_") and c[8:].isdigit()]
    return sorted(names, key=lambda c: int(c[8:]))


def features_schema(n_levels: int) -> pa.Schema:
    schema = pa.unify_schemas([FEATURE_SCHEMA, PROBE_SCHEMA, SCORE_SCHEMA])
    for level in range(n_levels):
        schema = schema.append(pa.field(f"cluster_{level}", pa.string()))
    return schema
