"""The builder end to end on a tiny model: bundle schema, planted groups, labels, hiding, errors."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from build_map.activations.buffer import HarvestError
from build_map.bundle.read import load_bundle
from build_map.bundle.schema import BundleError
from build_map.labels.files import LabelFileError
from build_map.lm.hookpoints import HookpointError
from build_map.pipeline.build import BuildConfig, build_bundle
from build_map.sae.formats import save_sae
from build_map.sae.model import SAEConfig, SAEError, SparseAutoencoder
from tests.support.tiny import TINY_D_MODEL

N_GROUPS, PER_GROUP = 4, 30
N_FEATURES = N_GROUPS * PER_GROUP
GROUP_WORDS = ["weather rain", "music guitar", "cooking pasta", "sports football"]
SCRIPT_LABEL = "<script>alert('x')</script> rain"
HIDDEN = {3, 40}


def planted_sae(d_in: int = TINY_D_MODEL) -> tuple[SparseAutoencoder, np.ndarray]:
    """Decoder rows = one of N_GROUPS random centres + small noise; encoder = decoder transpose."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(N_GROUPS, d_in, generator=gen)
    groups = np.repeat(np.arange(N_GROUPS), PER_GROUP)
    rows = centres[torch.as_tensor(groups)] + 0.25 * torch.randn(N_FEATURES, d_in, generator=gen)
    rows = rows / rows.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=N_FEATURES, activation="topk", k=8, hookpoint="model.layers.1")
    )
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    return sae, groups


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    sae, groups = planted_sae()
    save_sae(sae, folder / "sae")
    labels = pd.DataFrame(
        {"feature": np.arange(N_FEATURES), "label": [f"{GROUP_WORDS[g]} {i}" for i, g in enumerate(groups)]}
    )
    labels.loc[0, "label"] = SCRIPT_LABEL
    labels.to_csv(folder / "labels.csv", index=False)
    (folder / "hide.txt").write_text("# moderated\n" + "\n".join(map(str, sorted(HIDDEN))) + "\n")
    return folder, groups


def _config(folder, out, **overrides) -> BuildConfig:
    values = dict(
        sae=str(folder / "sae"),
        out=str(out),
        n_tokens=1500,
        corpus=("chatterbot",),
        labels=str(folder / "labels.csv"),
        hide=str(folder / "hide.txt"),
        device="cpu",
    )
    return BuildConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def built(inputs, tiny_loaded, tmp_path_factory):
    folder, groups = inputs
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    summary = build_bundle(_config(folder, out), loaded=tiny_loaded)
    return load_bundle(out), summary, groups


def test_schema_one_row_per_feature(built):
    bundle, summary, _ = built
    features = bundle.features
    assert len(features) == N_FEATURES == summary.n_features
    assert features["feature"].tolist() == list(range(N_FEATURES))
    assert np.isfinite(features[["x", "y"]].to_numpy()).all()
    schema = pq.read_schema(bundle.path / "features.parquet")
    assert str(schema.field("density").type) == "float"
    assert len(bundle.cluster_columns) >= 3
    assert set(bundle.clusters["level"]) == set(range(len(bundle.cluster_columns)))
    manifest = bundle.manifest
    assert manifest["hookpoint"] == "model.layers.1"
    assert manifest["sae"]["format"] == "native" and len(manifest["sae"]["sha256"]) == 64
    assert manifest["n_features"] == N_FEATURES and manifest["d_model"] == TINY_D_MODEL
    assert manifest["corpus"]["n_tokens"] >= 1500
    assert "datamapplot" in manifest["packages"]
    examples = bundle.examples
    assert {"top"} <= set(examples["bucket"])
    assert (examples["tokens"].map(len) == examples["acts"].map(len)).all()


def test_the_build_probes_every_live_visible_feature(built):
    bundle, summary, _ = built
    features = bundle.features
    probed = features["steer_strength"].notna()
    assert bundle.probed and probed.tolist() == (~features["dead"] & ~features["hidden"]).tolist()
    assert (features.loc[probed, "steerability"].between(0, 1)).all()
    assert str(pq.read_schema(bundle.path / "features.parquet").field("steer_strength").type) == "float"
    assert bundle.manifest["probe"]["n_probed"] == int(probed.sum()) == summary.n_probed
    assert bundle.manifest["build"]["probe"]["clear_kl"] > 0
    assert any(line.startswith("output probe:") and "steer clearly" in line for line in summary.lines())
    assert any(
        line.startswith("label scores (offline-overlap") and "above chance" in line
        for line in summary.lines()
    )


def test_planted_groups_recovered_and_named_apart(built):
    bundle, _, groups = built
    best = max(bundle.cluster_columns, key=lambda c: adjusted_rand_score(groups, bundle.features[c]))
    assert adjusted_rand_score(groups, bundle.features[best]) >= 0.8
    majority = [bundle.features.loc[groups == g, best].mode()[0] for g in range(N_GROUPS)]
    assert len(set(majority)) == N_GROUPS, majority


def test_imported_labels_win(built):
    features = built[0].features
    assert (features["label_source"] == "imported").all()
    assert features.loc[5, "label"].startswith("weather rain")


def test_hidden_features_kept_but_not_drawn(built):
    bundle = built[0]
    assert set(bundle.features.index[bundle.features["hidden"]]) == HIDDEN
    page = bundle.map_html.read_text()
    hover = json.loads(_embedded(page, "hoverDataEncoded"))
    points = feather.read_table(io.BytesIO(_embedded(page, "pointDataEncoded")))
    drawn = set(hover["feature"])
    assert not drawn & HIDDEN
    live = set(bundle.features.index[~bundle.features["dead"] & ~bundle.features["hidden"]])
    assert drawn == live and points.num_rows == len(live)


def test_map_is_offline_and_escaped(built):
    page = built[0].map_html.read_text()
    assert re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.IGNORECASE) == []
    assert "<script>alert" not in page


def _embedded(page: str, name: str) -> bytes:
    match = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)";', page)
    assert match, f"{name} not found in map.html"
    return gzip.decompress(base64.b64decode(match.group(1)))


# ---------------------------------------------------------------- bad inputs leave nothing behind


def _refused(tmp_path, tiny_loaded, error, match, config):
    with pytest.raises(error, match=match):
        build_bundle(config, loaded=tiny_loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_sae_model_mismatch(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    save_sae(planted_sae(d_in=32)[0], tmp_path / "narrow")
    _refused(
        tmp_path,
        tiny_loaded,
        SAEError,
        r"d_in 32 does not match the model's hidden size 64",
        _config(folder, tmp_path / "out", sae=str(tmp_path / "narrow")),
    )


def test_a_folder_that_is_no_activation_buffer(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    (tmp_path / "not-a-buffer").mkdir()
    config = _config(folder, tmp_path / "out", activations=str(tmp_path / "not-a-buffer"))
    _refused(tmp_path, tiny_loaded, HarvestError, r"holds no activation buffer .*harvest first", config)


def test_corrupt_labels_file(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    (tmp_path / "bad.csv").write_text("id,name\n1,x\n")
    _refused(
        tmp_path,
        tiny_loaded,
        LabelFileError,
        "missing column",
        _config(folder, tmp_path / "out", labels=str(tmp_path / "bad.csv")),
    )


def test_out_of_range_labels(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    (tmp_path / "range.csv").write_text(f"feature,label\n{N_FEATURES},too far\n")
    _refused(
        tmp_path,
        tiny_loaded,
        LabelFileError,
        rf"0\.\.{N_FEATURES - 1}",
        _config(folder, tmp_path / "out", labels=str(tmp_path / "range.csv")),
    )


def test_unknown_hookpoint(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    _refused(
        tmp_path,
        tiny_loaded,
        HookpointError,
        "model.layers.0",
        _config(folder, tmp_path / "out", hookpoint="model.layers.7"),
    )


def test_existing_output_needs_overwrite(inputs, tiny_loaded, tmp_path):
    folder, _ = inputs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="--overwrite"):
        build_bundle(_config(folder, tmp_path / "out"), loaded=tiny_loaded)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_manifest_names_a_local_model_by_its_absolute_path(inputs, tiny_loaded, tmp_path, monkeypatch):
    """A bundle built with a relative ``--model ./folder`` still finds its model from elsewhere."""
    folder, _ = inputs
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    build_bundle(_config(folder, tmp_path / "b", model="my-model"), loaded=tiny_loaded)
    assert load_bundle(tmp_path / "b").manifest["model"]["spec"] == str((tmp_path / "my-model").resolve())


@pytest.mark.parametrize(("field", "value", "message"), [("seed", -1, "--seed -1 is out of range"),
                                                         ("n_tokens", 0, "positive number of corpus tokens")])  # fmt: skip
def test_bad_build_options_fail_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig(sae="s", out="o", **{field: value})
