"""Deformable sampling plugin (DSP) and its spatial-attention counterpart (supplement Table 9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from ..config import AMPLITUDES, INITS, PADDING_MODES

__all__ = ["DeformableSamplingPlugin", "SampledFeatures", "SpatialAttentionPlugin", "reference_grid"]


@dataclass
class SampledFeatures:
    """What a sampling plug-in hands to the routing step.

    Attributes:
      features: B x C x H x W, the resampled (deformed) amplitude features x*_{p+Δp}.
      offsets: B x G x H x W x 2 offsets Δp in feature pixels (x, y), or None (no offsets).
      grid: (B*G) x H x W x 2 normalised sampling locations for ``grid_sample``, or None.
    """

    features: Tensor
    offsets: Tensor | None
    grid: Tensor | None


def reference_grid(height: int, width: int, *, device=None, dtype=None) -> Tensor:
    """Feature-pixel centres p = (j + 0.5, i + 0.5) as an H x W x 2 (x, y) tensor."""
    ys = torch.arange(height, device=device, dtype=dtype) + 0.5
    xs = torch.arange(width, device=device, dtype=dtype) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


class _OffsetTrunk(nn.Module):
    """Amplitude 1x1 conv, then depthwise conv -> LayerNorm -> GELU -> 1x1 conv to ``out_channels``.

    This is the offset network of the figure (panel b), the DAT offset net with a k x k depthwise
    conv. Its first conv is the amplitude projection whose output x_p* is what gets sampled.
    """

    def __init__(
        self, *, embedding_dim: int, out_channels: int, kernel_size: int, bias: bool, init: str
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"offset_kernel must be odd so the grid stays aligned, got {kernel_size}")
        self.amplitude = nn.Conv2d(embedding_dim, embedding_dim, kernel_size=1)
        self.offset_net = nn.Sequential(
            nn.Conv2d(
                embedding_dim,
                embedding_dim,
                kernel_size=kernel_size,
                padding=kernel_size // 2,
                groups=embedding_dim,
            ),
            LayerNorm2d(embedding_dim),
            nn.GELU(),
            nn.Conv2d(embedding_dim, out_channels, kernel_size=1, bias=bias),
        )
        if init == "identity":
            # x_p* = x_p and a zero last layer: the plug-in starts as the identity, so
            # Stable-SAM equals SAM at step 0 whatever the routing weights are.
            with torch.no_grad():
                self.amplitude.weight.copy_(torch.eye(embedding_dim).view(embedding_dim, embedding_dim, 1, 1))
                self.amplitude.bias.zero_()
                last = self.offset_net[-1]
                last.weight.zero_()
                if last.bias is not None:
                    last.bias.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: B x C x H x W -> (amplitude features B x C x H x W, raw head output B x out x H x W)."""
        x_amp = self.amplitude(x)
        return x_amp, self.offset_net(x_amp)


class DeformableSamplingPlugin(nn.Module):
    """DSP: learns where (offsets) and how strongly (amplitudes) to sample the image features.

    Given the regular-grid features x_p (B x C x H x W), it computes the amplitude-adjusted
    features x_p* = Conv1x1(x_p), offsets Δp from x_p* (in feature pixels, bounded by
    ``offset_bound · tanh``), and returns x*_{p+Δp} by bilinear resampling. Channels are split into
    ``offset_groups`` groups with their own offsets (1 group = one offset per location shared by
    all attention heads, the paper's figure).
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        offset_bound: float | None = 8.0,
        offset_groups: int = 1,
        kernel_size: int = 5,
        offset_bias: bool = True,
        amplitude: str = "conv1x1",
        padding_mode: str = "border",
        init: str = "identity",
    ) -> None:
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if amplitude not in AMPLITUDES:
            raise ValueError(f"amplitude must be one of {AMPLITUDES}, got {amplitude!r}")
        if offset_groups < 1 or embedding_dim % offset_groups:
            raise ValueError(f"offset_groups={offset_groups} must divide the embedding dim {embedding_dim}")
        if offset_bound is not None and offset_bound <= 0:
            raise ValueError(f"offset_bound must be positive or None (unbounded), got {offset_bound}")
        self.offset_bound = offset_bound
        self.offset_groups = offset_groups
        self.padding_mode = padding_mode
        self.modulated = amplitude == "conv1x1_modulated"
        head_channels = offset_groups * (3 if self.modulated else 2)
        self.trunk = _OffsetTrunk(
            embedding_dim=embedding_dim,
            out_channels=head_channels,
            kernel_size=kernel_size,
            bias=offset_bias,
            init=init,
        )

    def forward(self, x: Tensor) -> SampledFeatures:
        """x: B x C x H x W regular-grid image features -> deformed features and their offsets."""
        b, c, h, w = x.shape
        g = self.offset_groups
        x_amp, head = self.trunk(x)
        raw = head[:, : 2 * g].view(b, g, 2, h, w).permute(0, 1, 3, 4, 2)  # B x G x H x W x 2
        offsets = raw if self.offset_bound is None else self.offset_bound * torch.tanh(raw)
        positions = reference_grid(h, w, device=x.device, dtype=x.dtype) + offsets
        # Pixel centres map exactly onto input pixels with align_corners=False, so Δp = 0 samples
        # x_p* itself.
        scale = torch.tensor([w, h], device=x.device, dtype=x.dtype)
        grid = (2.0 * positions / scale - 1.0).reshape(b * g, h, w, 2)
        sampled = F.grid_sample(
            x_amp.reshape(b * g, c // g, h, w),
            grid,
            mode="bilinear",
            padding_mode=self.padding_mode,
            align_corners=False,
        ).view(b, c, h, w)
        if self.modulated:
            # DCNv2-style per-location modulation; 2·sigmoid(0) = 1 keeps the identity at init.
            modulation = 2.0 * torch.sigmoid(head[:, 2 * g :])  # B x G x H x W
            sampled = (sampled.view(b, g, c // g, h, w) * modulation.unsqueeze(2)).view(b, c, h, w)
        return SampledFeatures(features=sampled, offsets=offsets, grid=grid)


class SpatialAttentionPlugin(nn.Module):
    """Spatial attention in place of DSP (supplement Table 9): re-weights, never moves, features.

    Same trunk as the DSP, but the head predicts one channel turned into a per-location weight
    map 2·sigmoid(·) on x_p* (1 at init, so the plug-in starts as the identity).
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        kernel_size: int = 5,
        offset_bias: bool = True,
        init: str = "identity",
    ) -> None:
        super().__init__()
        self.trunk = _OffsetTrunk(
            embedding_dim=embedding_dim, out_channels=1, kernel_size=kernel_size, bias=offset_bias, init=init
        )

    def forward(self, x: Tensor) -> SampledFeatures:
        """x: B x C x H x W -> re-weighted features (no offsets)."""
        x_amp, head = self.trunk(x)
        return SampledFeatures(features=x_amp * (2.0 * torch.sigmoid(head)), offsets=None, grid=None)
