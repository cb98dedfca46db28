"""Strength sweep on a tiny Llama with a planted feature whose readout is known.

Feature 0 is planted: its decoder row is the unembedding of token T (nudging it makes the model
write T) and its encoder column reads the hookpoint direction that separates "reading T" from an
ordinary reply. So the unsteered re-read of a steered reply should show the feature growing with
strength, from ~0 at strength 0.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from build_map.cli.sweep import parse_strengths
from build_map.lm.capture import cut_forward
from build_map.sae.model import SAEConfig, SparseAutoencoder
from build_map.steering.engine import SteeringEngine
from build_map.steering.requests import Edit, SamplingConfig
from build_map.steering.sweep import reread, sweep
from build_map.steering.sweep_plots import plot_sweep
from build_map.steering.sweep_window import SweepError, suggest_window, sweep_summary
from tests.support.tiny import TINY_D_MODEL, make_tiny_model

HOOKPOINT, D_SAE, PLANTED = "model.layers.1", 16, 0
PROMPTS = ["hello, how are you today?", "what is your favourite colour?"]
STRENGTHS = [0.0, 0.5, 1.0, 3.0]


def _prompt_ids(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def planted_sae(model, tokenizer) -> tuple[SparseAutoencoder, torch.Tensor]:
    """(SAE, per-feature scale) with feature PLANTED reading and writing token T (see the module doc)."""
    token = tokenizer(" blue", add_special_tokens=False)["input_ids"][0]
    prompt = _prompt_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        ordinary = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    reading_t = cut_forward(model, HOOKPOINT, torch.tensor([prompt + [token] * 8]))[0, len(prompt) :]
    reading_other = cut_forward(model, HOOKPOINT, ordinary)[0, len(prompt) :]
    direction = reading_t.mean(0) - reading_other.mean(0)
    direction = direction / direction.norm()
    threshold = ((reading_t @ direction).min() + (reading_other @ direction).max()) / 2
    gain = 1.0 / float((reading_t @ direction).mean() - threshold)  # max act ~1, like the residual
    gen = torch.Generator().manual_seed(0)
    others = torch.randn(D_SAE, TINY_D_MODEL, generator=gen)
    others = others / others.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(SAEConfig(d_in=TINY_D_MODEL, d_sae=D_SAE, activation="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(others)
        sae.W_enc.copy_(others.T)
        sae.b_enc.fill_(-0.1)
        unembed = model.lm_head.weight[token]
        sae.W_dec[PLANTED] = unembed / unembed.norm()
        sae.W_enc[:, PLANTED] = direction * gain
        sae.b_enc[PLANTED] = -threshold * gain
    sae = sae.eval().requires_grad_(False)
    scale = torch.full((D_SAE,), 0.25)
    scale[PLANTED] = float(sae.encode(reading_t)[:, PLANTED].max())
    return sae, scale


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=5)
    sae, scale = planted_sae(model, tiny_tokenizer)
    engine = SteeringEngine(model, tiny_tokenizer, sae, HOOKPOINT, scale, hidden={D_SAE - 1})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def frame(engine):
    return sweep(engine, PLANTED, PROMPTS, STRENGTHS, max_new_tokens=12)


def test_one_row_per_strength_and_prompt(frame):
    assert len(frame) == len(STRENGTHS) * len(PROMPTS)
    assert sorted(set(frame.strength)) == STRENGTHS
    assert set(frame.columns) >= {
        "strength",
        "prompt",
        "reply",
        "effect",
        "coherence",
        "perplexity",
        "repetition",
    }
    assert np.allclose(frame.perplexity, np.exp(-frame.coherence))


def test_strength_zero_is_the_unsteered_generation(engine, frame, tiny_tokenizer):
    model, sae = engine.model, engine.sae
    for index, text in enumerate(PROMPTS):
        row = frame[(frame.strength == 0) & (frame.prompt_index == index)].iloc[0]
        assert row.reply == engine.generate(text, sampling=SamplingConfig(max_new_tokens=12))
        prompt = _prompt_ids(tiny_tokenizer, text)
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        reply = ids[0, len(prompt) :]
        hidden = cut_forward(model, HOOKPOINT, ids)[0, len(prompt) :]
        effect = float(sae.encode(hidden)[:, PLANTED].mean()) / float(engine.feature_scale[PLANTED])
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        coherence = float(logprobs.gather(-1, reply[:, None]).mean())
        assert row.effect == pytest.approx(effect, abs=1e-5)
        assert row.coherence == pytest.approx(coherence, abs=1e-5)


def test_effect_rises_with_strength(frame):
    means = sweep_summary(frame)["effect"]
    assert means[0.0] < 0.1
    assert means[3.0] > 0.5
    assert (np.diff(means.to_numpy()) > -0.05).all()  # monotone, up to a little noise


def test_batching_does_not_change_the_rows(engine, frame):
    alone = sweep(engine, [Edit(PLANTED, 1.0)], PROMPTS[:1], [0.0, 1.0], max_new_tokens=12, batch_rows=1)
    batched = frame[(frame.prompt_index == 0) & frame.strength.isin([0.0, 1.0])]
    assert alone.reply.tolist() == batched.reply.tolist()
    assert np.allclose(alone.effect, batched.effect, atol=1e-5)


def test_reread_of_an_empty_reply_is_nan(engine, tiny_tokenizer):
    effects, coherence = reread(engine, [_prompt_ids(tiny_tokenizer, "hi")], [[]], [PLANTED])
    assert np.isnan(effects[0]).all() and np.isnan(coherence[0])


def test_refusals(engine):
    with pytest.raises(SweepError, match="not a feature id"):
        sweep(engine, ["x"], PROMPTS, STRENGTHS)
    with pytest.raises(ValueError, match="hidden"):
        sweep(engine, D_SAE - 1, PROMPTS, STRENGTHS, max_new_tokens=2)


def _synthetic(effects, coherences, strengths=(0.0, 0.5, 1.0, 2.0, 4.0)) -> pd.DataFrame:
    return pd.DataFrame(
        {"strength": strengths, "effect": effects, "coherence": coherences, "repetition": 0.0,
         "n_tokens": 10, "perplexity": np.exp(-np.asarray(coherences)), "prompt": "p", "reply": "r"}
    )  # fmt: skip


def test_window_starts_when_the_effect_rises_and_stops_when_coherence_collapses():
    frame = _synthetic([0.0, 0.02, 0.3, 0.6, 0.9], [-2.0, -2.1, -2.4, -2.9, -4.5])
    assert suggest_window(frame) == (1.0, 2.0)
    assert suggest_window(_synthetic([0.0] * 5, [-2.0] * 5)) is None
    with pytest.raises(SweepError, match="strength 0"):
        suggest_window(_synthetic([0.0] * 4, [-2.0] * 4, strengths=(0.5, 1.0, 2.0, 4.0)))


def test_plots_are_written_offline_and_escape_replies(tmp_path):
    frame = _synthetic([0.0, 0.02, 0.3, 0.6, 0.9], [-2.0, -2.1, -2.4, -2.9, -4.5])
    frame["reply"] = "<script>alert('x')</script>"
    plot_sweep(frame, tmp_path / "s.png", tmp_path / "s.html", title="<b>feature</b>")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "s.html").read_text()
    assert "Bokeh" in page and "cdn.bokeh.org" not in page  # resources inlined
    assert "<script>alert(" not in page and "<b>feature</b>" not in page
    assert "<title>&lt;b&gt;feature&lt;/b&gt;</title>" in page  # escaped once, not twice


def test_parse_strengths():
    assert parse_strengths("0,0.25,...,1") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_strengths("0, 1, 3") == (0.0, 1.0, 3.0)
    assert parse_strengths("0,1.5,...,4") == (0.0, 1.5, 3.0, 4.0)
    with pytest.raises(Exception, match="comma-separated"):
        parse_strengths("0,...,4")


def test_cli_writes_parquet_png_html(tmp_path, capsys):
    from build_map.cli.main import main as build_map_main
    from tests.support.tiny_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b", real_map=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nwhat is blue?\n")
    out = tmp_path / "out"
    code = build_map_main(
        ["sweep", str(bundle), "--feature", "3", "--prompts", str(prompts), "--strengths", "0,1,...,2",
         "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    table = pd.read_parquet(out / "sweep.parquet")
    assert len(table) == 3 * 2 and set(table.prompt) == {"hello there", "what is blue?"}
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.html").stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["features"] == [3]
    assert "suggested window:" in capsys.readouterr().out
    assert build_map_main(["sweep", str(bundle), "--feature", "7", "--out", str(out), "--device", "cpu"]) == 2
    assert "hidden" in capsys.readouterr().err
