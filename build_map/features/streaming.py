"""The one streaming pass of the statistics: per feature, fixed-size tensors only.

Per feature it keeps the active-token count and activation sum, a running top-n of (activation,
token location, window) and a uniform reservoir sample of the same (``RunningTop`` with random
keys: keep the R largest keys = sample without replacement). An entry's *window* is the feature's
activation on the ~20 tokens around it, read from the batch's activations when the entry gets into
a buffer: a batch always holds whole sequences, so no second pass over the model is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from build_map.activations.batches import iter_activation_batches
from build_map.activations.replay import HarvestReplay
from build_map.common.devices import model_in_dtype, resolve_compute_dtype
from build_map.features.config import StatsConfig
from build_map.lm.models import LoadedModel
from build_map.lm.tokens import pad_token_id
from build_map.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)


@dataclass
class CorpusIndex:
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


class RunningTop:
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

    def update(
        self, feats: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, batch: EncodedBatch
    ) -> None:
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
class EncodedBatch:
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
class StreamState:
    count: torch.Tensor  # (d_sae,) active tokens
    act_sum: torch.Tensor  # (d_sae,) float64
    top: RunningTop  # score = activation
    reservoir: RunningTop  # score = random key


def stream_corpus(
    loaded: LoadedModel,
    sae: SparseAutoencoder,
    hookpoint: str,
    sequences: Iterable[Sequence[int]],
    cfg: StatsConfig,
    device: torch.device,
    replay: HarvestReplay | None = None,
) -> tuple[StreamState, CorpusIndex]:
    """Run ``sequences`` through the model (cut at the hookpoint), or read them from ``replay``,
    and through the SAE once."""
    d_sae, offsets = sae.d_sae, window_offsets(cfg, device)
    state = StreamState(
        count=torch.zeros(d_sae, dtype=torch.long, device=device),
        act_sum=torch.zeros(d_sae, dtype=torch.float64, device=device),
        top=RunningTop(d_sae, cfg.n_top, len(offsets), device),
        reservoir=RunningTop(d_sae, max(cfg.reservoir_size, 1), len(offsets), device),
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kept: list[torch.Tensor] = []  # kept[i] is sequence i, to rebuild example text
    seq_parts, pos_parts, tok_parts = [], [], []
    n_seen = 0
    bar = tqdm(total=cfg.n_tokens, desc="Feature stats", unit="tok", unit_scale=True)
    # A bf16 copy of a float32 model on CPU, as in harvesting (see StatsConfig.compute_dtype).
    with model_in_dtype(loaded.model, resolve_compute_dtype(loaded.model, cfg.compute_dtype)) as model:
        recorded = _recorded(sequences, kept)
        if replay is None:
            batches = iter_activation_batches(model, loaded.tokenizer, hookpoint, recorded, cfg.batch_tokens)
        else:
            batches = replay.batches(
                model, pad_token_id(loaded.tokenizer), hookpoint, recorded, cfg.batch_tokens
            )
        for harvested in batches:
            take = min(int(harvested.acts.shape[0]), cfg.n_tokens - n_seen)
            # The whole batch is encoded (windows may reach past the token budget); only ``take`` count.
            acts = sae.encode(harvested.acts.to(device))  # (n, d_sae)
            batch = EncodedBatch(acts, harvested.sequence_ids.to(device), n_seen, offsets)
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
    corpus = CorpusIndex(
        kept,
        torch.cat(seq_parts) if seq_parts else empty,
        torch.cat(pos_parts) if pos_parts else empty,
        torch.cat(tok_parts) if tok_parts else empty,
    )
    return state, corpus


def window_offsets(cfg: StatsConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(-cfg.context_before, cfg.context_after + 1, device=device)


def _recorded(sequences: Iterable[Sequence[int]], kept: list[torch.Tensor]) -> Iterator[list[int]]:
    """Pass ``sequences`` on as lists, keeping each one (as a compact tensor) in ``kept``."""
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        kept.append(ids)
        yield ids.tolist()


def _accumulate(state: StreamState, batch: EncodedBatch, take: int, generator: torch.Generator) -> None:
    rows, feats = batch.acts[:take].nonzero(as_tuple=True)  # sparse: only the active (token, feature) pairs
    values = batch.acts[rows, feats].float()
    state.count += torch.bincount(feats, minlength=state.count.numel())
    state.act_sum.index_add_(0, feats, values.double())
    state.top.update(feats, values, rows, batch)
    keys = torch.rand(values.shape, generator=generator, device=values.device)
    state.reservoir.update(feats, keys, rows, batch)
