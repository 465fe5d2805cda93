"""Layers shared by several methods: features mapped to a few tokens of a Transformer's embedding space."""
from __future__ import annotations

import torch
from torch import nn

from medhash.services.errors import ConfigError


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """Linear -> GELU -> Linear, ``hidden`` wide; one linear map when ``hidden`` is 0."""
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class TokenProjection(nn.Module):
    """Features [B, in] -> m tokens [B, m, d] at the scale ``token_scale`` per coordinate.

    With ``hidden`` > 0 the map is a two-layer MLP (Linear -> GELU -> Linear), else one linear map.
    """

    def __init__(self, in_dim: int, n_tokens: int, dim: int, token_scale: float, hidden: int = 0) -> None:
        super().__init__()
        self.n_tokens, self.dim, self.token_scale = n_tokens, dim, token_scale
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = mlp(in_dim, hidden, n_tokens * dim)
        self.position = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.norm_in(features)).view(len(features), self.n_tokens, self.dim)
        return self.norm_out(tokens + self.position) * self.token_scale


class StandardizedMLP(nn.Module):
    """v [B, d] -> MLP(BatchNorm(v)), the MLP two-layer and ``hidden`` wide (0: one linear map).

    The batch norm standardises each coordinate over the items (its running statistics at inference), which
    removes what every input shares and leaves what tells them apart: for an LLM's reading of a report pooled
    over the prompt after it, the prompt's own large, constant contribution. With several training workers each
    standardises over its own share of the batch (as data-parallel batch norm does without synchronisation), so
    there the step is close to, not exactly, the one-worker step, and each worker needs at least two rows.
    """

    def __init__(self, dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.mlp = mlp(dim, hidden, dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.training and len(v) < 2:
            raise ConfigError(f"a training batch of {len(v)} row(s) per worker cannot be standardised: "
                              "raise train.batch_size or lower train.workers (at least 2 rows per worker)")
        return self.mlp(self.norm(v))


class LinearToken(nn.Module):
    """The "structured encoding off" ablation: one plain linear map to a single token [B, 1, d]."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).unsqueeze(1)
