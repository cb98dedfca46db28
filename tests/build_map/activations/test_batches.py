"""Activation batches keep every real token after the first, in order, each as if run alone."""

from __future__ import annotations

import torch

from build_map.activations.batches import iter_activation_batches

HOOKPOINT = "model.layers.0"


def _sequences(vocab: int, n: int = 12, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


def test_activation_batches_drop_first_and_padding(tiny_model, tiny_tokenizer):
    sequences = _sequences(tiny_model.config.vocab_size)
    batches = list(iter_activation_batches(tiny_model, tiny_tokenizer, HOOKPOINT, sequences, batch_tokens=60))
    assert len(batches) > 1
    acts = torch.cat([b.acts for b in batches])
    seq_ids = torch.cat([b.sequence_ids for b in batches])
    positions = torch.cat([b.positions for b in batches])
    token_ids = torch.cat([b.token_ids for b in batches])
    expected = [(s, p) for s, seq in enumerate(sequences) for p in range(1, len(seq))]
    assert list(zip(seq_ids.tolist(), positions.tolist(), strict=True)) == expected
    assert token_ids.tolist() == [sequences[s][p] for s, p in expected]
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"
    # Each kept row equals that sequence run alone, unpadded, through the full model.
    for s, seq in enumerate(sequences):
        if len(seq) < 2:
            continue
        with torch.no_grad():
            alone = tiny_model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(acts[seq_ids == s], alone[1:], rtol=1e-4, atol=1e-5)
