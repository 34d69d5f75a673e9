"""Dynamic routing plugin (DRP): how much of the deformed features each prompt gets."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ROUTING_NORMS

__all__ = ["DynamicRoutingPlugin", "FixedRouting"]


class DynamicRoutingPlugin(nn.Module):
    """α = norm(Linear(C→h) → LayerNorm(h) → GELU → Linear(h→2)) of one output token.

    α1 weighs the deformed features, α2 the regular-grid ones: x = α1·x_def + α2·x_p. With
    "softmax" α1 + α2 = 1 (forcing α1 = 0 reproduces SAM exactly, the paper's Table S8); with
    "sigmoid" the two weights are independent.
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        hidden_dim: int = 32,
        normalization: str = "softmax",
        init: str = "identity",
    ) -> None:
        super().__init__()
        if normalization not in ROUTING_NORMS:
            raise ValueError(f"routing_norm must be one of {ROUTING_NORMS}, got {normalization!r}")
        if hidden_dim < 1:
            raise ValueError(f"drp_hidden must be >= 1, got {hidden_dim}")
        self.normalization = normalization
        self.mlp = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 2),
        )
        if init == "identity":
            # Zero last layer: α starts at (0.5, 0.5) for every prompt.
            with torch.no_grad():
                self.mlp[-1].weight.zero_()
                self.mlp[-1].bias.zero_()

    def forward(self, token: Tensor) -> Tensor:
        """token: B x C output token -> α: B x 2 (α1 for deformed, α2 for regular features)."""
        logits = self.mlp(token)
        if self.normalization == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)


class FixedRouting(nn.Module):
    """No DRP: the same α = (α1, 1 - α1) for every prompt (the "DSP without DRP" ablation)."""

    def __init__(self, *, alpha1: float) -> None:
        super().__init__()
        if not 0.0 <= alpha1 <= 1.0:
            raise ValueError(f"fixed_alpha1 must lie in [0, 1], got {alpha1}")
        self.alpha1 = float(alpha1)

    def forward(self, token: Tensor) -> Tensor:
        """token: B x C (only its batch size, dtype and device are used) -> α: B x 2."""
        alpha = torch.tensor([self.alpha1, 1.0 - self.alpha1], dtype=token.dtype, device=token.device)
        return alpha.expand(token.shape[0], 2)

    def extra_repr(self) -> str:
        return f"alpha1={self.alpha1}"
