"""The demo's buffer: kept for the bundle's statistics while the SAE is trained here, deleted once
both are done, never deleted when someone kept it or when a harvest still has to be resumed."""

from __future__ import annotations

import json

import pytest

from build_map.activations.buffer import FORMAT_VERSION, META_FILE
from build_map.pipeline import demo
from build_map.sae.train import METRICS_FILE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    buffer, sae = tmp_path / "buffer", tmp_path / "sae"
    monkeypatch.setattr(demo, "demo_buffer_folder", lambda: buffer)
    monkeypatch.setattr(demo, "demo_sae_folder", lambda: sae)
    built = []
    monkeypatch.setattr(demo, "build_bundle", lambda cfg: built.append(cfg) or "summary")
    return buffer, sae, built


def _finish_buffer(buffer, complete=True):
    buffer.mkdir(exist_ok=True)
    (buffer / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "complete": complete}))


def _training(buffer, sae, fail=False):
    def train(**kwargs):
        assert kwargs["keep_buffer"]
        _finish_buffer(buffer, complete=not fail)
        if fail:
            raise KeyboardInterrupt
        sae.mkdir()
        (sae / METRICS_FILE).write_text("{}")
        return sae

    return train


def test_a_fresh_demo_reads_its_harvest_then_deletes_it(cache, tmp_path, monkeypatch):
    buffer, sae, built = cache
    monkeypatch.setattr(demo, "demo_sae", _training(buffer, sae))
    folder, summary = demo.demo_bundle(out=tmp_path / "bundle")
    assert summary == "summary" and built[0].activations == str(buffer)
    assert not buffer.exists()


def test_a_kept_buffer_is_read_and_stays(cache, tmp_path, monkeypatch):
    buffer, sae, built = cache
    _finish_buffer(buffer)
    sae.mkdir()
    (sae / METRICS_FILE).write_text("{}")
    monkeypatch.setattr(demo, "demo_sae", lambda **kwargs: sae)
    demo.demo_bundle(out=tmp_path / "bundle")
    assert built[0].activations == str(buffer) and (buffer / META_FILE).is_file()


def test_a_harvest_left_by_an_interrupted_training_is_deleted_once_trained(cache, tmp_path, monkeypatch):
    buffer, sae, built = cache
    _finish_buffer(buffer)  # finished, but no SAE beside it: training stopped after the harvest
    monkeypatch.setattr(demo, "demo_sae", _training(buffer, sae))
    demo.demo_bundle(out=tmp_path / "bundle")
    assert built[0].activations == str(buffer) and not buffer.exists()


def test_an_interrupted_harvest_stays_to_be_resumed(cache, tmp_path, monkeypatch):
    buffer, sae, built = cache
    monkeypatch.setattr(demo, "demo_sae", _training(buffer, sae, fail=True))
    with pytest.raises(KeyboardInterrupt):
        demo.demo_bundle(out=tmp_path / "bundle")
    assert (buffer / META_FILE).is_file() and not built


def test_without_a_buffer_the_statistics_run_the_model(cache, tmp_path, monkeypatch):
    _, sae, built = cache
    sae.mkdir()
    (sae / METRICS_FILE).write_text("{}")
    monkeypatch.setattr(demo, "demo_sae", lambda **kwargs: sae)
    demo.demo_bundle(out=tmp_path / "bundle")
    assert built[0].activations is None
