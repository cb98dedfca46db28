"""Per-feature statistics over a corpus: density, activations, examples, top tokens, logit lens, neighbours.

One streaming pass runs the model (cut after the hookpoint) and the SAE over the corpus and keeps,
per feature, only fixed-size tensors (so 65,536 features fit on a GPU):

- active-token count and activation sum (density, mean over active tokens);
- a running top-n of (activation, token location): each batch's nonzero activations (the SAE is
  sparse, so there are few) are ranked within their feature and merged into a (d_sae, n_top) buffer;
- a uniform reservoir sample of (activation, location) per feature, by the same merge with random
  keys (keep the R largest keys = sample without replacement). Quantile-bucket examples and the
  tokens a feature fires on come from it.

Only token ids and (sequence, position) per token are kept from the corpus. A second, small pass
re-runs only the sequences that hold a chosen example to get each feature's activation on every
token of the example's window.
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

from build_map.harvest import batch_sequences, cut_forward, iter_activation_batches, pad_batch
from build_map.models import LoadedModel, d_model, normalize_hookpoint
from build_map.project import exact_knn
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
    """Uniformly sampled activating tokens kept per feature, for quantiles and top tokens."""
    batch_tokens: int = 4096
    """Tokens per forward pass (rows x longest sequence), as in harvesting."""
    encode_chunk: int = 4096
    """Tokens per SAE encode: bounds the dense (tokens, d_sae) activation block in memory."""
    n_top_tokens: int = 10
    """Tokens listed per feature in ``top_tokens``."""
    logit_k: int = 10
    """Promoted and suppressed tokens listed per feature by the logit lens."""
    n_neighbors: int = 10
    """Nearest features by decoder cosine."""
    seed: int = 0
    """Seed for the reservoir sampling."""

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.n_top < 1 or self.batch_tokens < 1 or self.encode_chunk < 1:
            raise StatsError("StatsConfig: n_tokens, n_top, batch_tokens and encode_chunk must be positive.")
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
        decoder = _TokenText(loaded.tokenizer)
        examples = _example_rows(loaded, sae, hookpoint, corpus, _choose_examples(state, cfg), cfg, decoder)
        contexts = time.perf_counter()
        features = _feature_rows(loaded, sae, state, corpus, cfg, decoder)
    logger.info(
        "Stats over %d tokens: %d of %d features live; %.1f s streaming, %.1f s example contexts, "
        "%.1f s logit lens/neighbours/top tokens",
        corpus.n_tokens,
        int((~features["dead"]).sum()),
        sae.d_sae,
        streamed - started,
        contexts - streamed,
        time.perf_counter() - contexts,
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
    """Per feature, the ``size`` entries with the highest score seen so far, with their payloads."""

    def __init__(self, d_sae: int, size: int, device: torch.device):
        self.score = torch.full((d_sae, size), -math.inf, device=device)
        self.value = torch.zeros((d_sae, size), device=device)
        self.loc = torch.full((d_sae, size), -1, dtype=torch.long, device=device)

    def update(
        self, feats: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, locs: torch.Tensor
    ) -> None:
        # Only candidates that beat their feature's current worst kept entry can get in.
        better = scores > self.score[feats, -1]
        feats, scores, values, locs = feats[better], scores[better], values[better], locs[better]
        if feats.numel() == 0:
            return
        d_sae, size = self.score.shape
        # Rank candidates within their feature: sort by score, then (stably) by feature.
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(feats[order], stable=True)]
        feats = feats[order]
        counts = torch.bincount(feats, minlength=d_sae)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(feats.numel(), device=feats.device) - starts[feats]
        keep = rank < size
        feats, rank, order = feats[keep], rank[keep], order[keep]
        cand = _RunningTop(d_sae, size, self.score.device)
        cand.score[feats, rank] = scores[order]
        cand.value[feats, rank] = values[order]
        cand.loc[feats, rank] = locs[order]
        merged_score = torch.cat([self.score, cand.score], 1)
        self.score, index = merged_score.topk(size, dim=1)
        self.value = torch.cat([self.value, cand.value], 1).gather(1, index)
        self.loc = torch.cat([self.loc, cand.loc], 1).gather(1, index)


@dataclass
class _State:
    count: torch.Tensor  # (d_sae,) active tokens
    act_sum: torch.Tensor  # (d_sae,) float64
    top: _RunningTop  # score = activation
    reservoir: _RunningTop  # score = random key


def _stream(loaded, sae, hookpoint, sequences, cfg, device) -> tuple[_State, _Corpus]:
    d_sae = sae.d_sae
    state = _State(
        count=torch.zeros(d_sae, dtype=torch.long, device=device),
        act_sum=torch.zeros(d_sae, dtype=torch.float64, device=device),
        top=_RunningTop(d_sae, cfg.n_top, device),
        reservoir=_RunningTop(d_sae, max(cfg.reservoir_size, 1), device),
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kept: list[torch.Tensor] = []  # kept[i] is sequence i: the second pass re-runs some of them
    seq_parts, pos_parts, tok_parts = [], [], []
    n_seen = 0
    bar = tqdm(total=cfg.n_tokens, desc="Feature stats", unit="tok", unit_scale=True)
    batches = iter_activation_batches(
        loaded.model, loaded.tokenizer, hookpoint, _recorded(sequences, kept), cfg.batch_tokens
    )
    for batch in batches:
        take = min(int(batch.acts.shape[0]), cfg.n_tokens - n_seen)
        for chunk in range(0, take, cfg.encode_chunk):
            hidden = batch.acts[chunk : min(chunk + cfg.encode_chunk, take)].to(device)
            _accumulate(state, sae.encode(hidden), n_seen + chunk, generator)  # (chunk, d_sae)
        seq_parts.append(batch.sequence_ids[:take])
        pos_parts.append(batch.positions[:take])
        tok_parts.append(batch.token_ids[:take])
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


def _recorded(sequences: Iterable[Sequence[int]], kept: list[torch.Tensor]) -> Iterator[list[int]]:
    """Pass ``sequences`` on as lists, keeping each one (as a compact tensor) in ``kept``."""
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        kept.append(ids)
        yield ids.tolist()


def _accumulate(state: _State, acts: torch.Tensor, first_loc: int, generator: torch.Generator) -> None:
    rows, feats = acts.nonzero(as_tuple=True)  # sparse: only the active (token, feature) pairs
    values = acts[rows, feats].float()
    locs = rows + first_loc
    state.count += torch.bincount(feats, minlength=state.count.numel())
    state.act_sum.index_add_(0, feats, values.double())
    state.top.update(feats, values, values, locs)
    keys = torch.rand(values.shape, generator=generator, device=values.device)
    state.reservoir.update(feats, keys, values, locs)


# ---------------------------------------------------------------- choosing examples


@dataclass
class _Chosen:
    feature: torch.Tensor  # (n_examples,) int64
    bucket: list[str]
    rank: torch.Tensor
    act: torch.Tensor
    loc: torch.Tensor


def _choose_examples(state: _State, cfg: StatsConfig) -> _Chosen:
    """Top examples, then per quantile the reservoir samples whose activation is nearest to it."""
    top_ok = state.top.loc >= 0
    parts = [(TOP_BUCKET, state.top.value, state.top.loc, top_ok)]
    res_value, res_loc = state.reservoir.value, state.reservoir.loc
    valid = res_loc >= 0
    if cfg.quantiles and cfg.n_per_quantile > 0 and bool(valid.any()):
        in_top = (res_loc[:, :, None] == state.top.loc[:, None, :]).any(-1)
        free = valid & ~in_top
        for q in cfg.quantiles:
            level = _row_quantile(res_value, valid, q)  # (d_sae,)
            distance = torch.where(
                free, (res_value - level[:, None]).abs(), torch.full_like(res_value, math.inf)
            )
            n = min(cfg.n_per_quantile, distance.shape[1])
            near, index = distance.topk(n, dim=1, largest=False)
            ok = torch.isfinite(near)
            value, loc = res_value.gather(1, index), res_loc.gather(1, index)
            order = torch.argsort(torch.where(ok, value, -math.inf), dim=1, descending=True)
            parts.append((bucket_name(q), value.gather(1, order), loc.gather(1, order), ok.gather(1, order)))
            free = free.scatter(1, index, torch.zeros_like(ok)) if ok.any() else free
    return _flatten_choice(parts)


def _row_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per row, the linear-interpolated ``q`` quantile of the valid entries (NaN for none).

    torch.nanquantile would do, but refuses inputs over 16M elements (65,536 features x 256)."""
    ordered = torch.where(valid, values, torch.full_like(values, math.inf)).sort(dim=1).values
    count = valid.sum(1)
    where = q * (count - 1).clamp(min=0).to(values.dtype)
    lo = where.floor().long()
    hi = where.ceil().long()
    low, high = ordered.gather(1, lo[:, None])[:, 0], ordered.gather(1, hi[:, None])[:, 0]
    level = low + (high - low) * (where - lo.to(values.dtype))
    return torch.where(count > 0, level, torch.full_like(level, math.nan))


def _flatten_choice(parts) -> _Chosen:
    features, buckets, ranks, acts, locs = [], [], [], [], []
    for bucket, value, loc, ok in parts:
        feature, slot = ok.nonzero(as_tuple=True)
        # Valid entries are packed at the front of each row (sorted, best first), so slot = rank.
        features.append(feature.cpu())
        ranks.append(slot.cpu())
        acts.append(value[feature, slot].float().cpu())
        locs.append(loc[feature, slot].cpu())
        buckets.extend([bucket] * int(feature.numel()))
    chosen = _Chosen(torch.cat(features), buckets, torch.cat(ranks), torch.cat(acts), torch.cat(locs))
    return chosen


# ---------------------------------------------------------------- second pass: example windows


def _example_rows(
    loaded, sae, hookpoint, corpus: _Corpus, chosen: _Chosen, cfg: StatsConfig, decoder
) -> pd.DataFrame:
    """EXAMPLE_SCHEMA rows, with each feature's activation on every token of the example's window."""
    seq, pos = corpus.seq[chosen.loc], corpus.pos[chosen.loc]
    lengths = torch.tensor([int(s.numel()) for s in corpus.sequences], dtype=torch.long)
    first = (pos - cfg.context_before).clamp(min=0)  # window [first, stop) inside its sequence
    stop = torch.minimum(pos + cfg.context_after + 1, lengths[seq])
    window = first[:, None] + torch.arange(cfg.context_before + cfg.context_after + 1)[None, :]  # (n, W)
    inside = window < stop[:, None]
    window_acts = _window_activations(
        loaded, sae, hookpoint, corpus, chosen.feature, seq, window, inside, cfg
    )
    flat_ids = torch.cat(corpus.sequences) if corpus.sequences else torch.zeros(0, dtype=torch.long)
    seq_start = torch.cumsum(lengths, 0) - lengths
    window_tokens = flat_ids[(seq_start[seq][:, None] + window).clamp(max=max(len(flat_ids) - 1, 0))]
    unique, inverse = torch.unique(window_tokens, return_inverse=True)
    texts = decoder.display(unique.tolist())
    table = np.array([texts[t] for t in unique.tolist()], dtype=object)
    token_rows = table[inverse.numpy()].tolist() if len(table) else [[] for _ in range(len(seq))]
    widths = (stop - first).tolist()
    acts_np = window_acts.numpy()
    return pd.DataFrame(
        {
            "feature": chosen.feature.numpy().astype(np.int32),
            "rank": chosen.rank.numpy().astype(np.int32),
            "bucket": chosen.bucket,
            "act": chosen.act.numpy().astype(np.float32),
            "tokens": [row[:w] for row, w in zip(token_rows, widths, strict=True)],
            "acts": [row[:w] for row, w in zip(acts_np, widths, strict=True)],
        }
    )


def _window_activations(loaded, sae, hookpoint, corpus, feature, seq, window, inside, cfg) -> torch.Tensor:
    """(n, W) activation of each example's feature on its window's tokens, re-running only the
    sequences that hold an example, each cut after its last needed token (the model is causal).
    Position 0 is excluded from the statistics, so it shows 0."""
    window_acts = torch.zeros(window.shape, dtype=torch.float32)
    order = torch.argsort(seq, stable=True)
    seq_sorted = seq[order]
    needed, counts = torch.unique_consecutive(seq_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0)
    group = torch.repeat_interleave(torch.arange(int(needed.numel())), counts)
    needed_to = torch.where(inside, window, 0).amax(1)[order]  # last window position per example
    last = torch.zeros(int(needed.numel()), dtype=torch.long).scatter_reduce_(0, group, needed_to, "amax")
    cut = [corpus.sequences[int(s)][: int(stop) + 1].tolist() for s, stop in zip(needed, last, strict=True)]
    bar = tqdm(total=int(needed.numel()), desc="Example contexts", unit="seq", disable=needed.numel() < 64)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    for first, batch in batch_sequences(cut, cfg.batch_tokens):
        input_ids, attention_mask = pad_batch(batch, pad_id)
        hidden = cut_forward(
            loaded.model, hookpoint, input_ids.to(loaded.device), attention_mask.to(loaded.device)
        )  # (b, L, d_model)
        lo = int(ends[first - 1]) if first else 0
        rows = order[lo : int(ends[first + len(batch) - 1])]  # the examples in these sequences
        mask = inside[rows]
        batch_row = torch.searchsorted(needed, seq[rows]) - first
        cell_row = batch_row[:, None].expand_as(mask)[mask]
        cell_pos = window[rows][mask]
        cell_feat = feature[rows][:, None].expand_as(mask)[mask]
        values = _encode_cells(sae, hidden, cell_row, cell_pos, cell_feat, cfg.encode_chunk)
        values[cell_pos == 0] = 0.0
        block = torch.zeros(mask.shape)
        block[mask] = values
        window_acts[rows] = block
        bar.update(len(batch))
    bar.close()
    return window_acts


def _encode_cells(sae, hidden, cell_row, cell_pos, cell_feat, chunk: int) -> torch.Tensor:
    """Activation of feature ``cell_feat[i]`` at token (``cell_row[i]``, ``cell_pos[i]``), encoding
    each distinct token once, ``chunk`` tokens at a time."""
    length = hidden.shape[1]
    flat = cell_row * length + cell_pos
    tokens, cell_token = torch.unique(flat, return_inverse=True)
    values = torch.zeros(flat.shape, dtype=torch.float32)
    device = sae.W_dec.device
    vectors = hidden.reshape(-1, hidden.shape[-1])
    for start in range(0, int(tokens.numel()), chunk):
        stop = start + chunk
        acts = sae.encode(vectors[tokens[start:stop].to(vectors.device)].to(device))  # (chunk, d_sae)
        cells = ((cell_token >= start) & (cell_token < stop)).nonzero().flatten()
        values[cells] = (
            acts[(cell_token[cells] - start).to(device), cell_feat[cells].to(device)].float().cpu()
        )
    return values


# ---------------------------------------------------------------- feature table


def _feature_rows(loaded, sae, state: _State, corpus: _Corpus, cfg: StatsConfig, decoder) -> pd.DataFrame:
    count = state.count.cpu()
    dead = count == 0
    mean = (state.act_sum.cpu() / count.clamp(min=1)).float()
    max_act = torch.where(dead, torch.zeros(()), state.top.value[:, 0].float().cpu())
    top_logits, bottom_logits = logit_lens(loaded.model, sae.W_dec, cfg.logit_k, decoder)
    neighbors, _ = exact_knn(sae.W_dec.detach(), cfg.n_neighbors, device=str(sae.W_dec.device))
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
    model: nn.Module, directions: torch.Tensor, k: int, decoder: _TokenText
) -> tuple[list[list[str]], list[list[str]]]:
    """Per direction, the ``k`` tokens its (final-normed) unembedding promotes most and least.

    Several ids can clean to the same string (" yes", "yes"): 3k candidates are ranked and deduplicated.
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    vocab = int(param.shape[0])
    n_cand = min(3 * k, vocab)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // vocab)
    top_ids, bottom_ids = [], []
    for start in tqdm(
        range(0, directions.shape[0], rows),
        desc="Logit lens",
        unit="chunk",
        disable=directions.shape[0] <= rows,
    ):
        logits = head(norm(directions[start : start + rows].to(param.device, param.dtype))).float()
        top_ids.append(logits.topk(n_cand, dim=1).indices.cpu())
        bottom_ids.append(logits.topk(n_cand, dim=1, largest=False).indices.cpu())
    top, bottom = torch.cat(top_ids), torch.cat(bottom_ids)
    clean = decoder.clean(torch.unique(torch.cat([top.flatten(), bottom.flatten()])).tolist())
    return _dedupe_rows(top, clean, k), _dedupe_rows(bottom, clean, k)


def _dedupe_rows(ids: torch.Tensor, clean: dict[int, str], k: int) -> list[list[str]]:
    out = []
    for row in ids.tolist():
        texts = [clean[i] for i in row if clean[i]]
        out.append(list(dict.fromkeys(texts))[:k])
    return out


# ---------------------------------------------------------------- token text


class _TokenText:
    """Token id → text, decoded once per id: ``display`` keeps spaces (examples are shown as text);
    ``clean`` strips tokenizer markers and whitespace and drops pure whitespace and broken bytes."""

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
