"""Per-feature statistics from one streaming pass over a corpus: density, activations, examples,
the tokens a feature fires on, the logit lens and decoder neighbours."""
