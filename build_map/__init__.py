"""Offline builder: from a model and a sparse autoencoder to a map bundle."""

__version__ = "0.1.0"
