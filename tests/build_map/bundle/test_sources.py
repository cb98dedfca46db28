"""What a bundle's manifest names: local models stored as absolute paths, overrides win, the SAE
found beside the bundle."""

from __future__ import annotations

import pytest

from build_map.bundle.read import Bundle
from build_map.bundle.sources import BundleSourceError, model_spec, sae_path, stored_model_spec


def _bundle(tmp_path, manifest) -> Bundle:
    return Bundle(tmp_path, manifest, features=None, clusters=None)


def test_local_models_are_stored_absolute_and_ids_as_given(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert stored_model_spec("model") == str((tmp_path / "model").resolve())
    assert stored_model_spec("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert stored_model_spec(None) is None


def test_model_spec_embedded_default_and_override(tmp_path):
    assert model_spec(_bundle(tmp_path, {"model": {"spec": None}})) is None
    assert model_spec(_bundle(tmp_path, {"model": {"spec": "embedded"}})) is None
    assert model_spec(_bundle(tmp_path, {"model": {"spec": "/m"}}), override="/other") == "/other"


def test_sae_path_is_looked_for_beside_the_bundle(tmp_path):
    (tmp_path / "sae").mkdir()
    assert sae_path(_bundle(tmp_path, {"sae": {"path": "sae"}})) == tmp_path / "sae"
    with pytest.raises(BundleSourceError, match="pass --sae PATH"):
        sae_path(_bundle(tmp_path, {"sae": {"path": "gone"}}))
    with pytest.raises(BundleSourceError, match="no such file"):
        sae_path(_bundle(tmp_path, {}), override=str(tmp_path / "missing"))
