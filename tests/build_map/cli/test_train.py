"""`build-map train` end to end on the tiny model, and its argument errors (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch

from build_map.cli.base import ERROR_EXIT, count
from build_map.cli.main import main
from build_map.sae.formats import load_sae
from build_map.sae.train import load_metrics


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved as a local model folder, as a user would pass with --model."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "how", "are", "you"]
    gen = torch.Generator().manual_seed(0)
    paragraphs = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (40,), generator=gen)) for _ in range(200)
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def train_args(tiny_folder, corpus_file, tmp_path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(tiny_folder), "--hookpoint", "1", "--tokens", "4k", "--latents", "128",
        "-k", "4", "--batch-size", "256", "--corpus", str(corpus_file), "--buffer", str(tmp_path / "buffer"),
        "--out", str(tmp_path / "sae"), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_train_end_to_end(tiny_folder, corpus_file, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(train_args(tiny_folder, corpus_file, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "mean L0" in out and "dead" in out and "harvest" in out
    sae = load_sae(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae, sae.cfg.k) == (64, 128, 4)
    assert sae.cfg.hookpoint == "model.layers.1"
    metrics = load_metrics(tmp_path / "sae")
    assert f"FVU {metrics.fvu:.3f}" in out
    assert metrics.tokens_seen > 3000 and metrics.fvu < 0.8  # 15 steps on dense, random-model activations
    record = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert record["training"]["n_latents"] == 128 and record["corpus"]["sources"] == [str(corpus_file)]


def test_unknown_hookpoint_is_an_error_message(tiny_folder, corpus_file, tmp_path, capsys):
    args = train_args(tiny_folder, corpus_file, tmp_path)
    args[args.index("--hookpoint") + 1] = "7"
    assert main(args) == ERROR_EXIT
    err = capsys.readouterr().err
    assert "error: Unknown hookpoint '7'" in err and "model.layers.0, model.layers.1" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--latents", "64", "-k", "65"], "error: k must be between 1 and the number of latents (64)"),
        (["--holdout-fraction", "1.5"], "error: holdout_fraction must be in (0, 1)"),
    ],
)
def test_bad_settings_fail_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "build_map.pipeline.training_run.load_model", lambda *a, **k: pytest.fail("loaded a model")
    )
    assert main(["train", "--out", str(tmp_path), *extra]) == ERROR_EXIT
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "0"], "argument --tokens: must be a positive whole number"),
        (["--tokens", "lots"], "argument --tokens: 'lots' is not a number"),
        (["--latents", "-5"], "argument --latents: must be a positive whole number"),
        ([], "the following arguments are required: --out"),
    ],
)
def test_bad_arguments_exit_2(extra, message, capsys):
    args = ["train", *extra] + ([] if not extra else ["--out", "x"])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_counts_accept_suffixes():
    assert count("1M") == 1_000_000 and count("200k") == 200_000 and count("1_500") == 1500


def test_help_comes_from_config_docs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Number of SAE latents (features). (default: 4608)" in text
    assert "Active latents per token (TopK). (default: 32)" in text


def test_other_value_errors_keep_their_traceback(monkeypatch, tmp_path):
    """Only the project's own errors become one-line messages; anything else is a bug to see."""

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr("build_map.pipeline.training_run.harvest_and_train", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--out", str(tmp_path)])
