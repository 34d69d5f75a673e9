"""Resize conventions (SAM's longest side, HQ-SAM's evaluation stretch) and HQ-SAM's training
augmentation (``RandomHFlip`` + ``LargeScaleJitter``) with explicit generators.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

__all__ = [
    "large_scale_jitter",
    "prepare_eval_image",
    "random_hflip",
    "resize_longest_side",
    "resize_mask_longest_side",
    "resize_mask_stretch",
    "resize_stretch",
]


def _interpolate(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False, no antialias) of H x W or H x W x C, as float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
    return (out[0] if array.ndim == 2 else out.permute(1, 2, 0)).numpy()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # HQ-SAM casts the resampled float image with .astype(np.uint8): truncation, not rounding.
    return np.clip(image, 0, 255).astype(np.uint8)


def resize_longest_side(image: np.ndarray, target_length: int) -> np.ndarray:
    """SAM's resize: longest side to ``target_length`` (``ResizeLongestSide.apply_image``).

    The model pads the result to a square itself. Returns uint8 H' x W' x 3.
    """
    return ResizeLongestSide(target_length).apply_image(image)


def resize_mask_longest_side(mask: np.ndarray, target_length: int, *, soft: bool = False) -> np.ndarray:
    """A mask brought to the frame of :func:`resize_longest_side` (bilinear, see resize_mask_stretch)."""
    h, w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], target_length)
    return _resize_mask(mask, (h, w), soft)


def resize_stretch(image: np.ndarray, size: int) -> np.ndarray:
    """HQ-SAM's evaluation resize: bilinear to size x size, aspect ratio not kept, no padding.

    Returns uint8 size x size x 3 (truncated like HQ-SAM).
    """
    return _to_uint8(_interpolate(image, (size, size)))


def _resize_mask(mask: np.ndarray, size: tuple[int, int], soft: bool) -> np.ndarray:
    # On the 0..255 scale then > 128, as HQ-SAM resizes the label and thresholds it.
    scaled = mask.astype(np.float32) * (255.0 if mask.dtype == bool or mask.max(initial=0) <= 1 else 1.0)
    out = _interpolate(scaled, size)
    return (out / 255.0).astype(np.float32) if soft else out > 128


def resize_mask_stretch(mask: np.ndarray, size: int, *, soft: bool = False) -> np.ndarray:
    """A mask (bool, or 0..255 / [0, 1] values) stretched to size x size.

    Bilinear on the 0..255 scale, then ``> 128`` (bool) or divided by 255 (``soft``: float32 in
    [0, 1]).
    """
    return _resize_mask(mask, (size, size), soft)


def prepare_eval_image(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    mode: Literal["longest_side", "stretch"],
    target_length: int = 1024,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Bring an evaluation image and its GT to the model's input frame.

    Args:
      image: uint8 H x W x 3.
      mask: bool H x W (the GT; prompts are drawn from its resized version, as HQ-SAM does).
      mode: "longest_side" (SamPredictor: longest side = target_length, the model pads) or
        "stretch" (HQ-SAM eval: target_length x target_length, no padding).
      target_length: the model's input size (1024 for SAM).

    Returns:
      (image uint8 h x w x 3, mask bool h x w, input_size (h, w)); metrics are computed back at
      the original H x W.
    """
    if mode == "longest_side":
        resized = resize_longest_side(image, target_length)
        return resized, resize_mask_longest_side(mask, target_length), resized.shape[:2]
    if mode == "stretch":
        return (
            resize_stretch(image, target_length),
            resize_mask_stretch(mask, target_length),
            (target_length, target_length),
        )
    raise ValueError(f"resize mode must be 'longest_side' or 'stretch', got {mode!r}")


def random_hflip(
    image: np.ndarray, mask: np.ndarray, *, generator: np.random.Generator, probability: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Flip image (H x W x C) and mask (H x W) left-right together with ``probability``."""
    if generator.random() < probability:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    return image, mask


def large_scale_jitter(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    generator: np.random.Generator,
    output_size: int,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """HQ-SAM's ``LargeScaleJitter`` (hqsam_pipeline.md 2.2).

    The longest side is resized to ``round(s * output_size)``, ``s ~ U(min_scale, max_scale)``
    (bilinear, align_corners=False, no antialias), a random crop of at most output_size² is
    taken, and the result is padded bottom/right to output_size² (image with 128, mask with 0).

    Args:
      image: uint8 H x W x 3.
      mask: bool or float H x W (bool is treated as {0, 1}; uint8 0..255 is scaled to [0, 1]).
      generator: draws the scale and the crop offsets.
      output_size: S.

    Returns:
      (image uint8 S x S x 3 (truncated like HQ-SAM), mask float32 S x S soft in [0, 1],
      valid_hw: the (h, w) of the content in the top-left corner before the padding).
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    h, w = mask.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    soft = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    scale = generator.uniform(min_scale, max_scale)
    long_side = round(scale * output_size)
    factor = long_side / max(h, w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    image_r = _interpolate(image, (new_h, new_w))
    mask_r = _interpolate(soft, (new_h, new_w))
    crop_h, crop_w = min(output_size, new_h), min(output_size, new_w)
    top = int(generator.integers(0, new_h - crop_h + 1))
    left = int(generator.integers(0, new_w - crop_w + 1))
    out_image = np.full((output_size, output_size, 3), 128, np.uint8)
    out_mask = np.zeros((output_size, output_size), np.float32)
    out_image[:crop_h, :crop_w] = _to_uint8(image_r[top : top + crop_h, left : left + crop_w])
    out_mask[:crop_h, :crop_w] = np.clip(mask_r[top : top + crop_h, left : left + crop_w], 0, 1)
    return out_image, out_mask, (crop_h, crop_w)
