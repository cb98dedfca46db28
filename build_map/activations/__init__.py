"""Residual-stream activations over a corpus: batches through the model cut at the hookpoint,
and the resumable, shuffled activation buffer on disk that SAE training reads."""
