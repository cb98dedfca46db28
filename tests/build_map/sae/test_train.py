"""The TopK trainer recovers planted directions, keeps its constraints and revives dead latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_map.sae.evaluate import evaluate_sae
from build_map.sae.formats import load_sae
from build_map.sae.train import load_metrics, save_trained_sae, train_sae
from build_map.sae.train_config import TrainConfig, TrainConfigError
from build_map.sae.trainer import TopKTrainer, geometric_median

D_IN, N_PLANTED, N_LATENTS = 32, 64, 128


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine are faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(n: int = 20_000, seed: int = 0, offset: float = 3.0):
    """Each row: ~3 of N_PLANTED unit directions with nonnegative weights, plus noise and an offset."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((N_PLANTED, D_IN))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    chosen = np.stack([rng.choice(N_PLANTED, 3, replace=False) for _ in range(n)])
    weights = rng.uniform(0.5, 2.0, (n, 3))
    x = np.einsum("na,nad->nd", weights, directions[chosen]) + 0.02 * rng.standard_normal((n, D_IN))
    return (x + offset).astype(np.float32), directions


def small_config(**overrides) -> TrainConfig:
    base = dict(n_latents=N_LATENTS, k=4, batch_size=256, epochs=2, warmup_steps=20, dead_tokens=5_000)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def trained(data):
    torch.set_num_threads(1)
    x, _ = data
    return train_sae(x, small_config(), progress=False)


def test_recovers_planted_directions(data, trained):
    _, directions = data
    sae, metrics = trained
    cosines = torch.from_numpy(directions).float() @ sae.W_dec.T  # (planted, latents)
    recovered = (cosines.max(dim=1).values > 0.9).float().mean()
    assert recovered >= 0.9, f"only {recovered:.0%} of planted directions found"
    assert metrics.fvu < 0.15
    assert metrics.mean_l0 <= 4


def test_fvu_falls_far_below_the_start(data, trained):
    x, _ = data
    _, start = train_sae(x, small_config(max_tokens=256), progress=False)
    assert start.steps == 1
    assert trained[1].fvu < 0.25 * start.fvu


def test_decoder_rows_stay_unit_norm(trained):
    norms = trained[0].W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_saved_sae_works_on_raw_activations(data, trained):
    """Input normalisation is folded into the weights: evaluating the SAE on raw rows gives the
    reported held-out FVU, and the returned metrics describe the returned SAE."""
    x, _ = data
    sae, metrics = trained
    assert metrics.input_scale != 1.0
    heldout = x[-metrics.heldout_tokens :]
    assert evaluate_sae(sae, heldout, device="cpu").fvu == pytest.approx(metrics.fvu, rel=1e-3)
    _, unnormalised = train_sae(x, small_config(normalize_inputs=False), progress=False)
    assert unnormalised.input_scale == 1.0 and unnormalised.fvu < 0.2


def test_outlier_tokens_are_left_out(data):
    """A few attention-sink-like rows (norm ~1000× the rest) would dominate the loss and the FVU."""
    x, _ = data
    x = x[:8000].copy()
    spikes = np.r_[np.arange(0, 8000, 500), 7999]  # the last one is in the held-out tail
    x[spikes] *= 1000
    _, metrics = train_sae(x, small_config(epochs=3), progress=False)
    assert metrics.outlier_tokens == 3 * 16 + 1  # every epoch skips them
    assert metrics.heldout_tokens == 159 and metrics.tokens_seen == 3 * (7840 - 16)
    assert metrics.fvu < 0.3


def test_metrics_saved_beside_weights(tmp_path, trained):
    sae, metrics = trained
    folder = save_trained_sae(sae, tmp_path / "sae", small_config(), metrics, {"hookpoint_note": "x"})
    assert load_metrics(folder) == metrics
    loaded = load_sae(folder)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    assert loaded.cfg.k == 4 and loaded.cfg.apply_b_dec_to_input
    x = torch.randn(8, D_IN)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_aux_loss_revives_forced_dead_latents(data):
    """Latents whose encoder rows are shrunk never win the top-k, so only AuxK can revive them."""
    x, _ = data
    forced = torch.arange(0, N_LATENTS, 4)  # a quarter of the latents

    def alive_after(aux_coef: float) -> int:
        cfg = small_config(aux_coef=aux_coef, dead_tokens=512)
        trainer = TopKTrainer(D_IN, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        inputs = torch.from_numpy(x[:12_800])
        trainer.init_b_dec(inputs[:2048])
        with torch.no_grad():
            trainer.W_enc[forced] *= 0.01
        for batch in inputs.split(256):
            trainer.step(batch, lr=cfg.learning_rate())
        with torch.no_grad():
            pre = trainer._pre_acts(inputs[-2048:] - trainer.b_dec)
            chosen = pre.topk(cfg.k, dim=-1).indices
        return int(torch.isin(forced, chosen.unique()).sum())

    assert alive_after(0.0) == 0
    assert alive_after(1 / 32) >= len(forced) // 2


def test_geometric_median_resists_outliers():
    points = torch.zeros(101, 3)
    points[:50, 0] = 1.0
    points[100] = 1e4  # one huge outlier (like the first-token residual)
    median = geometric_median(points)
    assert median.norm() < 1.0
    assert points.mean(0).norm() > 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k": 200}, "k must be between 1 and the number of latents"),
        ({"k": 0}, "k must be between"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"encoder_dtype": "float16"}, "encoder_dtype"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        small_config(**overrides)


def test_bad_activations_are_clear_errors():
    with pytest.raises(TrainConfigError, match="2-D"):
        train_sae(np.zeros(32, dtype=np.float32), small_config(), progress=False)
    with pytest.raises(TrainConfigError, match="too few"):
        train_sae(np.ones((3, D_IN), dtype=np.float32), small_config(), progress=False)
    with pytest.raises(TrainConfigError, match="NaN/Inf or are all zero"):
        train_sae(np.zeros((1000, D_IN), dtype=np.float32), small_config(), progress=False)


def test_memmap_input_and_seeded(tmp_path, data):
    x, _ = data
    path = tmp_path / "acts.f32"
    memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=(4000, D_IN))
    memmap[:] = x[:4000]
    memmap.flush()
    cfg = small_config(epochs=1, chunk_tokens=1000)
    first, m1 = train_sae(
        np.memmap(path, dtype=np.float32, mode="r", shape=(4000, D_IN)), cfg, progress=False
    )
    second, m2 = train_sae(x[:4000], cfg, progress=False)
    torch.testing.assert_close(first.W_dec, second.W_dec)
    assert m1.fvu == pytest.approx(m2.fvu)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1e-3])
def test_a_learning_rate_that_cannot_train_is_refused_up_front(lr):
    with pytest.raises(TrainConfigError, match="--lr .*give a positive, finite number"):
        TrainConfig(n_latents=64, k=4, lr=lr)
