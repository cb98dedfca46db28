"""What the output-effect probe measures and how it picks a feature's click strength.

The probe (``build_map.features.output_probe``) adds ``strength × max_act × W_dec[i]`` at the
hookpoint of a few short chat contexts. It adds it to the positions that write the reply: the
last prompt token, which predicts the first reply token, and the first reply tokens, the same
positions the steering engine steers by default. Then it reads the next-token distribution at
those positions through the rest of the model.

The rule for ``steer_strength``:
* ``KL(s)`` is the mean over the probed positions of KL(steered ‖ unsteered) in nats, at
  strength ``s`` (in units of the feature's max activation).
* A strength is *clear* when ``KL(s) ≥ clear_kl``, *collapsed* when ``KL(s) > collapse_kl``.
* ``steer_strength`` is the smallest tested strength that is clear and has not collapsed. When
  no tested strength is clear, it is the largest tested strength (it stays coherent, and the low
  ``steerability`` says the click will do little). When every clear strength has collapsed, it
  is the largest strength below collapse, or the smallest on the grid.

The strengths tested are a search on ``STRENGTH_GRID``. Near zero KL grows with the square of
the strength, so each step jumps by the number of grid steps that this law predicts would land
on ``target_kl``, at most ``max_jump`` steps. Every feature takes two steps; a third runs only for
the features that have no clear, coherent strength yet.
"""

from __future__ import annotations

from dataclasses import dataclass

STRENGTH_GRID = tuple(round(0.25 * 2 ** (i / 2), 4) for i in range(13))
"""0.25 to 16 × max activation, √2 apart: the strengths the probe may test."""
CLEAR_STEERABILITY = 0.1
"""Steerability from which a feature counts as steering clearly: a tenth of the next-token
probability moved onto its own tokens at its click strength."""
PROBE_PROMPTS = (
    "Can you tell me something interesting?",
    "What would you do on a free afternoon?",
    "Describe something you like.",
    "Write a few sentences for my friend.",
)
"""Short everyday requests, deliberately unlike the sweep's and the benchmarks' prompts."""


class ProbeError(ValueError):
    """The probe cannot run with these inputs; the message says what to change."""


@dataclass(frozen=True)
class ProbeConfig:
    prompts: tuple[str, ...] = PROBE_PROMPTS
    """User messages of the probe contexts (rendered with the chat template)."""
    reply_tokens: int = 1
    """Unsteered greedy reply tokens appended to each prompt: the probed positions are the last
    prompt token and these, so 1 + reply_tokens next-token distributions per context."""
    clear_kl: float = 1.0
    """KL (nats) at which a strength's effect counts as clear."""
    collapse_kl: float = 4.0
    """KL (nats) above which the distribution counts as collapsed."""
    target_kl: float = 1.3
    """Where the search aims: a little above clear_kl, so the smallest clear strength is tested."""
    start_strength: float = 2.0
    """First strength tested for every feature (a grid value)."""
    search_steps: int = 3
    """Most strengths tested per feature: every feature takes two steps, and a third only when
    neither was clear without having collapsed."""
    max_jump: int = 4
    """Most grid steps one search step moves (4 = a factor of 4 in strength)."""
    n_tokens: int = 10
    """Tokens listed in output_promotes / output_suppresses, and the promoted tokens whose gained
    probability is the steerability."""
    batch_rows: int = 128
    """Features per forward pass (each row holds 1 + reply_tokens positions)."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ProbeError("ProbeConfig.prompts is empty; give at least one probe prompt.")
        if self.start_strength not in STRENGTH_GRID:
            raise ProbeError(f"ProbeConfig.start_strength must be one of {STRENGTH_GRID}.")
        if not 0 < self.clear_kl <= self.target_kl < self.collapse_kl:
            raise ProbeError("ProbeConfig: need 0 < clear_kl <= target_kl < collapse_kl.")
        if self.reply_tokens < 0 or self.search_steps < 1 or self.batch_rows < 1 or self.n_tokens < 1:
            raise ProbeError("ProbeConfig: reply_tokens >= 0; search_steps, batch_rows, n_tokens >= 1.")
