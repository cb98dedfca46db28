"""Seeded sampling for a whole batch, one row at a time: the same seed gives the same noise.

``RowSampler`` does Gumbel-max over the temperature / top-p filtered logits, with one uniform per
vocabulary entry drawn at every step from a generator seeded by ``noise_seed(request seed, step)``.
"Same seed" therefore means identical noise on every token at every step: the default and steered
rows of a pair (and a request run alone or inside any batch) draw exactly the same random numbers,
so they differ only where the steering changes the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from build_map.steering.requests import SamplingConfig


class RowSampler:
    """Logits processor that samples each row from its own seeded noise (Gumbel-max over the
    temperature/top-p filtered logits) and marks the chosen token +inf, so generate's greedy argmax
    picks it. Greedy rows are left to that argmax; min_new_tokens masks end of turn. A row's
    presence penalty comes first, on greedy rows too.

    At every step a row draws one uniform per vocabulary entry from a generator seeded with
    ``noise_seed(seed, step)``: rows with the same seed see the same noise on the same token at
    every step, whatever else is in the batch. Work is vectorized over rows and, for peaked
    distributions, the nucleus is found among the top candidates without touching the rest."""

    top_p_candidates = 64
    """The nucleus is looked for among this many top tokens first (one cheap topk)."""
    buckets_per_nat = 16
    """Resolution of the log-probability buckets used for rows whose candidates are not enough."""
    n_buckets = 16 * 40

    def __init__(self, configs: Sequence[SamplingConfig], seeds: Sequence[int], prompt_length: int, eos_ids):
        self.configs = list(configs)
        self.seeds = list(seeds)
        self.prompt_length = prompt_length
        self.eos_ids = list(eos_ids)
        self.sampled = [r for r, cfg in enumerate(self.configs) if cfg.temperature > 0]
        self.penalized = [r for r, cfg in enumerate(self.configs) if cfg.presence_penalty > 0]
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        if self.penalized and step > 0:
            self.penalize(input_ids[:, self.prompt_length :], scores)
        early = [r for r, cfg in enumerate(self.configs) if step < cfg.min_new_tokens]
        if early and self.eos_ids:
            early_rows = torch.tensor(early, device=scores.device)[:, None]
            scores[early_rows, torch.tensor(self.eos_ids, device=scores.device)[None, :]] = -math.inf
        if len(self.sampled) == scores.shape[0]:  # every row samples: no gather copy
            scores[torch.arange(scores.shape[0], device=scores.device), self.sample(scores, step)] = math.inf
        elif self.sampled:
            rows = torch.tensor(self.sampled, device=scores.device)
            scores[rows, self.sample(scores[rows], step)] = math.inf
        return scores

    def penalize(self, generated: torch.Tensor, scores: torch.Tensor) -> None:
        """Subtract each penalized row's presence penalty, in place, once at every token id its
        reply holds (``generated``: (rows, step) ids after the prompt)."""
        rows = torch.tensor(self.penalized, device=scores.device)
        penalty = torch.tensor(
            [self.configs[r].presence_penalty for r in self.penalized], device=scores.device
        )
        seen = torch.zeros((len(self.penalized), scores.shape[-1]), dtype=scores.dtype, device=scores.device)
        seen.scatter_(1, generated[rows].to(scores.device), 1.0)
        scores[rows] -= seen * penalty[:, None].to(scores.dtype)

    def noise(self, step: int, vocab: int, device: torch.device) -> torch.Tensor:
        """(S, vocab) uniforms of the sampled rows at ``step``."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        noise = torch.empty(len(self.sampled), vocab, device=device)
        for i, r in enumerate(self.sampled):
            self.generator.manual_seed(noise_seed(self.seeds[r], step))
            noise[i].uniform_(generator=self.generator)
        return noise

    def sample(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """(S, vocab) scores of the sampled rows → (S,) chosen token ids. Few passes over the
        vocabulary (on a CPU batch they are what sampling costs): divide, logsumexp, topk, noise."""
        device = scores.device
        configs = [self.configs[r] for r in self.sampled]
        top_p = torch.tensor([c.top_p for c in configs], device=device)
        temperature = torch.tensor([c.temperature for c in configs], device=device)
        noise = self.noise(step, scores.shape[-1], device)
        logits = scores / temperature[:, None]
        log_total = logits.logsumexp(-1, keepdim=True)
        top, ids = logits.topk(min(self.top_p_candidates, logits.shape[-1]), dim=-1)
        probs = (top - log_total).exp()
        keep = (probs.cumsum(-1) - probs) < top_p[:, None]  # the token that crosses top_p is kept
        candidates = top.masked_fill(~keep, -math.inf) + _gumbel(noise.gather(-1, ids))
        choice = ids.gather(-1, candidates.argmax(-1, keepdim=True)).squeeze(-1)
        whole = (top_p >= 1.0) | (probs.sum(-1) < top_p)  # no filter, or a nucleus beyond the candidates
        for r in whole.nonzero().flatten().tolist():
            row = logits[r]  # Gumbel-max needs no normalization
            if float(top_p[r]) < 1.0:
                row = row.masked_fill(~self._bucket_nucleus(row - log_total[r], float(top_p[r])), -math.inf)
            choice[r] = (row + _gumbel(noise[r])).argmax()
        return choice

    def nucleus_mask(self, log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
        """(vocab,) mask of the top-p nucleus: the smallest set of most likely tokens whose
        probability reaches top_p (the token that crosses it is kept), as a full sort finds it."""
        top, ids = log_probs.topk(min(self.top_p_candidates, log_probs.shape[-1]))
        probs = top.exp()
        if float(probs.sum()) < top_p:
            return self._bucket_nucleus(log_probs, top_p)
        keep = (probs.cumsum(-1) - probs) < top_p
        return torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, ids, keep)

    def _bucket_nucleus(self, log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
        """(vocab,) nucleus mask: bucket tokens by how far below the best their log-probability is;
        buckets above the one where the cumulative mass crosses top_p are wholly inside, and only
        the crossing bucket is sorted."""
        depth = ((log_probs.max() - log_probs) * self.buckets_per_nat).clamp(max=self.n_buckets - 1).long()
        probs = log_probs.exp()
        mass = torch.zeros(self.n_buckets, dtype=probs.dtype, device=probs.device).scatter_add_(
            0, depth, probs
        )
        cumulative = mass.cumsum(0)
        crossing = min(int((cumulative < top_p).sum()), self.n_buckets - 1)
        before = float(cumulative[crossing - 1]) if crossing else 0.0
        allowed = depth < crossing
        edge = (depth == crossing).nonzero().flatten()
        edge_probs, order = probs[edge].sort(descending=True)
        allowed[edge[order[(before + edge_probs.cumsum(-1) - edge_probs) < top_p]]] = True
        return allowed


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def noise_seed(seed: int, step: int) -> int:
    """Seed of a row's noise at one step: a pure function of (request seed, step), so a row draws
    the same noise alone, in any batch, and beside its paired row."""
    return (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)
