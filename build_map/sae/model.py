"""The sparse autoencoder module, one class for every architecture it loads (ReLU, TopK, JumpReLU).

Conventions (shared by every format once loaded):
  W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in) — decoder directions are rows —,
  b_dec (d_in,), optional threshold (d_sae,) for JumpReLU, k for TopK.
  encode(x) = act(pre) with pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
  decode(f) = f @ W_dec + b_dec
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = ("relu", "topk", "jumprelu")


class SAEError(ValueError):
    """An SAE file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    """Width of the residual stream the SAE reads (the model's hidden size)."""
    d_sae: int
    """Number of features (latents)."""
    activation: str = "topk"
    """relu, topk or jumprelu."""
    k: int | None = None
    """Active features per token for topk."""
    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the input before encoding (SAELens option, sparsify always)."""
    hookpoint: str | None = None
    """Where the SAE was trained, when the file says so."""
    source_format: str = "native"
    """Which layout it was loaded from: goodfire, saelens, sparsify or native."""


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise SAEError(
                f"Unknown SAE activation {cfg.activation!r}; choose one of {', '.join(ACTIVATIONS)}."
            )
        if cfg.activation == "topk" and not (cfg.k and 0 < cfg.k <= cfg.d_sae):
            raise SAEError(f"A topk SAE needs 0 < k <= d_sae ({cfg.d_sae}); got k={cfg.k}.")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(d_sae, d_in): the direction each feature writes into the residual stream."""
        return self.W_dec

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            return pre * (pre > self.threshold)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) → (..., d_sae) dense feature activations."""
        return self.activate(self.pre_acts(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) → (..., d_in)."""
        return features.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def check_matches_model(sae: SparseAutoencoder, model_d: int, hookpoint: str, source: str = "SAE") -> None:
    """Refuse an SAE whose width differs from the model's at the hookpoint."""
    if sae.d_in != model_d:
        raise SAEError(
            f"{source}: SAE d_in {sae.d_in} does not match the model's hidden size {model_d} at "
            f"{hookpoint}; pass the SAE trained for this model (or the model this SAE was trained on)."
        )
