"""Per-feature statistics over a corpus: density, activations, examples, top tokens, logit lens, neighbours.

One streaming pass runs the model (cut after the hookpoint) and the SAE over the corpus and keeps,
per feature, only fixed-size tensors (so 65,536 features fit on a GPU):

- active-token count and activation sum (density, mean over active tokens);
- a running top-n of (activation, token location, window): each batch's nonzero activations (the
  SAE is sparse, so there are few) are ranked within their feature and merged into (d_sae, n_top)
  buffers;
- a uniform reservoir sample of the same per feature, by the same merge with random keys (keep the
  R largest keys = sample without replacement). Quantile-bucket examples and the tokens a feature
  fires on come from it.

An entry's *window* is the feature's activation on the ~20 tokens around it. A batch always holds
whole sequences, so it is read from the batch's activations when the entry gets into a buffer; no
activations are stored, and no second pass over the model is needed (one would re-run nearly every
sequence: with thousands of features, almost every sequence holds some feature's example). Only
token ids and (sequence, position) per token are kept from the corpus, to rebuild the windows' text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from build_map.harvest import COMPUTE_DTYPES, compute_dtype, iter_activation_batches, resolve_compute_dtype
from build_map.models import LoadedModel, d_model, normalize_hookpoint
from build_map.project import ProjectConfig, decoder_knn
from build_map.sae import SparseAutoencoder, check_matches_model

logger = logging.getLogger(__name__)

TOP_BUCKET = "top"
_LOGIT_CHUNK_ELEMENTS = 2**26  # (features, vocab) logits held at once: 256 MiB in fp32
# Tokenizer markers a single-token decode can leave behind: byte-level BPE and SentencePiece.
_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"})


class StatsError(ValueError):
    """Statistics cannot be computed from these inputs; the message says why."""


@dataclass(frozen=True)
class StatsConfig:
    n_tokens: int = 100_000
    """Corpus tokens to run through the model and SAE (first positions and padding not counted)."""
    context_before: int = 14
    """Tokens shown before an example's focus token."""
    context_after: int = 5
    """Tokens shown after an example's focus token."""
    n_top: int = 10
    """Top-activating examples kept per feature."""
    quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Activation quantiles (of a feature's active tokens) to show examples from, besides the top:
    labelling works better with examples from across the distribution, not only the maxima."""
    n_per_quantile: int = 3
    """Examples per quantile bucket."""
    reservoir_size: int = 64
    """Uniformly sampled activating tokens kept per feature, for quantiles and top tokens. With the
    top examples, each holds a window of activations: d_sae x (n_top + reservoir_size) x 20 floats
    (390 MB for 65,536 features), on the SAE's device."""
    batch_tokens: int = 4096
    """Tokens per forward pass (rows x longest sequence), as in harvesting. Also bounds the dense
    (tokens, d_sae) activation block: 4,096 x 65,536 features is 1 GiB in float32."""
    n_top_tokens: int = 10
    """Tokens listed per feature in ``top_tokens``."""
    logit_k: int = 10
    """Promoted and suppressed tokens listed per feature by the logit lens."""
    n_neighbors: int = 10
    """Nearest features by decoder cosine."""
    seed: int = 0
    """Seed for the reservoir sampling."""
    compute_dtype: str = "auto"
    """dtype of the forward passes, as in harvesting (``build_map.harvest.resolve_compute_dtype``):
    "auto" runs a float32 model in bf16 on a CPU with native bf16 (its cut forward is 2.4x fp32's in
    bench/bench_harvest.py; the demo SAE is trained on such activations), "model" keeps the model's
    dtype; "float32", "bfloat16" and "float16" name one."""

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.n_top < 1 or self.batch_tokens < 1:
            raise StatsError("StatsConfig: n_tokens, n_top and batch_tokens must be positive.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise StatsError(
                f"StatsConfig.compute_dtype={self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.context_before < 0 or self.context_after < 0:
            raise StatsError("StatsConfig: context_before and context_after must be >= 0.")
        if any(not 0.0 < q < 1.0 for q in self.quantiles):
            raise StatsError(
                f"StatsConfig.quantiles must lie strictly between 0 and 1; got {self.quantiles}."
            )

    @property
    def buckets(self) -> list[str]:
        return [TOP_BUCKET] + [bucket_name(q) for q in self.quantiles]


def bucket_name(quantile: float) -> str:
    """0.25 → "q25"; 0.125 → "q12.5"."""
    return f"q{100 * quantile:g}"


@dataclass
class FeatureStats:
    features: pd.DataFrame
    """One row per feature: feature, density, max_act, mean_act, top_tokens, top_logits,
    bottom_logits, neighbors, dead."""
    examples: pd.DataFrame
    """EXAMPLE_SCHEMA rows: feature, rank, bucket, act, tokens, acts."""
    n_tokens: int
    """Tokens the statistics were computed over."""
    n_sequences: int
    """Corpus sequences those tokens came from."""
    config: StatsConfig = field(default_factory=StatsConfig)


def compute_feature_stats(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hookpoint: str,
    sequences: Iterable[Sequence[int]],
    cfg: StatsConfig | None = None,
) -> FeatureStats:
    """Stream ``sequences`` (token ids, any iterable: ``corpus.token_sequences`` output) through the
    model and the SAE once, then assemble the feature and example tables."""
    cfg = cfg or StatsConfig()
    device = sae.W_dec.device
    hookpoint = normalize_hookpoint(loaded.model, hookpoint)
    check_matches_model(sae, d_model(loaded.model), hookpoint)
    started = time.perf_counter()
    with torch.inference_mode():
        state, corpus = _stream(loaded, sae, hookpoint, sequences, cfg, device)
        if corpus.n_tokens == 0:
            raise StatsError(
                "The corpus gave no tokens past the first position of each sequence; pass longer sequences."
            )
        streamed = time.perf_counter()
        decoder = TokenText(loaded.tokenizer)
        examples = _example_rows(corpus, _choose_examples(state, cfg), cfg, decoder)
        features = _feature_rows(loaded, sae, state, corpus, cfg, decoder)
    logger.info(
        "Stats over %d tokens: %d of %d features live; %.1f s streaming, %.1f s tables",
        corpus.n_tokens,
        int((~features["dead"]).sum()),
        sae.d_sae,
        streamed - started,
        time.perf_counter() - streamed,
    )
    return FeatureStats(features, examples, corpus.n_tokens, corpus.n_sequences, cfg)


# ---------------------------------------------------------------- streaming pass


@dataclass
class _Corpus:
    """What is kept of the corpus: its sequences, and for each counted token where it is."""

    sequences: list[torch.Tensor]
    seq: torch.Tensor  # (n_tokens,) int64 sequence index of each counted token
    pos: torch.Tensor  # (n_tokens,) int64 position in its sequence
    token: torch.Tensor  # (n_tokens,) int64 token id

    @property
    def n_tokens(self) -> int:
        return int(self.seq.numel())

    @property
    def n_sequences(self) -> int:
        return int(self.seq.max()) + 1 if self.n_tokens else 0


class _RunningTop:
    """Per feature, the ``size`` entries with the highest score seen so far, with their payloads:
    activation value, token location and the activations of the window around it.

    Rows are unordered (``sorted_rows`` orders them): a newcomer takes the slot of the entry it
    evicts, so an update writes only the entries that change, never whole rows of windows."""

    def __init__(self, d_sae: int, size: int, width: int, device: torch.device):
        self.score = torch.full((d_sae, size), -math.inf, device=device)
        self.floor = torch.full((d_sae,), -math.inf, device=device)  # lowest kept score per row
        self.value = torch.zeros((d_sae, size), device=device)
        self.loc = torch.full((d_sae, size), -1, dtype=torch.long, device=device)
        self.window = torch.zeros((d_sae, size, width), device=device)

    def update(self, feats: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, batch: _Batch) -> None:
        """Offer the active pairs (``feats``, token ``rows`` of ``batch``) with their ``scores``."""
        better = scores > self.floor[feats]  # only these can get in
        feats, scores, rows = feats[better], scores[better], rows[better]
        if feats.numel() == 0:
            return
        size = self.score.shape[1]
        # Rank candidates within their feature: sort by score, then (stably) by feature.
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(feats[order], stable=True)]
        feats, scores, rows = feats[order], scores[order], rows[order]
        touched, counts = torch.unique_consecutive(feats, return_counts=True)
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=feats.device), counts)
        rank = torch.arange(feats.numel(), device=feats.device) - (torch.cumsum(counts, 0) - counts)[group]
        keep = rank < size
        group, rank = group[keep], rank[keep]
        cand = torch.full((touched.numel(), size), -math.inf, device=feats.device)
        cand[group, rank] = scores[keep]  # (touched, size), best first
        cand_row = torch.zeros((touched.numel(), size), dtype=torch.long, device=feats.device)
        cand_row[group, rank] = rows[keep]
        # The j-th best newcomer replaces the j-th lowest kept entry while it beats it (a prefix
        # of j, since one side falls and the other rises): the best `size` of old and new stay.
        old_low, old_slot = self.score[touched].sort(dim=1)
        group, j = (cand > old_low).nonzero(as_tuple=True)
        target, slot, new_rows = touched[group], old_slot[group, j], cand_row[group, j]
        self.score[target, slot] = cand[group, j]
        self.value[target, slot] = batch.acts[new_rows, target].float()
        self.loc[target, slot] = new_rows + batch.first_loc
        self.window[target, slot] = batch.windows(new_rows, target)
        self.floor[touched] = self.score[touched].amin(1)

    def sorted_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, value, loc, window) with each row ordered by score, best first."""
        order = self.score.argsort(dim=1, descending=True)
        wide = order[:, :, None].expand_as(self.window)
        return (
            self.score.gather(1, order),
            self.value.gather(1, order),
            self.loc.gather(1, order),
            self.window.gather(1, wide),
        )


@dataclass
class _Batch:
    """One batch's dense SAE activations and where its tokens are."""

    acts: torch.Tensor  # (n, d_sae): its tokens, sequence by sequence, in position order
    seq: torch.Tensor  # (n,) sequence index of each token (on the activations' device)
    first_loc: int  # corpus-wide index of its first token
    offsets: torch.Tensor  # (W,) window positions relative to the focus token

    def windows(self, rows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """(len(rows), W) activation of feature ``feats[i]`` around token ``rows[i]``.

        A sequence's tokens are consecutive rows, so the token ``o`` positions away is ``o`` rows away
        when it is in the same sequence; otherwise (outside the sequence, or its excluded first
        position) the window shows 0."""
        index = rows[:, None] + self.offsets[None, :]
        clamped = index.clamp(0, self.acts.shape[0] - 1)
        same = (index == clamped) & (self.seq[clamped] == self.seq[rows][:, None])
        return torch.where(same, self.acts[clamped, feats[:, None]], 0.0).float()


@dataclass
class _State:
    count: torch.Tensor  # (d_sae,) active tokens
    act_sum: torch.Tensor  # (d_sae,) float64
    top: _RunningTop  # score = activation
    reservoir: _RunningTop  # score = random key


def _stream(loaded, sae, hookpoint, sequences, cfg, device) -> tuple[_State, _Corpus]:
    d_sae, offsets = sae.d_sae, _offsets(cfg, device)
    state = _State(
        count=torch.zeros(d_sae, dtype=torch.long, device=device),
        act_sum=torch.zeros(d_sae, dtype=torch.float64, device=device),
        top=_RunningTop(d_sae, cfg.n_top, len(offsets), device),
        reservoir=_RunningTop(d_sae, max(cfg.reservoir_size, 1), len(offsets), device),
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kept: list[torch.Tensor] = []  # kept[i] is sequence i, to rebuild example text
    seq_parts, pos_parts, tok_parts = [], [], []
    n_seen = 0
    bar = tqdm(total=cfg.n_tokens, desc="Feature stats", unit="tok", unit_scale=True)
    # A bf16 copy of a float32 model on CPU, as in harvesting (see StatsConfig.compute_dtype).
    with compute_dtype(loaded.model, resolve_compute_dtype(loaded.model, cfg.compute_dtype)) as model:
        batches = iter_activation_batches(
            model, loaded.tokenizer, hookpoint, _recorded(sequences, kept), cfg.batch_tokens
        )
        for harvested in batches:
            take = min(int(harvested.acts.shape[0]), cfg.n_tokens - n_seen)
            # The whole batch is encoded (windows may reach past the token budget); only ``take`` count.
            acts = sae.encode(harvested.acts.to(device))  # (n, d_sae)
            batch = _Batch(acts, harvested.sequence_ids.to(device), n_seen, offsets)
            _accumulate(state, batch, take, generator)
            seq_parts.append(harvested.sequence_ids[:take])
            pos_parts.append(harvested.positions[:take])
            tok_parts.append(harvested.token_ids[:take])
            n_seen += take
            bar.update(take)
            if n_seen >= cfg.n_tokens:
                break
    bar.close()
    if n_seen < cfg.n_tokens:
        logger.info("The corpus ran out after %d tokens (%d asked for)", n_seen, cfg.n_tokens)
    empty = torch.zeros(0, dtype=torch.long)
    corpus = _Corpus(
        kept,
        torch.cat(seq_parts) if seq_parts else empty,
        torch.cat(pos_parts) if pos_parts else empty,
        torch.cat(tok_parts) if tok_parts else empty,
    )
    return state, corpus


def _offsets(cfg: StatsConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(-cfg.context_before, cfg.context_after + 1, device=device)


def _recorded(sequences: Iterable[Sequence[int]], kept: list[torch.Tensor]) -> Iterator[list[int]]:
    """Pass ``sequences`` on as lists, keeping each one (as a compact tensor) in ``kept``."""
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        kept.append(ids)
        yield ids.tolist()


def _accumulate(state: _State, batch: _Batch, take: int, generator: torch.Generator) -> None:
    rows, feats = batch.acts[:take].nonzero(as_tuple=True)  # sparse: only the active (token, feature) pairs
    values = batch.acts[rows, feats].float()
    state.count += torch.bincount(feats, minlength=state.count.numel())
    state.act_sum.index_add_(0, feats, values.double())
    state.top.update(feats, values, rows, batch)
    keys = torch.rand(values.shape, generator=generator, device=values.device)
    state.reservoir.update(feats, keys, rows, batch)


# ---------------------------------------------------------------- choosing examples


@dataclass
class _Chosen:
    feature: torch.Tensor  # (n_examples,) int64
    bucket: list[str]
    rank: torch.Tensor  # (n_examples,) order within the bucket
    act: torch.Tensor  # (n_examples,) activation at the focus token
    loc: torch.Tensor  # (n_examples,) corpus-wide token index of the focus token
    window: torch.Tensor  # (n_examples, W) activations around it


def _choose_examples(state: _State, cfg: StatsConfig) -> _Chosen:
    """Top examples, then per quantile the reservoir samples whose activation is nearest to it."""
    top, res = state.top, state.reservoir
    _, value, loc, window = top.sorted_rows()
    parts = [(TOP_BUCKET, value, loc, window, torch.arange(loc.shape[1], device=loc.device).expand_as(loc))]
    valid = res.loc >= 0
    if cfg.quantiles and cfg.n_per_quantile > 0 and bool(valid.any()):
        free = valid & ~(res.loc[:, :, None] == top.loc[:, None, :]).any(-1)  # not already a top example
        for q in cfg.quantiles:
            level = _row_quantile(res.value, valid, q)  # (d_sae,)
            distance = torch.where(free, (res.value - level[:, None]).abs(), math.inf)
            near, index = distance.topk(min(cfg.n_per_quantile, distance.shape[1]), dim=1, largest=False)
            ok = torch.isfinite(near)
            # best first within the bucket; entries that are not ok sort last
            order = torch.argsort(
                torch.where(ok, res.value.gather(1, index), -math.inf), dim=1, descending=True
            )
            index = torch.where(ok.gather(1, order), index.gather(1, order), -1)
            parts.append((bucket_name(q), res.value, res.loc, res.window, index))
            free = free.scatter(1, index.clamp(min=0), False) if bool(ok.any()) else free
    return _flatten_choice(parts)


def _row_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per row, the linear-interpolated ``q`` quantile of the valid entries (NaN for none).

    torch.nanquantile would do, but refuses inputs over 16M elements (65,536 features x 256)."""
    ordered = torch.where(valid, values, math.inf).sort(dim=1).values
    count = valid.sum(1)
    where = q * (count - 1).clamp(min=0).to(values.dtype)
    lo, hi = where.floor().long(), where.ceil().long()
    low, high = ordered.gather(1, lo[:, None])[:, 0], ordered.gather(1, hi[:, None])[:, 0]
    level = low + (high - low) * (where - lo.to(values.dtype))
    return torch.where(count > 0, level, math.nan)


def _flatten_choice(parts: list[tuple]) -> _Chosen:
    """One row per chosen entry. Each part is (bucket, value, loc, window, index), ``index`` (d_sae, m)
    pointing into the buffers' slots, -1 for none, chosen entries first and best first."""
    features, buckets, ranks, acts, locs, windows = [], [], [], [], [], []
    for bucket, value, loc, window, index in parts:
        slots = index.clamp(min=0)
        ok = (index >= 0) & (loc.gather(1, slots) >= 0)
        feature, rank = ok.nonzero(as_tuple=True)
        slot = slots[feature, rank]
        features.append(feature.cpu())
        ranks.append(rank.cpu())
        acts.append(value[feature, slot].float().cpu())
        locs.append(loc[feature, slot].cpu())
        windows.append(window[feature, slot].float().cpu())
        buckets.extend([bucket] * int(feature.numel()))
    return _Chosen(
        torch.cat(features), buckets, torch.cat(ranks), torch.cat(acts), torch.cat(locs), torch.cat(windows)
    )


# ---------------------------------------------------------------- example table


def _example_rows(corpus: _Corpus, chosen: _Chosen, cfg: StatsConfig, decoder: TokenText) -> pd.DataFrame:
    """EXAMPLE_SCHEMA rows: the window's tokens (cut to its sequence) and the feature's activations."""
    seq, pos = corpus.seq[chosen.loc], corpus.pos[chosen.loc]
    lengths = torch.tensor([int(s.numel()) for s in corpus.sequences], dtype=torch.long)
    first = (pos - cfg.context_before).clamp(min=0)  # the window [first, stop) inside its sequence
    stop = torch.minimum(pos + cfg.context_after + 1, lengths[seq])
    window = first[:, None] + torch.arange(cfg.context_before + cfg.context_after + 1)[None, :]  # (n, W)
    flat_ids = torch.cat(corpus.sequences)
    seq_start = torch.cumsum(lengths, 0) - lengths
    window_tokens = flat_ids[(seq_start[seq][:, None] + window).clamp(max=len(flat_ids) - 1)]
    unique, inverse = torch.unique(window_tokens, return_inverse=True)
    texts = decoder.display(unique.tolist())
    table = np.array([texts[t] for t in unique.tolist()], dtype=object)
    token_rows = table[inverse.numpy()].tolist() if len(table) else [[] for _ in range(len(seq))]
    skip = (first - (pos - cfg.context_before)).tolist()  # stored windows start context_before back
    widths = (stop - first).tolist()
    acts = chosen.window.numpy()
    return pd.DataFrame(
        {
            "feature": chosen.feature.numpy().astype(np.int32),
            "rank": chosen.rank.numpy().astype(np.int32),
            "bucket": chosen.bucket,
            "act": chosen.act.numpy().astype(np.float32),
            "tokens": [row[:w] for row, w in zip(token_rows, widths, strict=True)],
            "acts": [row[k : k + w] for row, k, w in zip(acts, skip, widths, strict=True)],
        }
    )


# ---------------------------------------------------------------- feature table


def _feature_rows(loaded, sae, state: _State, corpus: _Corpus, cfg: StatsConfig, decoder) -> pd.DataFrame:
    count = state.count.cpu()
    dead = count == 0
    mean = (state.act_sum.cpu() / count.clamp(min=1)).float()
    top_value = torch.where(state.top.loc >= 0, state.top.value, -math.inf).amax(1).float().cpu()
    max_act = torch.where(dead, torch.zeros(()), top_value)
    top_logits, bottom_logits = logit_lens(loaded.model, sae.W_dec, cfg.logit_k, decoder)
    # Exact on a GPU or for small SAEs; the map's near-exact partitioned search for large ones on a
    # CPU (an exact search of 65,536 x 4,096 there takes ~10 minutes).
    knn_cfg = ProjectConfig(device=str(sae.W_dec.device))
    neighbors, _ = decoder_knn(sae.W_dec.detach(), cfg.n_neighbors, knn_cfg)
    return pd.DataFrame(
        {
            "feature": np.arange(sae.d_sae, dtype=np.int32),
            "density": (count.double() / max(corpus.n_tokens, 1)).numpy().astype(np.float32),
            "max_act": max_act.numpy().astype(np.float32),
            "mean_act": torch.where(dead, torch.zeros(()), mean).numpy().astype(np.float32),
            "top_tokens": _top_tokens(state, corpus, cfg.n_top_tokens, decoder),
            "top_logits": top_logits,
            "bottom_logits": bottom_logits,
            "neighbors": [row.astype(np.int32) for row in neighbors],
            "dead": dead.numpy(),
        }
    )


def _top_tokens(state: _State, corpus: _Corpus, n: int, decoder) -> list[list[str]]:
    """Per feature, the cleaned token strings carrying most of its activation in the reservoir sample
    (a uniform sample of its active tokens, so summed activation estimates the full corpus's)."""
    d_sae = state.count.numel()
    loc = state.reservoir.loc.cpu()
    feature, slot = (loc >= 0).nonzero(as_tuple=True)
    frame = pd.DataFrame(
        {
            "feature": feature.numpy(),
            "token": corpus.token[loc[feature, slot]].numpy(),
            "weight": state.reservoir.value.cpu()[feature, slot].double().numpy(),
        }
    )
    clean = decoder.clean(np.unique(frame["token"]).tolist())
    frame["text"] = frame["token"].map(clean)
    frame = frame[frame["text"] != ""]
    summed = frame.groupby(["feature", "text"], sort=False)["weight"].sum().reset_index()
    summed = summed.sort_values(["feature", "weight", "text"], ascending=[True, False, True])
    lists = summed.groupby("feature", sort=False)["text"].agg(lambda s: list(s[:n]))
    out: list[list[str]] = [[] for _ in range(d_sae)]
    for feature_id, texts in lists.items():
        out[int(feature_id)] = texts
    return out


# ---------------------------------------------------------------- logit lens


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream before the unembedding (``model.model.norm`` for Llama)."""
    for path in (
        "model.norm",
        "model.final_layernorm",
        "model.decoder.final_layer_norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
    ):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise StatsError(
        "Cannot find this model's final norm for the logit lens (looked for model.norm, "
        "transformer.ln_f, ...)."
    )


def logit_lens(
    model: nn.Module, directions: torch.Tensor, k: int, text: TokenText
) -> tuple[list[list[str]], list[list[str]]]:
    """Per direction (rows of ``directions``), the ``k`` tokens that its final-normed unembedding
    promotes most and least, as cleaned strings (``text = TokenText(tokenizer)``).

    Several ids can clean to the same string (" yes", "yes"), so 3k candidates are ranked and
    deduplicated. The unknown token, a padding token distinct from EOS and unembedding rows past the
    tokenizer's vocabulary are never listed.
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    vocab = int(param.shape[0])
    n_cand = min(3 * k, vocab)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // vocab)
    excluded = _unlisted_ids(text.tokenizer, vocab)
    top_ids, bottom_ids = [], []
    chunks = range(0, directions.shape[0], rows)
    for start in tqdm(chunks, desc="Logit lens", unit="chunk", disable=len(chunks) < 4):
        logits = head(norm(directions[start : start + rows].to(param.device, param.dtype))).float()
        logits[:, excluded] = math.nan  # (rows, vocab)
        top_ids.append(torch.where(logits.isnan(), -math.inf, logits).topk(n_cand, dim=1).indices.cpu())
        bottom_ids.append(
            torch.where(logits.isnan(), math.inf, logits).topk(n_cand, dim=1, largest=False).indices.cpu()
        )
    top, bottom = torch.cat(top_ids), torch.cat(bottom_ids)
    clean = text.clean(torch.unique(torch.cat([top.flatten(), bottom.flatten()])).tolist())
    for token_id in excluded:
        clean[token_id] = ""
    return _dedupe_rows(top, clean, k), _dedupe_rows(bottom, clean, k)


def _unlisted_ids(tokenizer, vocab: int) -> list[int]:
    ids = set(range(len(tokenizer), vocab))  # unembedding rows padded past the tokenizer
    if getattr(tokenizer, "unk_token_id", None) is not None:
        ids.add(int(tokenizer.unk_token_id))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and pad not in (tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)):
        ids.add(int(pad))
    return sorted(i for i in ids if i < vocab)


def _dedupe_rows(ids: torch.Tensor, clean: dict[int, str], k: int) -> list[list[str]]:
    out = []
    for row in ids.tolist():
        texts = [clean[i] for i in row if clean[i]]
        out.append(list(dict.fromkeys(texts))[:k])
    return out


# ---------------------------------------------------------------- token text


class TokenText:
    """Token id → text, decoded once per id: ``display`` keeps spaces (examples are shown as text);
    ``clean`` strips tokenizer markers and whitespace, and gives "" for pure whitespace and broken bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def display(self, ids: list[int]) -> dict[int, str]:
        missing = [i for i in ids if i not in self._cache]
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._cache.update(zip(missing, texts, strict=True))
        return {i: self._cache[i] for i in ids}

    def clean(self, ids: list[int]) -> dict[int, str]:
        return {i: clean_token(text) for i, text in self.display(ids).items()}


def clean_token(text: str) -> str:
    """A token as a list shows it: markers and surrounding whitespace removed, "" if nothing is left
    or the token is a fragment of a multi-byte character."""
    text = text.translate(_MARKERS).strip()
    return "" if "\ufffd" in text else text
