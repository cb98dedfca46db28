"""Seeded per-row sampling: the nucleus a full sort finds, draws from the softmax, Gumbel-max per row."""

from __future__ import annotations

import pytest
import torch

from build_map.steering.requests import (
    SamplingConfig,
)
from build_map.steering.sampling import RowSampler, noise_seed


@pytest.mark.parametrize("spread", [8.0, 2.0, 0.5, 0.01])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_matches_a_full_sort(spread, top_p):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(4)) * spread
    logits[:3] = -torch.inf  # masked tokens (end of turn before min_new_tokens)
    sampler = RowSampler([SamplingConfig(temperature=1.0, top_p=top_p)], [0], 0, [])
    mask = sampler.nucleus_mask(logits.log_softmax(-1), top_p)
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(-1) - probs[order]
    assert mask.nonzero().flatten().tolist() == sorted(order[mass_before < top_p].tolist())


def test_sampler_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -9.0])
    sampler = RowSampler([SamplingConfig(temperature=1.0)], [3], 0, [])
    counts = torch.zeros(5)
    for step in range(4000):
        counts[sampler(torch.zeros(1, step, dtype=torch.long), logits[None].clone()).argmax()] += 1
    torch.testing.assert_close(counts / 4000, logits.softmax(-1), atol=0.03, rtol=0)


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sampling_a_row_is_gumbel_max_over_its_nucleus(top_p):
    """Candidate and whole-vocabulary paths agree with the plain definition, row by row."""
    gen = torch.Generator().manual_seed(5)
    configs = [SamplingConfig(temperature=0.7, top_p=top_p)] * 3
    sampler = RowSampler(configs, [11, 12, 11], 0, [])
    everything = torch.ones(3000, dtype=torch.bool)
    for step in range(20):
        scores = torch.randn(3, 3000, generator=gen) * torch.tensor([[6.0], [0.3], [1.5]])
        chosen = sampler.sample(scores.clone(), step)
        for r, seed in enumerate([11, 12, 11]):
            log_probs = (scores[r] / 0.7).log_softmax(-1)
            allowed = sampler.nucleus_mask(log_probs, top_p) if top_p < 1 else everything
            uniform = torch.rand(3000, generator=torch.Generator().manual_seed(noise_seed(seed, step)))
            noisy = log_probs.masked_fill(~allowed, -torch.inf) - torch.log(-torch.log(uniform))
            assert int(chosen[r]) == int(noisy.argmax())
