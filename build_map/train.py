"""Train a TopK sparse autoencoder on harvested activations (the recipe of EleutherAI sparsify).

The recipe: b_dec starts at the geometric median of a sample; decoder rows are unit vectors
(the gradient component along each row is removed before the step and rows are renormalised
after it); the encoder starts as the decoder's transpose; Adam; an AuxK loss lets the top
``aux_k`` *dead* latents reconstruct what the live ones missed, which revives them.

Why it is fast on a CPU: per token only k of n_latents latents are live, so everything except
choosing them is sparse. The one dense product, ``x @ W_enc`` for the top-k choice, runs in
bfloat16 where that is faster (3× on CPUs with AVX512-BF16); the backward pass touches only
the chosen latents (sparse matmuls and ``embedding_bag``), never the full (batch, n_latents)
gradient.

Inputs are scaled to mean norm sqrt(d_in) while training so the learning rate transfers between
models; the scale is folded back into the returned SAE, which works on raw activations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from build_map.corpus import CorpusConfig
from build_map.harvest import HarvestConfig, harvest_to_buffer
from build_map.models import (
    default_hookpoint,
    load_model,
    normalize_hookpoint,
    pick_device,
    pick_dtype,
)
from build_map.paths import cache_dir
from build_map.sae import SAEConfig, SparseAutoencoder, save_sae

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


class TrainConfigError(ValueError):
    """A training setting or the activations cannot be used; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    n_latents: int = 4608
    """Number of SAE latents (features)."""
    k: int = 32
    """Active latents per token (TopK)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(n_latents / 2**14) × lr_boost (sparsify's scaling)."""
    lr_boost: float = 8.0
    """Multiplier on sparsify's default lr, which is tuned for billions of tokens; we train on ~1M
    (bench/bench_train.py has the sweep: 11 leaves 4% latents dead, 4 converges too slowly)."""
    batch_size: int = 2048
    """Tokens per optimiser step (per token, 2048 trains 1.6× faster than 1024 on a CPU)."""
    epochs: int = 1
    """Passes over the training split."""
    max_tokens: int | None = None
    """Stop after this many training tokens (default: all epochs)."""
    warmup_steps: int = 50
    """Linear lr warm-up steps."""
    decay_fraction: float = 0.3
    """Final fraction of the steps over which lr decays linearly to zero."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; default d_in // 2 (sparsify's heuristic)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 100_000
    """A latent inactive for this many training tokens counts as dead (and joins the AuxK loss)."""
    holdout_fraction: float = 0.02
    """Final fraction of the activations kept out of training, for the reported metrics."""
    max_norm_ratio: float | None = 10.0
    """Tokens with a norm above this multiple of the median are left out of training and metrics:
    a few attention-sink-like tokens (~100× the usual norm) would otherwise dominate the loss. None
    keeps every token."""
    normalize_inputs: bool = True
    """Scale inputs to mean norm sqrt(d_in) while training (folded back into the saved weights)."""
    median_samples: int = 8192
    """Tokens used for the geometric median that initialises b_dec."""
    encoder_dtype: str = "auto"
    """dtype of the dense top-k selection matmul: auto (bfloat16 on GPUs and CPUs with AVX512-BF16/AMX), bfloat16, float32."""
    chunk_tokens: int = 131_072
    """Tokens read from disk at once and shuffled together."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""

    def __post_init__(self):
        if self.n_latents <= 0:
            raise TrainConfigError(f"n_latents must be positive; got {self.n_latents}.")
        if not 0 < self.k <= self.n_latents:
            raise TrainConfigError(
                f"k must be between 1 and the number of latents ({self.n_latents}); got k={self.k}."
            )
        if self.batch_size <= 0 or self.epochs <= 0:
            raise TrainConfigError("batch_size and epochs must be positive.")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise TrainConfigError(f"max_tokens must be positive; got {self.max_tokens}.")
        if not 0 < self.holdout_fraction < 1:
            raise TrainConfigError(f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}.")
        if self.max_norm_ratio is not None and self.max_norm_ratio <= 1:
            raise TrainConfigError(f"max_norm_ratio must be above 1 (or None); got {self.max_norm_ratio}.")
        if self.encoder_dtype not in ("auto", "bfloat16", "float32"):
            raise TrainConfigError(
                f"encoder_dtype must be auto, bfloat16 or float32; got {self.encoder_dtype!r}."
            )

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.n_latents / 2**14) * self.lr_boost


@dataclass
class TrainMetrics:
    fvu: float
    """Fraction of variance unexplained on the held-out tokens (0 = perfect)."""
    mean_l0: float
    """Mean number of active latents per held-out token."""
    dead_fraction: float
    """Latents active neither on the held-out tokens nor in the last dead_tokens training tokens."""
    tokens_seen: int
    """Training tokens processed (all epochs)."""
    heldout_tokens: int
    outlier_tokens: int
    """Tokens left out (training and held-out) for a norm above max_norm_ratio × the median."""
    steps: int
    seconds: float
    """Training wall time, evaluation included."""
    input_scale: float
    """Raw activations were divided by this while training (1.0 when not normalised)."""


@dataclass
class EvalMetrics:
    fvu: float
    mean_l0: float
    dead_fraction: float
    """Latents never active on these tokens."""
    n_tokens: int
    """Tokens evaluated (outliers excluded)."""
    outlier_tokens: int = 0


# ---------------------------------------------------------------- public API


def train_sae(
    activations: np.ndarray, cfg: TrainConfig, *, progress: bool = True
) -> tuple[SparseAutoencoder, TrainMetrics]:
    """Train a TopK SAE on ``activations`` (n_tokens, d_in); the tail is held out for metrics."""
    start = time.perf_counter()
    n_train, n_heldout = _split(activations, cfg)
    device = _device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = _sample(activations, n_train, cfg.median_samples, generator)
    norm_limit = _norm_limit(sample, cfg.max_norm_ratio)
    sample = sample[sample.norm(dim=1) <= norm_limit]
    scale = _input_scale(sample) if cfg.normalize_inputs else 1.0
    trainer = _Trainer(activations.shape[1], cfg, device, generator)
    trainer.init_b_dec(sample / scale)
    plan = _plan(n_train, cfg, generator)
    total = sum(stop - start for start, stop, _ in plan)
    steps = sum(len(sizes) for _, _, sizes in plan)
    logger.info(
        "Training %d latents (k=%d) on %d tokens (%d steps, batch %d, lr %.2g, select in %s)",
        cfg.n_latents, cfg.k, total, steps, cfg.batch_size, cfg.learning_rate(), trainer.select_dtype,
    )  # fmt: skip
    bar = tqdm(total=steps, desc="train SAE", unit="step", disable=not progress)
    outliers = 0
    for step, batch in enumerate(_batches(activations, plan, generator)):
        kept = batch[batch.norm(dim=1) <= norm_limit]
        outliers += len(batch) - len(kept)
        if len(kept) > 1:  # the loss normalises by the batch's variance
            trainer.step(kept.to(device) / scale, _lr_at(step, steps, cfg))
        bar.update()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(fvu=f"{trainer.running_fvu:.3f}", dead=f"{trainer.dead_fraction():.1%}")
    bar.close()
    sae = trainer.to_sae(scale)
    heldout = activations[n_train : n_train + n_heldout]
    evaluation, fired = _evaluate(sae, heldout, cfg.batch_size * 4, device, norm_limit)
    dead = ~(fired | trainer.fired_recently())
    metrics = TrainMetrics(
        fvu=evaluation.fvu,
        mean_l0=evaluation.mean_l0,
        dead_fraction=float(dead.float().mean()),
        tokens_seen=trainer.tokens_seen,
        heldout_tokens=evaluation.n_tokens,
        outlier_tokens=outliers + evaluation.outlier_tokens,
        steps=trainer.steps,
        seconds=round(time.perf_counter() - start, 2),
        input_scale=scale,
    )
    logger.info("Trained: %s", metrics)
    return sae.cpu(), metrics


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    activations: np.ndarray,
    *,
    max_norm: float = math.inf,
    batch_size: int = 4096,
    device: str = "auto",
) -> EvalMetrics:
    """FVU, mean L0 and never-active fraction of ``sae`` on ``activations`` (n_tokens, d_in),
    leaving out rows whose norm exceeds ``max_norm``."""
    if len(activations) == 0:
        raise TrainConfigError("evaluate_sae needs at least one activation row.")
    return _evaluate(sae, activations, batch_size, _device(device), max_norm)[0]


def save_trained_sae(
    sae: SparseAutoencoder,
    folder: str | Path,
    cfg: TrainConfig,
    metrics: TrainMetrics,
    provenance: dict | None = None,
) -> Path:
    """Save weights + cfg.json (with the training config and metrics) and metrics.json beside them."""
    record = {"training": asdict(cfg), "metrics": asdict(metrics), **(provenance or {})}
    folder = save_sae(sae, folder, extra=record)
    (Path(folder) / METRICS_FILE).write_text(json.dumps(record, indent=2))
    return Path(folder)


def load_metrics(folder: str | Path) -> TrainMetrics:
    """The TrainMetrics saved beside a trained SAE."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise TrainConfigError(f"{path} is missing; it is written by save_trained_sae.")
    record = json.loads(path.read_text())["metrics"]
    return TrainMetrics(**{f.name: record[f.name] for f in fields(TrainMetrics)})


# ---------------------------------------------------------------- the trainer


class _Trainer:
    """Parameters in sparsify's layout (encoder rows = latents) plus the dead-latent counter."""

    def __init__(self, d_in: int, cfg: TrainConfig, device: torch.device, generator: torch.Generator):
        self.cfg = cfg
        self.device = device
        self.aux_k = cfg.aux_k or d_in // 2
        decoder = torch.randn(cfg.n_latents, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = decoder.to(device).requires_grad_()  # (n_latents, d_in), unit rows
        self.W_enc = decoder.detach().clone().requires_grad_()  # (n_latents, d_in) = SAE W_enc.T
        self.b_enc = torch.zeros(cfg.n_latents, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        # fused: one pass over each parameter instead of ~8 (4× faster on CPU, where Adam over the
        # 2 × n_latents × d_in weights otherwise costs as much as the rest of the step).
        self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate(), fused=True)
        self.select_dtype = pick_dtype(device, cfg.encoder_dtype)
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.tokens_seen = 0
        self.steps = 0
        self.running_fvu = 1.0

    def init_b_dec(self, sample: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample.to(self.device)))

    def step(self, x: torch.Tensor, lr: float) -> None:
        """One Adam step on x (batch, d_in), already scaled."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_c = x - self.b_dec  # (batch, d_in)
        with torch.no_grad():
            pre = self._pre_acts(x_c)  # (batch, n_latents), no autograd
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        acts = torch.relu(_GatheredPreActs.apply(values.float(), indices, x_c, self.W_enc, self.b_enc))
        recon = _SparseDecode.apply(acts, indices, self.W_dec) + self.b_dec
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = (recon - x).pow(2).sum() / total_variance
        loss = fvu + self.cfg.aux_coef * self._aux_loss(pre, x_c, (x - recon).detach(), total_variance)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._constrain_decoder()
        self._track_dead(indices, acts.detach(), len(x))
        self.running_fvu = (
            0.9 * self.running_fvu + 0.1 * float(fvu.detach()) if self.steps else float(fvu.detach())
        )
        self.steps += 1

    def _pre_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """(batch, n_latents) in select_dtype, for choosing latents; no autograd."""
        dtype = self.select_dtype
        return torch.addmm(
            self.b_enc.detach().to(dtype), x_c.detach().to(dtype), self.W_enc.detach().to(dtype).T
        )

    def _aux_loss(
        self, pre: torch.Tensor, x_c: torch.Tensor, residual: torch.Tensor, total_variance: torch.Tensor
    ) -> torch.Tensor:
        """Let the top dead latents reconstruct the residual the live ones left (sparsify's AuxK)."""
        dead = (self.since_fired >= self.cfg.dead_tokens).nonzero().squeeze(1)
        if len(dead) == 0 or self.cfg.aux_coef == 0:
            return torch.zeros((), device=self.device)
        k_aux = min(self.aux_k, len(dead))
        with torch.no_grad():
            values, local = pre[:, dead].topk(k_aux, dim=-1, sorted=False)
            indices = dead[local]
        acts = torch.relu(_GatheredPreActs.apply(values.float(), indices, x_c, self.W_enc, self.b_enc))
        residual_hat = _SparseDecode.apply(acts, indices, self.W_dec)
        # Fewer dead latents than aux_k → a smaller loss, as in the paper (Gao et al., App. B.1).
        scale = min(len(dead) / self.aux_k, 1.0)
        return scale * (residual_hat - residual).pow(2).sum() / total_variance

    @torch.no_grad()
    def _constrain_decoder(self) -> None:
        """Keep decoder rows unit norm: drop the gradient along each row, step, renormalise."""
        grad = self.W_dec.grad
        grad.addcmul_(self.W_dec, (grad * self.W_dec).sum(dim=1, keepdim=True), value=-1)
        self.optimizer.step()
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def _track_dead(self, indices: torch.Tensor, acts: torch.Tensor, n_tokens: int) -> None:
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[indices[acts > 0]] = True
        self.since_fired += n_tokens
        self.since_fired[fired] = 0
        self.tokens_seen += n_tokens

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_tokens).float().mean())

    def fired_recently(self) -> torch.Tensor:
        """Latents active in the last dead_tokens training tokens (all that fired, if fewer seen)."""
        return (self.since_fired < min(self.cfg.dead_tokens, self.tokens_seen)).cpu()

    @torch.no_grad()
    def to_sae(self, scale: float) -> SparseAutoencoder:
        """Fold the input scale back: pre-acts and activations scale by ``scale``, directions do not."""
        n_latents, d_in = self.W_dec.shape
        sae = SparseAutoencoder(
            SAEConfig(d_in=d_in, d_sae=n_latents, activation="topk", k=self.cfg.k, apply_b_dec_to_input=True)
        ).to(self.device)
        sae.W_enc.copy_(self.W_enc.T)
        sae.b_enc.copy_(self.b_enc * scale)
        sae.W_dec.copy_(self.W_dec)
        sae.b_dec.copy_(self.b_dec * scale)
        return sae.requires_grad_(False).eval()


class _GatheredPreActs(torch.autograd.Function):
    """values = (x_c @ W_enc.T + b_enc) at ``indices``, already computed (no grad) by the dense
    selection matmul; the backward pass touches only the chosen latents."""

    @staticmethod
    def forward(ctx, values, indices, x_c, weight, bias):  # weight (n_latents, d_in)
        ctx.save_for_backward(indices, x_c, weight)
        ctx.n_latents = bias.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # grad (batch, m)
        indices, x_c, weight = ctx.saved_tensors
        grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        grad_weight = _scatter_rows(indices, grad, x_c, ctx.n_latents)
        grad_bias = torch.zeros(ctx.n_latents, device=grad.device).index_add_(
            0, indices.flatten(), grad.flatten()
        )
        return None, None, grad_x, grad_weight, grad_bias


class _SparseDecode(torch.autograd.Function):
    """sum_j acts[b, j] · W_dec[indices[b, j]] without a dense (batch, n_latents) matrix."""

    @staticmethod
    def forward(ctx, acts, indices, weight):  # acts (batch, m), weight (n_latents, d_in)
        ctx.save_for_backward(acts, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx, grad):  # grad (batch, d_in)
        acts, indices, weight = ctx.saved_tensors
        with torch.enable_grad():  # embedding_bag's own kernel for d/d(per_sample_weights)
            probe = acts.detach().requires_grad_()
            out = F.embedding_bag(indices, weight.detach(), per_sample_weights=probe, mode="sum")
            (grad_acts,) = torch.autograd.grad(out, probe, grad)
        grad_weight = _scatter_rows(indices, acts, grad, weight.shape[0])
        return grad_acts, None, grad_weight


def _scatter_rows(indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d): out[indices[b, j]] += coef[b, j] · rows[b], as one sparse × dense matmul."""
    batch, m = indices.shape
    token = torch.arange(batch, device=rows.device).repeat_interleave(m)
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices.flatten(), token]), coef.flatten(), (n, batch), check_invariants=False
    )
    return torch.sparse.mm(sparse, rows)


# ---------------------------------------------------------------- helpers


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points`` (n, d)."""
    guess = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol * guess.norm().clamp_min(1.0):
            return new
        guess = new
    return guess


@torch.no_grad()
def _evaluate(
    sae: SparseAutoencoder,
    activations: np.ndarray,
    batch_size: int,
    device: torch.device,
    max_norm: float = math.inf,
) -> tuple[EvalMetrics, torch.Tensor]:
    """Metrics, plus which latents fired at least once (bool, d_sae, on CPU)."""
    sae = sae.to(device)
    d_in = activations.shape[1]
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    l0, n = 0.0, 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for start in range(0, len(activations), batch_size):
        x = _rows(activations, start, start + batch_size).to(device)
        x = x[x.norm(dim=1) <= max_norm]
        n += len(x)
        features = sae.encode(x)
        sum_err += (sae.decode(features) - x).double().pow(2).sum()
        sum_x += x.double().sum(0)
        sum_x2 += x.double().pow(2).sum()
        active = features > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    if n == 0:
        raise TrainConfigError(
            f"All {len(activations)} rows have a norm above {max_norm:.4g}; nothing to evaluate."
        )
    variance = sum_x2 - sum_x.pow(2).sum() / n
    metrics = EvalMetrics(
        fvu=float(sum_err / variance.clamp_min(1e-12)),
        mean_l0=l0 / n,
        dead_fraction=float((~fired).float().mean()),
        n_tokens=n,
        outlier_tokens=len(activations) - n,
    )
    return metrics, fired.cpu()


def _split(activations: np.ndarray, cfg: TrainConfig) -> tuple[int, int]:
    if activations.ndim != 2:
        raise TrainConfigError(
            f"activations must be a 2-D (n_tokens, d_in) array; got shape {activations.shape}."
        )
    n = len(activations)
    n_heldout = max(1, round(n * cfg.holdout_fraction))
    if n - n_heldout < cfg.k or n < 2:
        raise TrainConfigError(
            f"Only {n} activation rows: too few to train and hold out {cfg.holdout_fraction:.0%}; "
            "harvest more tokens."
        )
    return n - n_heldout, n_heldout


def _rows(activations: np.ndarray, start: int, stop: int) -> torch.Tensor:
    # np.array copies: torch refuses read-only memmap views.
    return torch.from_numpy(np.array(activations[start:stop], dtype=np.float32))


def _sample(activations: np.ndarray, n_train: int, size: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randperm(n_train, generator=generator)[: min(size, n_train)].sort().values.numpy()
    return torch.from_numpy(np.asarray(activations[picks], dtype=np.float32))


def _norm_limit(sample: torch.Tensor, ratio: float | None) -> float:
    """Norm above which a token counts as an outlier (ratio × the sample's median norm)."""
    median = float(sample.norm(dim=1).median())
    if not math.isfinite(median) or median == 0:
        raise TrainConfigError(
            f"Activations have median norm {median}; they hold NaN/Inf or are all zero, re-harvest them."
        )
    return math.inf if ratio is None else ratio * median


def _input_scale(sample: torch.Tensor) -> float:
    """Divide inputs by this so their mean norm is sqrt(d_in) (SAELens' expected_average_only_in)."""
    return float(sample.norm(dim=1).mean()) / math.sqrt(sample.shape[1])


def _chunks(n_train: int, cfg: TrainConfig, generator: torch.Generator) -> list[tuple[int, int]]:
    """(start, stop) of each chunk read from disk, every epoch in a fresh random order."""
    bounds = [(s, min(s + cfg.chunk_tokens, n_train)) for s in range(0, n_train, cfg.chunk_tokens)]
    order = [torch.randperm(len(bounds), generator=generator).tolist() for _ in range(cfg.epochs)]
    return [bounds[i] for epoch in order for i in epoch]


def _batch_sizes(chunk_len: int, batch_size: int) -> list[int]:
    """Split a chunk into batches; a runt under half a batch joins the previous one, since the
    FVU loss normalises by the batch's own variance (meaningless for a handful of rows)."""
    sizes = [batch_size] * (chunk_len // batch_size)
    rest = chunk_len % batch_size
    if rest and (rest >= batch_size // 2 or not sizes):
        sizes.append(rest)
    elif rest:
        sizes[-1] += rest
    return sizes


def _plan(n_train: int, cfg: TrainConfig, generator: torch.Generator) -> list[tuple[int, int, list[int]]]:
    """Chunks with their batch sizes, cut at max_tokens."""
    plan, budget = [], cfg.max_tokens or n_train * cfg.epochs
    for start, stop in _chunks(n_train, cfg, generator):
        if budget <= 0:
            break
        length = min(stop - start, budget)
        plan.append((start, start + length, _batch_sizes(length, cfg.batch_size)))
        budget -= length
    return plan


def _batches(activations: np.ndarray, plan: list, generator: torch.Generator):
    """Shuffled batches: chunks in random order, rows shuffled within each chunk."""
    for start, stop, sizes in plan:
        chunk = _rows(activations, start, stop)
        chunk = chunk[torch.randperm(len(chunk), generator=generator)]
        yield from torch.split(chunk, sizes)


def _lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last decay_fraction."""
    lr = cfg.learning_rate()
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_steps = max(1, round(steps * cfg.decay_fraction))
    decay = min(1.0, (steps - step) / decay_steps)
    return lr * min(warm, decay)


def _device(name: str) -> torch.device:
    return pick_device(name)


# ---------------------------------------------------------------- model → buffer → SAE


@dataclass
class TrainRun:
    """What ``harvest_and_train`` made, and how long each stage took."""

    folder: Path
    metrics: TrainMetrics
    hookpoint: str
    buffer_folder: Path
    n_tokens: int
    load_seconds: float
    harvest_seconds: float
    train_seconds: float


def harvest_and_train(
    model: str | None,
    hookpoint: str | None,
    corpus: CorpusConfig,
    n_tokens: int,
    cfg: TrainConfig,
    out: str | Path,
    *,
    buffer: str | Path | None = None,
    harvest: HarvestConfig | None = None,
    progress: bool = True,
) -> TrainRun:
    """Load ``model``, harvest ``n_tokens`` activations at ``hookpoint`` (default: the middle layer)
    into ``buffer`` (default: a cache folder keyed by the request), train, save to ``out``."""

    if n_tokens <= 0:
        raise TrainConfigError(f"The number of tokens to harvest must be positive; got {n_tokens}.")
    harvest = harvest or HarvestConfig()
    start = time.perf_counter()
    loaded = load_model(model, device=cfg.device)
    hookpoint = normalize_hookpoint(loaded.model, hookpoint or default_hookpoint(loaded.model))
    loaded_at = time.perf_counter()
    folder = Path(buffer) if buffer else buffer_folder(loaded.spec, hookpoint, corpus, n_tokens, harvest)
    activations = harvest_to_buffer(loaded, hookpoint, corpus, n_tokens, folder, harvest, progress=progress)
    harvested_at = time.perf_counter()
    del loaded  # free the model before training
    sae, metrics = train_sae(activations.array, cfg, progress=progress)
    sae.cfg = replace(sae.cfg, hookpoint=hookpoint)
    provenance = {
        "model": activations.meta["model"],
        "hookpoint": hookpoint,
        "corpus": asdict(corpus),
        "harvest": asdict(harvest),
        "n_tokens": len(activations),
    }
    save_trained_sae(sae, out, cfg, metrics, provenance)
    return TrainRun(
        folder=Path(out),
        metrics=metrics,
        hookpoint=hookpoint,
        buffer_folder=folder,
        n_tokens=len(activations),
        load_seconds=round(loaded_at - start, 2),
        harvest_seconds=round(harvested_at - loaded_at, 2),
        train_seconds=metrics.seconds,
    )


def buffer_folder(
    model: str, hookpoint: str, corpus: CorpusConfig, n_tokens: int, harvest: HarvestConfig
) -> Path:
    """A cache folder for one harvest request (the same request finds its finished buffer again)."""
    request = {"model": model, "hookpoint": hookpoint, "corpus": asdict(corpus), "n_tokens": n_tokens,
               "harvest": asdict(harvest)}  # fmt: skip
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("buffers") / f"{hookpoint}-{n_tokens}-{key}"
