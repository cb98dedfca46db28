"""What the output-effect probe measures and how it picks a feature's click strength.

The probe (``build_map.features.output_probe``) adds ``strength × max_act × W_dec[i]`` at the
hookpoint of a few short chat contexts, at positions that write the reply (the last prompt
token, and one mid-reply), and reads the next-token distribution there through the rest of the
model.

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

STRENGTH_GRID = tuple(round(0.0625 * 2 ** (i / 2), 4) for i in range(17))
"""1/16 to 16 × max activation, √2 apart: the strengths the probe may test (a few features move
the output so much per unit of max activation that even 1/4 collapses it)."""
CLEAR_STEERABILITY = 0.1
"""Steerability from which a feature counts as steering clearly: a tenth of the next-token
probability moved onto its own words at its click strength."""
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
    positions: tuple[int, ...] = (0, 6)
    """Probed positions per prompt, as offsets into the unsteered greedy reply: 0 is the last
    prompt token (it writes the first reply token), j the position of reply token j (it writes
    token j + 1). Each is probed on its own, everything before it unsteered in the cache: the
    reply's start says how a feature opens a reply, a position mid-sentence which words it
    writes (the start alone lists mostly "I", "The", "Sure")."""
    clear_kl: float = 0.25
    """KL (nats) at which a strength's effect counts as clear. Set on the dev prompts and features
    of ``bench/bench_steer_probe.py --dev`` (never the bench's) for the layer-22 demo SAE: one grid
    step below the 0.5 rule (KL grows with the square of the strength) kept half the random
    features visible at a coherence drop within 0.6; the figures are in docs/ARCHITECTURE.md,
    "One click must steer"."""
    collapse_kl: float = 4.0
    """KL (nats) above which the distribution counts as collapsed."""
    target_kl: float = 0.33
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
        if not self.positions or min(self.positions) < 0:
            raise ProbeError("ProbeConfig.positions: give at least one reply offset, each >= 0.")
        if self.search_steps < 1 or self.batch_rows < 1 or self.n_tokens < 1:
            raise ProbeError("ProbeConfig: search_steps, batch_rows and n_tokens must be >= 1.")
