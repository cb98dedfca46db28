"""Steering vectors: what a request's edits add to the residual stream, row by row.

With ``v_i = multiplier * strength * scale_i`` (``scale_i``: feature i's max activation):

* ``nudge``: ``x += v_i * W_dec[i]`` at every position (prompt and reply) of the hookpoint output.
  Identical to Goodfire's encode → add to the feature → decode → add the SAE error back, because
  the decoder is linear.
* ``pin``: clamp the feature so that the SAE encoder reads exactly ``v_i`` at the hookpoint output
  after steering. The residual only moves along the pinned features' decoder rows:
  ``x += sum_j c_j * W_dec[j]``, with ``c`` solved jointly for all pinned features of the request
  from the |P|×|P| system ``pre_P(x + c W_dec[P]) = v_P`` (pre-activations are affine in x). When
  the encoder and decoder rows are matched (``W_dec[i] · W_enc[:, i] = 1``, no cross terms) and the
  feature is active, this is exactly encode → set → decode → add the error back, i.e. a change of
  ``(v_i - f_i) * W_dec[i]``; in general that recipe does not make the encoder read v_i, this does.
  ``v_i = 0`` ablates: the feature is pushed just to zero (nothing changes where it is already off).
  Pins are applied after the nudges, so pins win. Only the pinned features' encoder columns are
  used (``x @ W_enc[:, P] + b_enc[P]``), never the full SAE. For a TopK SAE the pinned feature's
  pre-activation is v_i and it fires at v_i when it ranks in the top k; for JumpReLU values below
  the feature's threshold read as 0.
* ``orthogonal`` (Neuronpedia's and interp-engine's ``OrthogonalDecompSpec``, coeff =
  ``multiplier * strength``): rescale only the residual's component along the feature's unit
  decoder direction ``d̂_i``: ``x → x + (c - 1)(x · d̂_i) d̂_i``; 1 keeps it, 0 removes it, 2
  doubles it, the orthogonal part is untouched.
* ``cap`` (interp-engine's ``ProjectionCapSpec`` with ``max``): cap the projection onto ``d̂_i``
  at what the feature writes at ``v_i``: ``p = x · d̂_i``, ``m = v_i ‖W_dec[i]‖``,
  ``x → x + (min(p, m) - p) d̂_i``; below the cap nothing changes.

Order within a row: nudges, then orthogonal rescalings, then caps (each in the order of the edits),
then pins, so pins win.

Every row of a batch (row 0 unsteered, row 1 steered, rows of other users) gets its own vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from build_map.lm.capture import hidden_of, with_hidden
from build_map.sae.model import SparseAutoencoder
from build_map.steering.requests import Edit, SteeringError, SteeringScope


@dataclass
class RowSteering:
    """One row's steering in float32 on the SAE's device; empty means unsteered."""

    nudge: torch.Tensor | None = None  # (d_in,)
    pin_enc: torch.Tensor | None = None  # (d_in, P) encoder columns of the pinned features
    pin_bias: torch.Tensor | None = None  # (P,) encoder bias, b_dec folded in when applied to input
    pin_value: torch.Tensor | None = None  # (P,) target activations
    pin_threshold: torch.Tensor | None = None  # (P,) where the activation turns on (0 unless jumprelu)
    pin_dec: torch.Tensor | None = None  # (P, d_in) = A⁻¹ W_dec[P], the joint solve folded in
    ortho_dir: torch.Tensor | None = None  # (O, d_in) unit decoder directions
    ortho_gain: torch.Tensor | None = None  # (O,) coefficient - 1
    cap_dir: torch.Tensor | None = None  # (C, d_in) unit decoder directions
    cap_max: torch.Tensor | None = None  # (C,) the projection cap

    @property
    def n_pins(self) -> int:
        return 0 if self.pin_enc is None else int(self.pin_enc.shape[1])

    @property
    def n_projections(self) -> tuple[int, int]:
        """(orthogonal rescalings, caps)."""
        return (
            0 if self.ortho_dir is None else int(self.ortho_dir.shape[0]),
            0 if self.cap_dir is None else int(self.cap_dir.shape[0]),
        )

    @property
    def is_empty(self) -> bool:
        return self.nudge is None and self.n_pins == 0 and self.n_projections == (0, 0)


@dataclass
class BatchSteering:
    """Steering of every row of a batch, on the hookpoint's device; applied by the hook."""

    rows: int
    nudge: torch.Tensor | None  # (B, 1, d_in) hidden dtype
    pin_enc: torch.Tensor | None  # (B, d_in, P) float32
    pin_bias: torch.Tensor | None  # (B, 1, P)
    pin_value: torch.Tensor | None  # (B, 1, P)
    pin_threshold: torch.Tensor | None  # (B, 1, P)
    pin_dec: torch.Tensor | None  # (B, P, d_in)
    projections: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None
    """("orthogonal", dirs (B, d_in), gains (B,)) and ("cap", dirs, caps) steps, applied in order;
    a row with fewer steps has identity ones (gain 0, cap +inf, zero direction)."""
    positions: torch.Tensor | None = None
    """(B, W) bool: which of the first W columns of a full pass (the left-padded prompts) are
    steered; columns past W and decoding steps always are. None: every position."""

    @classmethod
    def build(
        cls,
        rows: Sequence[RowSteering],
        device: torch.device,
        dtype: torch.dtype,
        positions: torch.Tensor | None = None,
    ) -> BatchSteering | None:
        """Stack per-row specs; None when no row is steered (the hook then does nothing).
        ``positions``: see the field (``scope_positions`` makes it)."""
        if all(row.is_empty for row in rows):
            return None
        steering = cls._stack(rows, device, dtype)
        steering.projections = _stack_projections(rows, device)
        steering.positions = positions
        return steering

    @classmethod
    def _stack(cls, rows: Sequence[RowSteering], device: torch.device, dtype: torch.dtype) -> BatchSteering:
        d_in = next(_row_width(row) for row in rows if not row.is_empty)
        nudge = None
        if any(row.nudge is not None for row in rows):
            nudge = torch.stack(
                [
                    row.nudge.to(device) if row.nudge is not None else torch.zeros(d_in, device=device)
                    for row in rows
                ]
            )
            nudge = nudge.to(dtype).unsqueeze(1)
        width = max(row.n_pins for row in rows)
        if width == 0:
            return cls(len(rows), nudge, None, None, None, None, None)
        enc = torch.zeros(len(rows), d_in, width, device=device)
        dec = torch.zeros(len(rows), width, d_in, device=device)
        bias, value, threshold = (torch.zeros(len(rows), 1, width, device=device) for _ in range(3))
        for r, row in enumerate(rows):
            p = row.n_pins
            if p:  # padded pins are all zero: pre = 0, so their residual is 0
                enc[r, :, :p] = row.pin_enc.to(device)
                dec[r, :p] = row.pin_dec.to(device)
                bias[r, 0, :p] = row.pin_bias.to(device)
                value[r, 0, :p] = row.pin_value.to(device)
                threshold[r, 0, :p] = row.pin_threshold.to(device)
        return cls(len(rows), nudge, enc, bias, value, threshold, dec)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, seq, d_in) → steered (B, seq, d_in); every row with its own vector."""
        if hidden.shape[0] != self.rows:
            raise RuntimeError(
                f"steering was prepared for {self.rows} rows but the hookpoint saw a batch of {hidden.shape[0]}"
            )
        steered = self._steer(hidden)
        if self.positions is None or hidden.shape[1] == 1:  # a decoding step writes the reply
            return steered
        width = min(hidden.shape[1], self.positions.shape[1])
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        keep[:, :width] = self.positions[:, :width].to(hidden.device)
        return torch.where(keep[..., None], steered, hidden)

    def _steer(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.nudge is not None:
            if self.nudge.device != hidden.device:
                self.nudge = self.nudge.to(hidden.device)
            hidden = hidden + self.nudge
        if self.projections:
            hidden = self._project(hidden)
        if self.pin_enc is None:
            return hidden
        self._move_pins(hidden.device)
        x = hidden.float()
        pre = torch.baddbmm(self.pin_bias, x, self.pin_enc)  # (B, seq, P)
        active = pre * (pre > self.pin_threshold)
        residual = torch.where(self.pin_value > 0, self.pin_value - pre, -active)
        return (x + torch.bmm(residual, self.pin_dec)).to(hidden.dtype)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        for kind, directions, amounts in self.projections:
            directions, amounts = directions.to(x.device), amounts.to(x.device)
            along = torch.einsum("bsd,bd->bs", x, directions)  # (B, seq) projection on the unit direction
            change = (
                amounts[:, None] * along
                if kind == "orthogonal"
                else along.clamp(max=amounts[:, None]) - along
            )
            x = x + change[..., None] * directions[:, None, :]
        return x.to(hidden.dtype)

    def _move_pins(self, device: torch.device) -> None:
        if self.pin_enc.device == device:
            return
        for name in ("pin_enc", "pin_bias", "pin_value", "pin_threshold", "pin_dec"):
            setattr(self, name, getattr(self, name).to(device))


def scope_positions(
    padded_ids: torch.Tensor, mask: torch.Tensor, scopes: Sequence[SteeringScope], special_ids: Sequence[int]
) -> torch.Tensor | None:
    """(B, W) bool of the prompt columns each row's scope steers, for left-padded prompts
    (``padded_ids``, ``mask`` as ``left_pad`` makes them); None when every row steers everything.
    The last column (the token that writes the first reply token) is always steered."""
    if all(scope.prompt and scope.special_tokens for scope in scopes):
        return None
    special = torch.isin(padded_ids, torch.as_tensor(list(special_ids), dtype=padded_ids.dtype))
    rows = []
    for r, scope in enumerate(scopes):
        row = mask[r].bool() if scope.prompt else torch.zeros_like(special[r])
        if not scope.special_tokens:
            row &= ~special[r]
        row[-1] = True
        rows.append(row)
    return torch.stack(rows)


def _row_width(row: RowSteering) -> int:
    for tensor in (row.nudge, row.pin_dec, row.ortho_dir, row.cap_dir):
        if tensor is not None:
            return int(tensor.shape[-1])
    raise ValueError("an empty row has no width")


def _stack_projections(rows: Sequence[RowSteering], device: torch.device) -> list | None:
    """The batch's orthogonal and cap steps, padded with identity steps per row."""
    n_ortho = max(row.n_projections[0] for row in rows)
    n_cap = max(row.n_projections[1] for row in rows)
    if n_ortho == n_cap == 0:
        return None
    d_in = next(_row_width(row) for row in rows if not row.is_empty)
    steps = []
    for kind, count, dirs_of, amount_of, identity in (
        ("orthogonal", n_ortho, lambda r: r.ortho_dir, lambda r: r.ortho_gain, 0.0),
        ("cap", n_cap, lambda r: r.cap_dir, lambda r: r.cap_max, float("inf")),
    ):
        for k in range(count):
            directions = torch.zeros(len(rows), d_in, device=device)
            amounts = torch.full((len(rows),), identity, device=device)
            for r, row in enumerate(rows):
                if dirs_of(row) is not None and k < dirs_of(row).shape[0]:
                    directions[r] = dirs_of(row)[k].to(device)
                    amounts[r] = amount_of(row)[k].to(device)
            steps.append((kind, directions, amounts))
    return steps


def steer_output(output: Any, steering: BatchSteering) -> Any:
    """Apply steering to a decoder layer's output (a tensor, or a tuple holding the hidden state)."""
    return with_hidden(output, steering.apply(hidden_of(output)))


def effective_scales(max_act: Any, d_sae: int) -> tuple[torch.Tensor, float]:
    """Per-feature scale (max activation) with a fallback for dead / zero / non-finite entries:
    the median of the valid scales (1.0 when none is valid). Returns (scales, fallback)."""
    scales = torch.as_tensor(max_act, dtype=torch.float32).flatten().cpu()
    if scales.shape[0] != d_sae:
        raise SteeringError(
            f"feature_scale has {scales.shape[0]} entries but the SAE has {d_sae} features; pass the "
            "bundle's max_act column for this SAE."
        )
    valid = torch.isfinite(scales) & (scales > 0)
    fallback = float(scales[valid].median()) if valid.any() else 1.0
    return torch.where(valid, scales, torch.tensor(fallback)), fallback


def row_steering(
    sae: SparseAutoencoder, scales: torch.Tensor, edits: Sequence[Edit], multiplier: float = 1.0
) -> RowSteering:
    """One row's nudge vector and pin solve (the edits must be valid; ``scales``: per-feature max
    activation, see ``effective_scales``)."""
    nudges = [e for e in edits if e.mode == "nudge" and e.strength != 0]
    pins = [e for e in edits if e.mode == "pin"]
    orthogonal = [e for e in edits if e.mode == "orthogonal" and e.strength * multiplier != 1]
    caps = [e for e in edits if e.mode == "cap"]
    steering = RowSteering()
    with torch.no_grad():
        if nudges:
            steering.nudge = _nudge_vector(sae, scales, nudges, multiplier)
        if pins:
            _pin_solve(sae, scales, steering, pins, multiplier)
        if orthogonal:
            steering.ortho_dir = _unit_directions(sae, orthogonal)
            steering.ortho_gain = torch.tensor([e.strength * multiplier - 1 for e in orthogonal]).to(
                steering.ortho_dir.device
            )
        if caps:
            steering.cap_dir = _unit_directions(sae, caps)
            ids = torch.tensor([e.feature for e in caps])
            norms = sae.W_dec.detach()[ids.to(sae.W_dec.device)].float().norm(dim=1)
            amounts = torch.tensor([e.strength for e in caps]) * multiplier * scales[ids]
            steering.cap_max = amounts.to(norms.device) * norms
    return steering


def _unit_directions(sae: SparseAutoencoder, edits: Sequence[Edit]) -> torch.Tensor:
    ids = torch.tensor([e.feature for e in edits], device=sae.W_dec.device)
    rows = sae.W_dec.detach()[ids].float()
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _nudge_vector(
    sae: SparseAutoencoder, scales: torch.Tensor, nudges: Sequence[Edit], multiplier: float
) -> torch.Tensor:
    ids = torch.tensor([e.feature for e in nudges])
    amounts = torch.tensor([e.strength for e in nudges]) * multiplier * scales[ids]
    directions = sae.W_dec.detach()[ids.to(sae.W_dec.device)].float()  # (n, d_in)
    return amounts.to(directions.device) @ directions


def _pin_solve(
    sae: SparseAutoencoder,
    scales: torch.Tensor,
    steering: RowSteering,
    pins: Sequence[Edit],
    multiplier: float,
) -> None:
    ids = torch.tensor([e.feature for e in pins], device=sae.W_enc.device)
    enc = sae.W_enc.detach()[:, ids].float()  # (d_in, P)
    dec = sae.W_dec.detach()[ids].float()  # (P, d_in)
    bias = sae.b_enc.detach()[ids].float()
    if sae.cfg.apply_b_dec_to_input:
        bias = bias - sae.b_dec.detach().float() @ enc
    # pre_P(x + c·dec) = pre_P(x) + c·(dec @ enc): solve for c jointly; pinv keeps near-parallel
    # pins (contradictory targets) bounded with a least-squares answer.
    coupling = dec @ enc  # (P, P)
    steering.pin_dec = torch.linalg.pinv(coupling, rtol=1e-5) @ dec
    steering.pin_enc, steering.pin_bias = enc, bias
    values = torch.tensor([e.strength for e in pins]) * multiplier * scales[ids.cpu()]
    steering.pin_value = values.to(enc.device)
    threshold = sae.threshold[ids].float() if sae.cfg.activation == "jumprelu" else torch.zeros_like(bias)
    steering.pin_threshold = threshold.clamp(min=0)


def hidden_mask(hidden: Any, d_sae: int) -> torch.Tensor:
    """Bool mask (d_sae,) of the features requests may not steer, from feature ids or from a bool
    mask of length d_sae."""
    if isinstance(hidden, torch.Tensor) or hasattr(hidden, "dtype"):
        values = torch.as_tensor(hidden)
        if values.dtype == torch.bool:
            if values.shape != (d_sae,):
                raise SteeringError(f"hidden mask has shape {tuple(values.shape)}; expected ({d_sae},).")
            return values.cpu()
        hidden = values.flatten().tolist()
    mask = torch.zeros(d_sae, dtype=torch.bool)
    ids = [int(i) for i in hidden]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise SteeringError(f"hidden features {bad[:5]} are out of range 0 to {d_sae - 1}.")
    mask[ids] = True
    return mask
