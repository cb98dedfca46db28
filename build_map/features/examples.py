"""Which examples a feature card shows, and their table: the top activations, then per activation
quantile the reservoir samples nearest to it (labels are better from across the distribution)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from build_map.features.config import TOP_BUCKET, StatsConfig, bucket_name
from build_map.features.streaming import CorpusIndex, StreamState
from build_map.lm.tokens import TokenText


@dataclass
class _Chosen:
    feature: torch.Tensor  # (n_examples,) int64
    bucket: list[str]
    rank: torch.Tensor  # (n_examples,) order within the bucket
    act: torch.Tensor  # (n_examples,) activation at the focus token
    loc: torch.Tensor  # (n_examples,) corpus-wide token index of the focus token
    window: torch.Tensor  # (n_examples, W) activations around it


def choose_examples(state: StreamState, cfg: StatsConfig) -> _Chosen:
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


def example_rows(corpus: CorpusIndex, chosen: _Chosen, cfg: StatsConfig, decoder: TokenText) -> pd.DataFrame:
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
