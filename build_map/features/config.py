"""What the per-feature statistics pass computes: one frozen config, every field documented."""

from __future__ import annotations

from dataclasses import dataclass

from build_map.common.devices import COMPUTE_DTYPES

TOP_BUCKET = "top"


class StatsError(ValueError):
    """Statistics cannot be computed from these inputs; the message says why."""


@dataclass(frozen=True)
class StatsConfig:
    n_tokens: int = 100_000
    """Corpus tokens to run through the model and SAE (first positions and padding not counted)."""
    context_before: int = 14
    """Tokens shown before an example's focus token."""
    context_after: int = 5
    """Tokens shown after an example's focus token."""
    n_top: int = 10
    """Top-activating examples kept per feature."""
    quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Activation quantiles (of a feature's active tokens) to show examples from, besides the top:
    labelling works better with examples from across the distribution, not only the maxima."""
    n_per_quantile: int = 3
    """Examples per quantile bucket."""
    reservoir_size: int = 64
    """Uniformly sampled activating tokens kept per feature, for quantiles and top tokens. With the
    top examples, each holds a window of activations: d_sae x (n_top + reservoir_size) x 20 floats
    (390 MB for 65,536 features), on the SAE's device."""
    batch_tokens: int = 4096
    """Tokens per forward pass (rows x longest sequence), as in harvesting. Also bounds the dense
    (tokens, d_sae) activation block: 4,096 x 65,536 features is 1 GiB in float32."""
    n_top_tokens: int = 10
    """Tokens listed per feature in ``top_tokens``."""
    logit_k: int = 10
    """Promoted and suppressed tokens listed per feature by the logit lens."""
    n_neighbors: int = 10
    """Nearest features by decoder cosine."""
    seed: int = 0
    """Seed for the reservoir sampling."""
    compute_dtype: str = "auto"
    """dtype of the forward passes, as in harvesting (``build_map.common.devices.resolve_compute_dtype``):
    "auto" runs a float32 model in bf16 on a CPU with native bf16 (much faster there; the demo SAE is
    trained on such activations), "model" keeps the model's dtype; "float32", "bfloat16" and
    "float16" name one."""

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.n_top < 1 or self.batch_tokens < 1:
            raise StatsError("StatsConfig: n_tokens, n_top and batch_tokens must be positive.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise StatsError(
                f"StatsConfig.compute_dtype={self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}."
            )
        if self.context_before < 0 or self.context_after < 0:
            raise StatsError("StatsConfig: context_before and context_after must be >= 0.")
        if any(not 0.0 < q < 1.0 for q in self.quantiles):
            raise StatsError(
                f"StatsConfig.quantiles must lie strictly between 0 and 1; got {self.quantiles}."
            )

    @property
    def buckets(self) -> list[str]:
        return [TOP_BUCKET] + [bucket_name(q) for q in self.quantiles]


def bucket_name(quantile: float) -> str:
    """0.25 → "q25"; 0.125 → "q12.5"."""
    return f"q{100 * quantile:g}"
