"""Autograd kernels of the TopK trainer that touch only the chosen latents.

Per token only k of n_latents latents are live, so everything except choosing them is sparse: the
backward passes below use sparse matmuls and ``embedding_bag``, never the full (batch, n_latents)
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatheredPreActs(torch.autograd.Function):
    """values = (x_c @ W_enc.T + b_enc) at ``indices``, already computed (no grad) by the dense
    selection matmul; the backward pass touches only the chosen latents."""

    @staticmethod
    def forward(ctx, values, indices, x_c, weight, bias):  # weight (n_latents, d_in)
        ctx.save_for_backward(indices, x_c, weight)
        ctx.n_latents = bias.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # grad (batch, m)
        indices, x_c, weight = ctx.saved_tensors
        grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        grad_weight = scatter_rows(indices, grad, x_c, ctx.n_latents)
        grad_bias = torch.zeros(ctx.n_latents, device=grad.device).index_add_(
            0, indices.flatten(), grad.flatten()
        )
        return None, None, grad_x, grad_weight, grad_bias


class SparseDecode(torch.autograd.Function):
    """sum_j acts[b, j] · W_dec[indices[b, j]] without a dense (batch, n_latents) matrix."""

    @staticmethod
    def forward(ctx, acts, indices, weight):  # acts (batch, m), weight (n_latents, d_in)
        ctx.save_for_backward(acts, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx, grad):  # grad (batch, d_in)
        acts, indices, weight = ctx.saved_tensors
        with torch.enable_grad():  # embedding_bag's own kernel for d/d(per_sample_weights)
            probe = acts.detach().requires_grad_()
            out = F.embedding_bag(indices, weight.detach(), per_sample_weights=probe, mode="sum")
            (grad_acts,) = torch.autograd.grad(out, probe, grad)
        grad_weight = scatter_rows(indices, acts, grad, weight.shape[0])
        return grad_acts, None, grad_weight


def scatter_rows(indices: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d): out[indices[b, j]] += coef[b, j] · rows[b], as one sparse × dense matmul."""
    batch, m = indices.shape
    token = torch.arange(batch, device=rows.device).repeat_interleave(m)
    sparse = torch.sparse_coo_tensor(
        torch.stack([indices.flatten(), token]), coef.flatten(), (n, batch), check_invariants=False
    )
    return torch.sparse.mm(sparse, rows)
