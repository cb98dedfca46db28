"""Harvesting into the activation buffer: a seeded shuffle of the stream, resumable bit for bit, never
silently replaced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from build_map.activations.batches import iter_activation_batches
from build_map.activations.buffer import ActivationBuffer, HarvestError, slot_permutation
from build_map.activations.harvest import HarvestConfig, harvest_to_buffer
from build_map.common.devices import resolve_compute_dtype
from build_map.lm.corpus import CorpusConfig, token_sequences

HOOKPOINT = "model.layers.0"  # of 2 layers: layer 1 must never run


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }  # fmt: skip
        for i in range(30)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _harvest(loaded, corpus_file, folder, n_tokens=150, **kwargs):
    cfg = CorpusConfig(sources=(str(corpus_file),), max_seq_len=32, seed=5)
    kwargs.setdefault("compute_dtype", "model")  # float32, so rows compare exactly with the stream
    harvest = HarvestConfig(batch_tokens=kwargs.pop("batch_tokens", 96), **kwargs)
    return harvest_to_buffer(loaded, HOOKPOINT, cfg, n_tokens, folder, harvest=harvest, progress=False)


def _unshuffled(buffer):
    """Rows back in harvest order (row k sits in slot perm[k])."""
    perm = slot_permutation(buffer.meta["n_tokens"], buffer.meta["seed"])
    return np.asarray(buffer.array)[perm], np.asarray(buffer.token_ids)[perm]


def test_buffer_round_trip_is_shuffled_stream(tiny_loaded, corpus_file, tmp_path):
    buffer = _harvest(tiny_loaded, corpus_file, tmp_path / "buf")
    assert len(buffer) == 150 and buffer.d_model == 64 and buffer.array.dtype == np.float32
    meta = json.loads((tmp_path / "buf" / "meta.json").read_text())
    assert meta["complete"] and meta["n_filled"] == 150 and meta["hookpoint"] == HOOKPOINT
    assert meta["corpus"]["sources"] == [str(corpus_file)] and meta["model"] == "tiny-llama"
    # In harvest order the rows are exactly the activation stream, truncated to n_tokens.
    cfg = CorpusConfig(sources=(str(corpus_file),), max_seq_len=32, seed=5)
    stream = iter_activation_batches(
        tiny_loaded.model, tiny_loaded.tokenizer, HOOKPOINT, token_sequences(tiny_loaded.tokenizer, cfg), 96
    )
    expected = torch.cat([b.acts for b in stream])[:150].numpy()
    rows, tokens = _unshuffled(buffer)
    np.testing.assert_array_equal(rows, expected)
    assert not np.array_equal(np.asarray(buffer.array), expected)  # stored shuffled
    assert (tokens != tiny_loaded.tokenizer.pad_token_id).all()  # never padding
    reopened = ActivationBuffer.open(tmp_path / "buf")
    batches = list(reopened.iter_batches(64))
    assert [len(b) for b in batches] == [64, 64, 22]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), np.asarray(buffer.array))
    train, held = reopened.split(0.1)
    assert (len(train), len(held)) == (135, 15) and held.stop == 150 and train.stop == held.start
    assert [len(b) for b in reopened.iter_batches(10, held.start, held.stop)] == [10, 5]


def test_slot_permutation_is_a_permutation():
    perm = slot_permutation(1000, 3)
    assert sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, np.arange(1000))
    np.testing.assert_array_equal(perm, slot_permutation(1000, 3))


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, n_batches):
    import build_map.activations.harvest as harvest_module

    real = harvest_module.batch_activations
    seen = []

    def flaky(*args, **kwargs):
        if len(seen) == n_batches:
            raise _Interrupt
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "batch_activations", flaky)
    return seen


@pytest.mark.parametrize("resume_batch_tokens", [96, 40])
def test_resume_equals_uninterrupted(tiny_loaded, corpus_file, tmp_path, monkeypatch, resume_batch_tokens):
    whole = _harvest(tiny_loaded, corpus_file, tmp_path / "whole")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupt):
            _harvest(tiny_loaded, corpus_file, tmp_path / "part")
    meta = json.loads((tmp_path / "part" / "meta.json").read_text())
    assert 0 < meta["n_filled"] < 150 and not meta["complete"]
    with pytest.raises(HarvestError, match="unfinished"):
        ActivationBuffer.open(tmp_path / "part")
    seen = _interrupt_after(monkeypatch, 10**6)
    resumed = _harvest(tiny_loaded, corpus_file, tmp_path / "part", batch_tokens=resume_batch_tokens)
    assert seen, "resuming ran the model"
    np.testing.assert_allclose(np.asarray(resumed.array), np.asarray(whole.array), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(resumed.token_ids), np.asarray(whole.token_ids))
    if resume_batch_tokens == 96:  # same batching: bit-identical
        np.testing.assert_array_equal(np.asarray(resumed.array), np.asarray(whole.array))
    # A finished buffer is reused without running the model.
    seen.clear()
    _harvest(tiny_loaded, corpus_file, tmp_path / "part")
    assert seen == []


def test_mismatched_request_is_refused_or_overwritten(tiny_loaded, corpus_file, tmp_path):
    _harvest(tiny_loaded, corpus_file, tmp_path / "buf")
    with pytest.raises(HarvestError, match="n_tokens_requested: 150 there, 120 asked"):
        _harvest(tiny_loaded, corpus_file, tmp_path / "buf", n_tokens=120)
    cfg = CorpusConfig(sources=(str(corpus_file),), max_seq_len=32, seed=5)
    buffer = harvest_to_buffer(
        tiny_loaded, HOOKPOINT, cfg, 120, tmp_path / "buf", overwrite=True, progress=False
    )
    assert len(buffer) == 120


def test_float16_storage_and_short_corpus(tiny_loaded, corpus_file, tmp_path):
    full = _harvest(tiny_loaded, corpus_file, tmp_path / "f32", n_tokens=100)
    half = _harvest(tiny_loaded, corpus_file, tmp_path / "f16", n_tokens=100, storage_dtype="float16")
    assert half.array.dtype == np.float16
    batch = next(half.iter_batches(100))
    assert batch.dtype == torch.float32
    np.testing.assert_allclose(batch.numpy(), np.asarray(full.array), rtol=2e-3, atol=2e-3)
    # Asking for more tokens than the corpus has keeps what there is, still shuffled.
    short = _harvest(tiny_loaded, corpus_file, tmp_path / "short", n_tokens=5_000)
    assert 150 < len(short) < 5_000 and short.meta["n_tokens_requested"] == 5_000
    assert np.abs(np.asarray(short.array)).sum(axis=1).min() > 0  # no empty slots left


def test_bfloat16_harvest_is_close_and_leaves_the_model_alone(tiny_loaded, corpus_file, tmp_path):
    full = _harvest(tiny_loaded, corpus_file, tmp_path / "f32", n_tokens=100)
    bf16 = _harvest(tiny_loaded, corpus_file, tmp_path / "bf16", n_tokens=100, compute_dtype="bfloat16")
    assert bf16.meta["compute_dtype"] == "bfloat16" and bf16.array.dtype == np.float32
    a, b = np.asarray(full.array), np.asarray(bf16.array)
    relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert np.median(relative) < 0.03
    assert next(tiny_loaded.model.parameters()).dtype == torch.float32
    assert resolve_compute_dtype(tiny_loaded.model, "model") == torch.float32
    assert resolve_compute_dtype(tiny_loaded.model, "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(HarvestError, match="auto, model"):
        HarvestConfig(compute_dtype="fp8")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_compute_dtype_takes_bf16_only_where_the_cpu_has_it(tiny_loaded, monkeypatch, native_bf16):
    # Emulated bf16 is ~8x slower than fp32 (a 2-core AMD EPYC harvested 104 tok/s instead of 580).
    monkeypatch.setattr("build_map.common.devices.cpu_has_fast_bf16", lambda: native_bf16)
    want = torch.bfloat16 if native_bf16 else torch.float32
    assert resolve_compute_dtype(tiny_loaded.model, "auto") == want
    from build_map.pipeline.demo import DEMO_HARVEST

    assert DEMO_HARVEST.compute_dtype == "auto"  # the demo follows the machine


def test_open_missing_folder_errors(tmp_path):
    with pytest.raises(HarvestError, match="harvest first"):
        ActivationBuffer.open(tmp_path)


# ------------------------------------------------------------------------------ the real embedded default


@pytest.mark.slow
def test_embedded_default_loads_and_renders_chat(embedded):
    assert embedded.model.config.hidden_size == 576
    assert embedded.model.config.num_hidden_layers == 30
    ids = embedded.tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=False)
    assert "<|im_start|>user\nHello!<|im_end|>" in ids


@pytest.mark.slow
def test_embedded_harvest_layer_15(embedded, tmp_path):
    cfg = CorpusConfig(sources=("chatterbot",), max_seq_len=128, seed=0)
    harvest = HarvestConfig(batch_tokens=512)
    buffer = harvest_to_buffer(
        embedded, "model.layers.15", cfg, 256, tmp_path / "buf", harvest, progress=False
    )
    acts = np.asarray(buffer.array)
    assert acts.shape == (256, 576) and np.isfinite(acts).all()
    norms = np.linalg.norm(acts, axis=1)
    assert 50 < np.median(norms) < 500, np.median(norms)  # ~175 measured; the first position is ~25,000
    assert norms.max() < 5_000
