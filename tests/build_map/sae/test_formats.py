"""Each SAE format, written in its documented on-disk layout, loads back with the right maths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from build_map.common.files import file_sha256
from build_map.sae.formats import load_sae, save_sae
from build_map.sae.model import SAEConfig, SAEError, SparseAutoencoder

D_IN, D_SAE = 16, 48


@pytest.fixture
def weights():
    gen = torch.Generator().manual_seed(0)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.1,
        "threshold": torch.rand(D_SAE, generator=gen),
    }


@pytest.fixture
def x():
    return torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))


def _topk(pre, k):
    values, indices = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def test_goodfire_pth(tmp_path, weights, x):
    state = {
        "encoder_linear.weight": weights["W_enc"].T.contiguous(),
        "encoder_linear.bias": weights["b_enc"],
        "decoder_linear.weight": weights["W_dec"].T.contiguous(),
        "decoder_linear.bias": weights["b_dec"],
    }
    torch.save(state, tmp_path / "l19.pth")
    sae = load_sae(tmp_path / "l19.pth")
    expected = torch.relu(x @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ weights["W_dec"] + weights["b_dec"])
    torch.testing.assert_close(sae.decoder_directions, weights["W_dec"])
    assert sae.cfg.source_format == "goodfire"


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens_folder(tmp_path, weights, x, architecture):
    cfg = {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": True,
        "hook_name": "blocks.1.hook_resid_post",
    }
    if architecture == "topk":
        cfg["k"] = 4
    tensors = {k: v for k, v in weights.items() if architecture == "jumprelu" or k != "threshold"}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    expected = {
        "standard": torch.relu(pre),
        "jumprelu": pre * (pre > weights["threshold"]),
        "topk": _topk(pre, 4),
    }[architecture]
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae(x), expected @ weights["W_dec"] + weights["b_dec"])
    assert sae.cfg.hookpoint == "blocks.1.hook_resid_post"


def test_saelens_topk_from_activation_fn_kwargs(tmp_path, weights):
    cfg = {"architecture": "standard", "activation_fn": "topk", "activation_fn_kwargs": {"k": 3}}
    save_file(
        {k: v for k, v in weights.items() if k != "threshold"}, str(tmp_path / "sae_weights.safetensors")
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    assert sae.cfg.activation == "topk" and sae.cfg.k == 3


def test_sparsify_folder(tmp_path, weights, x):
    save_file(
        {
            "encoder.weight": weights["W_enc"].T.contiguous(),
            "encoder.bias": weights["b_enc"],
            "W_dec": weights["W_dec"],
            "b_dec": weights["b_dec"],
        },
        str(tmp_path / "sae.safetensors"),
    )
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 5, "num_latents": D_SAE, "expansion_factor": 3}))
    sae = load_sae(tmp_path)
    expected = _topk((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"], 5)
    torch.testing.assert_close(sae.encode(x), expected)
    assert (sae.encode(x) > 0).sum(-1).max() <= 5
    assert sae.cfg.source_format == "sparsify"


def test_native_round_trip(tmp_path, weights, x):
    sae = SparseAutoencoder(
        SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=6, hookpoint="model.layers.1")
    )
    sae.load_state_dict(weights)
    save_sae(sae, tmp_path / "mine", extra={"metrics": {"fvu": 0.1}})
    loaded = load_sae(tmp_path / "mine")
    assert loaded.cfg == sae.cfg
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x), sae(x))
    assert file_sha256(tmp_path / "mine") == file_sha256(tmp_path / "mine")


def _native(tmp_path, weights, **cfg_overrides):
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu"))
    sae.load_state_dict(weights)
    return save_sae(sae, tmp_path / "sae", extra=cfg_overrides)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"123")
    with pytest.raises(SAEError, match="unknown SAE layout"):
        load_sae(tmp_path / "weights.bin")
    with pytest.raises(SAEError, match="unknown SAE layout"):
        load_sae(tmp_path)
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nope")


def test_nested_sparsify_checkpoint_lists_subfolders(tmp_path, weights):
    for layer in ("layers.3", "layers.7"):
        _native(tmp_path / layer, weights)
    with pytest.raises(SAEError, match="pass one of"):
        load_sae(tmp_path / "layers.3")  # holds sae/ below it
    assert load_sae(tmp_path / "layers.3" / "sae").d_sae == D_SAE


def test_missing_keys(tmp_path, weights):
    torch.save({"encoder_linear.weight": weights["W_enc"].T}, tmp_path / "bad.pth")
    with pytest.raises(SAEError, match="missing encoder_linear.bias"):
        load_sae(tmp_path / "bad.pth")


def test_inconsistent_shapes(tmp_path, weights):
    save_file(
        {
            "encoder.weight": weights["W_enc"].T.contiguous(),
            "encoder.bias": weights["b_enc"],
            "W_dec": weights["W_dec"][:, :8].contiguous(),
            "b_dec": weights["b_dec"],
        },
        str(tmp_path / "sae.safetensors"),
    )
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 5}))
    with pytest.raises(SAEError, match="inconsistent shapes: W_dec"):
        load_sae(tmp_path)


def test_nan_weights(tmp_path, weights):
    weights = dict(weights, W_dec=weights["W_dec"].clone())
    weights["W_dec"][3, 2] = float("nan")
    folder = _native(tmp_path, weights)
    with pytest.raises(SAEError, match="W_dec has 1 NaN/Inf"):
        load_sae(folder)


def test_truncated_file(tmp_path, weights):
    folder = _native(tmp_path, weights)
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="cannot read safetensors"):
        load_sae(folder)


def test_bad_json(tmp_path, weights):
    folder = _native(tmp_path, weights)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="not valid JSON"):
        load_sae(folder)


def test_width_mismatch_names_both_numbers_and_hookpoint(tmp_path, weights):
    folder = _native(tmp_path, weights)
    with pytest.raises(
        SAEError, match=r"d_in 16 does not match the model's hidden size 576 at model\.layers\.15"
    ):
        load_sae(folder, d_model=576, hookpoint="model.layers.15")


def test_bad_topk_config():
    with pytest.raises(SAEError, match="needs 0 < k"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, activation="topk", k=None))
    with pytest.raises(SAEError, match="Unknown SAE activation"):
        SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, activation="gelu"))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never print",))


def test_a_pickle_that_would_run_code_is_refused_with_what_to_do(tmp_path, capsys):
    path = tmp_path / "sae.pth"
    torch.save({"encoder_linear.weight": _RunsCode()}, path)
    with pytest.raises(
        SAEError, match="would run code from the file, so it is refused. Save the SAE as a plain"
    ) as err:
        load_sae(path)
    assert "weights_only" not in str(err.value) and "is the file complete" not in str(err.value)
    assert "this must never print" not in capsys.readouterr().out
