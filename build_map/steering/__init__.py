"""Steering SAE features while a model generates, with no UI: requests and their validation,
steering vectors, sampling, streaming, batching, the engine, and the tools built on it (sweeps,
attribution, recipes and links, reply features, the Python session API)."""
