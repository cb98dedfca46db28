"""The language model: loading it, its text (tokens, corpus), its hookpoints, and reading or
rewriting the residual stream at a hookpoint through thread-scoped hooks."""
