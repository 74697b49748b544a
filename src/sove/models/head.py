"""SOVE's shared projection head (docs/method.md, "Networks"): one MLP applied to every token, no prototypes."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear(D, hidden) - GELU - Linear(hidden, hidden) - GELU - Linear(hidden, out), L2-normalised.

    Shared by [CLS] and patch tokens. No BatchNorm and no prototype/last layer: SOVE's concepts
    come from the feature sets instead. Weights trunc-normal(std 0.02), biases zero.

    Args:
        in_dim: backbone width D.
        hidden_dim: hidden width (2048 in the paper).
        out_dim: output width d (256 in the paper), the feature-set dimension.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project tokens of shape (..., in_dim) to unit vectors of shape (..., out_dim) (eps 1e-6)."""
        return nn.functional.normalize(self.mlp(x), dim=-1, eps=1e-6)
