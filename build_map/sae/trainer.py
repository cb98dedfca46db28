"""The TopK trainer's state and step (sparsify's recipe): parameters, Adam, the decoder
constraint, the AuxK loss and the dead-latent counter.

The one dense product, ``x @ W_enc`` for choosing the top k latents, runs in bfloat16 where that is
native; the rest of the step is sparse (``build_map.sae.kernels``).
"""

from __future__ import annotations

import torch

from build_map.common.devices import pick_dtype
from build_map.sae.kernels import GatheredPreActs, SparseDecode
from build_map.sae.model import SAEConfig, SparseAutoencoder
from build_map.sae.train_config import TrainConfig


class TopKTrainer:
    """Parameters in sparsify's layout (encoder rows = latents) plus the dead-latent counter."""

    def __init__(self, d_in: int, cfg: TrainConfig, device: torch.device, generator: torch.Generator):
        self.cfg = cfg
        self.device = device
        self.aux_k = cfg.aux_k or d_in // 2
        decoder = torch.randn(cfg.n_latents, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = decoder.to(device).requires_grad_()  # (n_latents, d_in), unit rows
        self.W_enc = decoder.detach().clone().requires_grad_()  # (n_latents, d_in) = SAE W_enc.T
        self.b_enc = torch.zeros(cfg.n_latents, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        # fused: one pass over each parameter instead of ~8 (4× faster on CPU, where Adam over the
        # 2 × n_latents × d_in weights otherwise costs as much as the rest of the step).
        self.optimizer = torch.optim.Adam(params, lr=cfg.learning_rate(), fused=True)
        self.select_dtype = pick_dtype(device, cfg.encoder_dtype)
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.tokens_seen = 0
        self.steps = 0
        self.running_fvu = 1.0

    def init_b_dec(self, sample: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample.to(self.device)))

    def step(self, x: torch.Tensor, lr: float) -> None:
        """One Adam step on x (batch, d_in), already scaled."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_c = x - self.b_dec  # (batch, d_in)
        with torch.no_grad():
            pre = self._pre_acts(x_c)  # (batch, n_latents), no autograd
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        acts = torch.relu(GatheredPreActs.apply(values.float(), indices, x_c, self.W_enc, self.b_enc))
        recon = SparseDecode.apply(acts, indices, self.W_dec) + self.b_dec
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = (recon - x).pow(2).sum() / total_variance
        loss = fvu + self.cfg.aux_coef * self._aux_loss(pre, x_c, (x - recon).detach(), total_variance)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._constrain_decoder()
        self._track_dead(indices, acts.detach(), len(x))
        self.running_fvu = (
            0.9 * self.running_fvu + 0.1 * float(fvu.detach()) if self.steps else float(fvu.detach())
        )
        self.steps += 1

    def _pre_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """(batch, n_latents) in select_dtype, for choosing latents; no autograd."""
        dtype = self.select_dtype
        return torch.addmm(
            self.b_enc.detach().to(dtype), x_c.detach().to(dtype), self.W_enc.detach().to(dtype).T
        )

    def _aux_loss(
        self, pre: torch.Tensor, x_c: torch.Tensor, residual: torch.Tensor, total_variance: torch.Tensor
    ) -> torch.Tensor:
        """Let the top dead latents reconstruct the residual the live ones left (sparsify's AuxK)."""
        dead = (self.since_fired >= self.cfg.dead_tokens).nonzero().squeeze(1)
        if len(dead) == 0 or self.cfg.aux_coef == 0:
            return torch.zeros((), device=self.device)
        k_aux = min(self.aux_k, len(dead))
        with torch.no_grad():
            values, local = pre[:, dead].topk(k_aux, dim=-1, sorted=False)
            indices = dead[local]
        acts = torch.relu(GatheredPreActs.apply(values.float(), indices, x_c, self.W_enc, self.b_enc))
        residual_hat = SparseDecode.apply(acts, indices, self.W_dec)
        # Fewer dead latents than aux_k → a smaller loss, as in the paper (Gao et al., App. B.1).
        scale = min(len(dead) / self.aux_k, 1.0)
        return scale * (residual_hat - residual).pow(2).sum() / total_variance

    @torch.no_grad()
    def _constrain_decoder(self) -> None:
        """Keep decoder rows unit norm: drop the gradient along each row, step, renormalise."""
        grad = self.W_dec.grad
        grad.addcmul_(self.W_dec, (grad * self.W_dec).sum(dim=1, keepdim=True), value=-1)
        self.optimizer.step()
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def _track_dead(self, indices: torch.Tensor, acts: torch.Tensor, n_tokens: int) -> None:
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[indices[acts > 0]] = True
        self.since_fired += n_tokens
        self.since_fired[fired] = 0
        self.tokens_seen += n_tokens

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_tokens).float().mean())

    def fired_recently(self) -> torch.Tensor:
        """Latents active in the last dead_tokens training tokens (all that fired, if fewer seen)."""
        return (self.since_fired < min(self.cfg.dead_tokens, self.tokens_seen)).cpu()

    @torch.no_grad()
    def to_sae(self, scale: float) -> SparseAutoencoder:
        """Fold the input scale back: pre-acts and activations scale by ``scale``, directions do not."""
        n_latents, d_in = self.W_dec.shape
        sae = SparseAutoencoder(
            SAEConfig(d_in=d_in, d_sae=n_latents, activation="topk", k=self.cfg.k, apply_b_dec_to_input=True)
        ).to(self.device)
        sae.W_enc.copy_(self.W_enc.T)
        sae.b_enc.copy_(self.b_enc * scale)
        sae.W_dec.copy_(self.W_dec)
        sae.b_dec.copy_(self.b_dec * scale)
        return sae.requires_grad_(False).eval()


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points`` (n, d)."""
    guess = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol * guess.norm().clamp_min(1.0):
            return new
        guess = new
    return guess
