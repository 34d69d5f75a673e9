"""The image encoder's attention through ``scaled_dot_product_attention``: a fast path for a frozen SAM.

segment-anything's ViT ``Attention`` materialises the attention map with plain matmuls and adds
the decomposed relative positions (MViTv2) to it. :class:`FastAttention` computes the same thing
with ``torch.nn.functional.scaled_dot_product_attention`` (fused, and fast under bf16/fp16
autocast), the relative position term passed as its additive ``attn_mask``, the technique of
segment-anything-fast (whose custom Triton kernel, CUDA only, is not used here).

It holds the very parameters of the ``Attention`` it replaces, under the same names (``qkv``,
``proj``, ``rel_pos_h``, ``rel_pos_w``), so the encoder's ``state_dict`` is unchanged and SAM
checkpoints load into it as before. :func:`attach_fast_attention` swaps it into every block of ONE
encoder instance (nothing of segment-anything's classes changes), :func:`detach_fast_attention`
puts segment-anything's own ``Attention`` back, holding the same parameters again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import Tensor, nn

__all__ = ["FastAttention", "attach_fast_attention", "detach_fast_attention", "uses_fast_attention"]


class FastAttention(nn.Module):
    """Multi-head attention with decomposed relative positions, computed by SDPA.

    Arguments:
      qkv: the C -> 3C projection (segment-anything's ``Attention.qkv``).
      proj: the C -> C output projection.
      num_heads: number of heads (C divisible by it).
      rel_pos_h, rel_pos_w: (2 S - 1) x C/heads relative position embeddings of height and width
        (S the window or grid size they were trained for), or None without relative positions.
    """

    def __init__(
        self,
        *,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        rel_pos_h: nn.Parameter | None = None,
        rel_pos_w: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if (rel_pos_h is None) != (rel_pos_w is None):
            raise ValueError("rel_pos_h and rel_pos_w must be given together")
        if qkv.out_features != 3 * qkv.in_features or qkv.in_features % num_heads:
            raise ValueError(
                f"qkv maps {qkv.in_features} -> {qkv.out_features}: expected C -> 3C, C divisible by "
                f"num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.qkv = qkv
        self.proj = proj
        self.use_rel_pos = rel_pos_h is not None
        if self.use_rel_pos:
            self.rel_pos_h = rel_pos_h
            self.rel_pos_w = rel_pos_w

    @classmethod
    def from_attention(cls, attention: Attention) -> FastAttention:
        """The SDPA form of a segment-anything ``Attention``, sharing its parameters (no copy)."""
        if not isinstance(attention, Attention):
            raise TypeError(
                f"expected segment-anything's image-encoder Attention, got {type(attention).__name__}"
            )
        return cls(
            qkv=attention.qkv,
            proj=attention.proj,
            num_heads=attention.num_heads,
            rel_pos_h=attention.rel_pos_h if attention.use_rel_pos else None,
            rel_pos_w=attention.rel_pos_w if attention.use_rel_pos else None,
        )

    def to_attention(self) -> Attention:
        """segment-anything's ``Attention`` holding this module's parameters (the reverse swap)."""
        dim = self.qkv.in_features
        input_size = None
        if self.use_rel_pos:
            input_size = ((self.rel_pos_h.shape[0] + 1) // 2, (self.rel_pos_w.shape[0] + 1) // 2)
        with torch.device("meta"):  # its freshly initialised tensors are replaced just below
            attention = Attention(
                dim,
                num_heads=self.num_heads,
                qkv_bias=self.qkv.bias is not None,
                use_rel_pos=self.use_rel_pos,
                input_size=input_size,
            )
        attention.qkv, attention.proj = self.qkv, self.proj
        if self.use_rel_pos:
            attention.rel_pos_h, attention.rel_pos_w = self.rel_pos_h, self.rel_pos_w
        return attention.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        """x: B x H x W x C (a window or the whole grid) -> B x H x W x C."""
        b, h, w, _ = x.shape
        # B x N x 3 x heads x c -> 3 x B x heads x N x c: SDPA's layout, no copy.
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._rel_pos_bias(q, (h, w)) if self.use_rel_pos else None
        # SDPA's default scale is c^-0.5, Attention.scale.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # B x heads x N x c -> B x H x W x (heads c), the head-major channel order of Attention.
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def _rel_pos_bias(self, q: Tensor, size: tuple[int, int]) -> Tensor:
        """B x heads x N x N additive bias: rel_h[q, key row] + rel_w[q, key column] (MViTv2).

        The same terms as segment-anything's ``add_decomposed_rel_pos`` (from the unscaled q),
        laid out for SDPA. Contiguous factors make the broadcast sum contiguous, so the final
        reshape is a view (a strided sum would be copied once more: the largest tensor here).
        """
        b, heads, _, c = q.shape
        h, w = size
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # H x H x c
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # W x W x c
        grid_q = q.reshape(b, heads, h, w, c)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh).contiguous()
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw).contiguous()
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, use_rel_pos={self.use_rel_pos}, kernel=scaled_dot_product_attention"
        )


def attach_fast_attention(encoder: ImageEncoderViT) -> int:
    """Swap :class:`FastAttention` into every block of this encoder; returns how many were swapped."""
    swapped = 0
    for block in encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = FastAttention.from_attention(block.attn)
            swapped += 1
    return swapped


def detach_fast_attention(encoder: ImageEncoderViT) -> int:
    """Put segment-anything's ``Attention`` back into every block; returns how many were restored."""
    restored = 0
    for block in encoder.blocks:
        if isinstance(block.attn, FastAttention):
            block.attn = block.attn.to_attention()
            restored += 1
    return restored


def uses_fast_attention(encoder: ImageEncoderViT) -> bool:
    """Whether every block of the encoder runs :class:`FastAttention`."""
    return all(isinstance(block.attn, FastAttention) for block in encoder.blocks)
