"""Gaussian-Bernoulli RBM whose hidden units are the hash bits (LSCH stage 4).

Energy, with Gaussian visible units v (V of them) and Bernoulli hidden units h (K bits):

    E(v, h) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - sum_j a_j h_j - sum_ij (v_i / sigma_i) W_ij h_j

so that p(h_j = 1 | v) = sigmoid(a_j + sum_i W_ij v_i / sigma_i) and
p(v | h) = N(b + sigma * (W h), diag(sigma^2)). Each sigma_i is learned through its log-variance
(sigma_i^2 = exp(log_var_i)), as in Cho et al. 2011 and Liao et al. 2022 ("Gaussian-Bernoulli RBMs
without tears"), which keeps it positive and makes its gradient scale-free. Pre-training is
CD-k from the data with Gibbs sampling; fine-tuning back-propagates code losses through
:meth:`GBRBM.hidden_probs`. Inputs should be standardised per unit (zero mean, unit variance),
the scale sigma is initialised for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOG_VAR_RANGE = (-9.0, 9.0)  # sigma in about [0.011, 90]: keeps CD from collapsing or exploding sigma
GRAD_CLIP_NORM = 10.0  # CD gradients are noisy; clipping their norm keeps pre-training stable


class GBRBM(nn.Module):
    """GBRBM with W [V, K], visible bias b [V], hidden bias a [K] and log-variance log_var [V]."""

    def __init__(self, n_visible: int, n_hidden: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.n_visible, self.n_hidden = n_visible, n_hidden
        self.W = nn.Parameter(torch.randn(n_visible, n_hidden) * init_std)
        self.b = nn.Parameter(torch.zeros(n_visible))
        self.a = nn.Parameter(torch.zeros(n_hidden))
        self.log_var = nn.Parameter(torch.zeros(n_visible))  # sigma = 1 for standardised inputs

    @property
    def sigma(self) -> torch.Tensor:
        """Per-unit visible standard deviation, [V]."""
        return torch.exp(0.5 * self.log_var.clamp(*LOG_VAR_RANGE))

    def hidden_logits(self, v: torch.Tensor) -> torch.Tensor:
        """a + (v / sigma) @ W, [B, K]."""
        return self.a + (v / self.sigma) @ self.W

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """p(h = 1 | v), [B, K]; differentiable, the path fine-tuning trains through."""
        return torch.sigmoid(self.hidden_logits(v))

    def sample_hidden(self, v: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(self.hidden_probs(v))

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h] = b + sigma * (h @ W.T), [B, V]."""
        return self.b + self.sigma * (h @ self.W.T)

    def sample_visible(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.visible_mean(h)
        return mean + self.sigma * torch.randn_like(mean)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log sum_h exp(-E(v, h)), [B]."""
        quadratic = ((v - self.b) ** 2 / (2 * self.sigma**2)).sum(dim=1)
        return quadratic - F.softplus(self.hidden_logits(v)).sum(dim=1)

    def cd_loss(self, v: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Scalar whose gradient is the CD-k estimate of -d log p(v) / d theta.

        The negative sample comes from k Gibbs steps started at the data, run without gradient;
        the visible state is sampled (not its mean), or sigma would learn a noise-free model.
        """
        with torch.no_grad():
            v_k = v
            for _ in range(k):
                v_k = self.sample_visible(self.sample_hidden(v_k))
        return self.free_energy(v).mean() - self.free_energy(v_k).mean()

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """Hash bits 1[p(h | v) > 0.5], bool [B, K]."""
        with torch.no_grad():
            return self.hidden_probs(v) > 0.5

    def reconstruction_error(self, v: torch.Tensor) -> float:
        """Mean squared error of the mean-field reconstruction E[v | p(h | v)], for monitoring."""
        with torch.no_grad():
            return F.mse_loss(self.visible_mean(self.hidden_probs(v)), v).item()


def pretrain_gbrbm(
    rbm: GBRBM, data: torch.Tensor, epochs: int, batch_size: int, lr: float, k: int = 1
) -> list[float]:
    """CD-k pre-training with Adam and clipped gradients; returns the reconstruction error of
    ``data`` after each epoch."""
    if data.ndim != 2 or data.shape[1] != rbm.n_visible:
        shape = tuple(data.shape)
        raise ValueError(f"GBRBM pre-training needs data of shape (N, {rbm.n_visible}), got {shape}")
    if not torch.isfinite(data).all():
        raise ValueError("GBRBM pre-training data contains NaN or infinite values")
    optimizer = torch.optim.Adam(rbm.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        for batch in data[torch.randperm(len(data))].split(batch_size):
            optimizer.zero_grad()
            rbm.cd_loss(batch, k).backward()
            nn.utils.clip_grad_norm_(rbm.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
        history.append(rbm.reconstruction_error(data))
    return history
