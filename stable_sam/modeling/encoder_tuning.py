"""LoRA and AdaptFormer adapters in the FFN of every ViT block: the baselines of the supplement.

Both change the image encoder, so their image embeddings can never be cached: a model with any
of them reports ``encoder_is_frozen = False`` and the predictor and evaluation bypass the
embedding cache.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import Tensor, nn

__all__ = ["FfnAdapter", "LoRALinear", "attach_adapters", "attach_lora"]


class LoRALinear(nn.Module):
    """y = W x + b + (x Aᵀ) Bᵀ with rank-r A, B; B = 0 at init, so the layer starts as W."""

    def __init__(self, *, base: nn.Linear, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {rank}")
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """x: ... x in_features -> ... x out_features."""
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


class FfnAdapter(nn.Module):
    """AdaptFormer: a bottleneck Linear(C→d) → GELU → Linear(d→C) in parallel to the FFN.

    The up-projection starts at zero, so the block starts as the original FFN.
    """

    def __init__(self, *, mlp: MLPBlock, bottleneck: int) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter_dim must be >= 1, got {bottleneck}")
        dim = mlp.lin1.in_features
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C (the FFN input after norm2) -> same shape."""
        return self.mlp(x) + self.up(self.act(self.down(x)))


def attach_lora(encoder: ImageEncoderViT, *, rank: int) -> int:
    """Wrap both FFN linears of every ViT block with LoRA; returns the number of new parameters."""
    added = 0
    for block in encoder.blocks:
        for name in ("lin1", "lin2"):
            wrapped = LoRALinear(base=getattr(block.mlp, name), rank=rank)
            setattr(block.mlp, name, wrapped)
            added += wrapped.lora_a.numel() + wrapped.lora_b.numel()
    return added


def attach_adapters(encoder: ImageEncoderViT, *, bottleneck: int) -> int:
    """Put an AdaptFormer adapter beside the FFN of every ViT block; returns the new parameter count."""
    added = 0
    for block in encoder.blocks:
        adapter = FfnAdapter(mlp=block.mlp, bottleneck=bottleneck)
        block.mlp = adapter
        added += sum(p.numel() for n, p in adapter.named_parameters() if not n.startswith("mlp."))
    return added
