"""The plug-in seam: a drop-in for one of SAM's token-to-image ``Attention`` modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from ..config import DRP_TOKENS, REPLACE_MODES
from .deformable_sampling import DeformableSamplingPlugin, SpatialAttentionPlugin
from .dynamic_routing import DynamicRoutingPlugin, FixedRouting

__all__ = ["OutputTokenReader", "PluggedTokenToImageAttention"]


class OutputTokenReader:
    """Recovers the DRP input token t_o from the attention query q = t + query_pe.

    In SAM's decoder the query PE of the output tokens (sequence positions 0..4) is the output
    token embedding itself (``iou_token`` + ``mask_tokens``), so t = q - PE there. The embeddings
    are read live from the decoder (not copied), so a fine-tuned decoder stays consistent. This is
    a plain object, not a module: the decoder's weights stay registered in one place only.
    """

    def __init__(self, decoder: MaskDecoder, token: str) -> None:
        if token not in DRP_TOKENS:
            raise ValueError(f"drp_token must be one of {DRP_TOKENS}, got {token!r}")
        self.decoder = decoder
        self.token = token

    def __call__(self, q: Tensor) -> Tensor:
        """q: B x N_tokens x C attention queries -> B x C output token."""
        pe = torch.cat([self.decoder.iou_token.weight, self.decoder.mask_tokens.weight], dim=0)
        outputs = q[:, : pe.shape[0]] - pe.unsqueeze(0)
        if self.token == "mask0":
            return outputs[:, 1]
        if self.token == "iou":
            return outputs[:, 0]
        return outputs.mean(dim=1)


class PluggedTokenToImageAttention(nn.Module):
    """SAM's token-to-image attention, reading plug-in-resampled image features.

    Same call as the wrapped :class:`Attention`: ``forward(q, k, v)`` with q = tokens + PE
    (B x N_t x C), v = image features x_p (B x HW x C) and k = v + image PE. The plug-in computes
    x = α1·x_def + α2·x_p and calls the original, frozen attention with k = x + PE, v = x. The PE
    stays on the regular grid unless ``resample_pe``. Everything else in SAM is untouched.

    Runtime switches (set by :class:`StableSam`): ``enabled`` (False = exact SAM) and
    ``alpha1_override`` (forces α = (a, 1 - a); 0 feeds SAM's attention exactly its own k and v
    values, so the output equals SAM's up to BLAS kernel choice: bit-identical on the small
    models, ~1e-6 on vit_b). The routing weights
    and offsets of the last call are kept in ``last_routing`` (B x 2) and ``last_offsets``.
    """

    def __init__(
        self,
        *,
        attention: Attention,
        sampler: DeformableSamplingPlugin | SpatialAttentionPlugin,
        router: DynamicRoutingPlugin | FixedRouting,
        token_reader: OutputTokenReader,
        feature_size: tuple[int, int],
        replace: str = "keys_values",
        resample_pe: bool = False,
    ) -> None:
        super().__init__()
        if replace not in REPLACE_MODES:
            raise ValueError(f"replace must be one of {REPLACE_MODES}, got {replace!r}")
        self.attention = attention
        self.sampler = sampler
        self.router = router
        self.feature_size = tuple(feature_size)
        self.replace = replace
        self.resample_pe = resample_pe
        # Not a submodule: see OutputTokenReader.
        self.token_reader = token_reader
        self.enabled = True
        self.alpha1_override: float | None = None
        self.last_routing: Tensor | None = None
        self.last_offsets: Tensor | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not self.enabled:
            self.last_routing, self.last_offsets = None, None
            return self.attention(q=q, k=k, v=v)
        b, n, c = v.shape
        h, w = self.feature_size
        if n != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} image tokens, got {n}")
        x_p = v.transpose(1, 2).reshape(b, c, h, w)
        sampled = self.sampler(x_p)
        if self.alpha1_override is None:
            alpha = self.router(self.token_reader(q))
        else:
            a1 = float(self.alpha1_override)
            alpha = torch.tensor([a1, 1.0 - a1], dtype=v.dtype, device=v.device).expand(b, 2)
        a1, a2 = alpha[:, 0, None, None], alpha[:, 1, None, None]
        x_def = sampled.features.flatten(2).transpose(1, 2)  # B x HW x C
        x_mix = a1 * x_def + a2 * v
        if self.resample_pe and sampled.grid is not None:
            pe = k - v
            pe_def = self._resample(pe, sampled.grid, b, c, h, w)
            k_new = x_mix + a1 * pe_def + a2 * pe
        else:
            # k + (x - v) == x + PE, written so that x == v (α1 = 0) leaves k bit-identical.
            k_new = k + (x_mix - v)
        v_new = x_mix if self.replace == "keys_values" else v
        self.last_routing = alpha.detach()
        self.last_offsets = None if sampled.offsets is None else sampled.offsets.detach()
        return self.attention(q=q, k=k_new, v=v_new)

    def _resample(self, seq: Tensor, grid: Tensor, b: int, c: int, h: int, w: int) -> Tensor:
        """Bilinearly resample a B x HW x C map at the plug-in's sampling grid ((B*G) x H x W x 2)."""
        groups = grid.shape[0] // b
        maps = seq.transpose(1, 2).reshape(b * groups, c // groups, h, w)
        out = F.grid_sample(
            maps, grid, mode="bilinear", padding_mode=self.sampler.padding_mode, align_corners=False
        )
        return out.reshape(b, c, h * w).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"feature_size={self.feature_size}, replace={self.replace}, resample_pe={self.resample_pe}, "
            f"drp_token={self.token_reader.token}"
        )
