"""The library and the offline builder: from a model and a sparse autoencoder to a map bundle, and
the steering core the explorer serves. Its rooms and their layers: docs/ARCHITECTURE.md."""

__version__ = "0.1.0"
