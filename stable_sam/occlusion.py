"""Occlusion image synthesis (Stable-SAM supplement, "Occlusion Image Synthesis"; method spec 3.3).

Given a training image with its objects, another image and one of *its* objects (the
occluder), paste the occluder (random scale jitter and horizontal flip) so that its centre lies
inside the bounding box of the occludee, then update the masks: partially occluded objects keep
their visible part (``gt & ~occluder``), fully occluded ones are dropped.

Open choices (method spec, open choice 16), all in :class:`stable_sam.config.OcclusionConfig`:
the occluder's box longest side is ``U(occluder_min_scale, occluder_max_scale)`` times the
occludee box's longest side; the centre is uniform inside the occludee box; an object whose
visible area falls below ``min_visible_fraction`` of its original area counts as fully
occluded; if that would happen to the occludee itself, or if the occluder misses it entirely
(a thin occluder beside a thin occludee), the centre is redrawn (up to ``max_tries``), else the
synthesis gives up (``None``).

Pure array functions: every random choice comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import box_from_mask
from .config import OcclusionConfig

__all__ = ["OccluderPlacement", "OcclusionResult", "synthesize_occlusion"]


@dataclass(frozen=True)
class OccluderPlacement:
    """Where and how the occluder was pasted (all in target-image pixels).

    Attributes:
      centre_x, centre_y: the occluder box centre (inside the occludee box).
      scale: occluder box longest side / occludee box longest side.
      flip: whether the occluder was flipped horizontally.
      width, height: size of the resized occluder box.
      tries: placements drawn until this one (1 = first).
    """

    centre_x: float
    centre_y: float
    scale: float
    flip: bool
    width: int
    height: int
    tries: int

    def to_dict(self) -> dict:
        return {
            "centre_x": round(self.centre_x, 3),
            "centre_y": round(self.centre_y, 3),
            "scale": round(self.scale, 5),
            "flip": self.flip,
            "width": self.width,
            "height": self.height,
            "tries": self.tries,
        }


@dataclass
class OcclusionResult:
    """The synthesised image and its updated annotations.

    Attributes:
      image: uint8 H x W x 3, the target image with the occluder pasted.
      masks: bool H x W per kept object, in the original order (dropped ones removed).
      kept: indices (into the input ``masks``) of the kept objects, aligned with ``masks``.
      dropped: indices of the objects dropped as fully occluded (never the target).
      target: the position of the occludee in ``masks``.
      occluder_mask: bool H x W, the pasted occluder's pixels (clipped to the image).
      placement: the :class:`OccluderPlacement`.
      visible_fraction: visible area of the occludee / its original area.
    """

    image: np.ndarray
    masks: list[np.ndarray]
    kept: list[int]
    dropped: list[int]
    target: int
    occluder_mask: np.ndarray
    placement: OccluderPlacement
    visible_fraction: float


def _resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resize (align_corners=False) of an H x W x 3 crop and its mask (then > 0.5)."""
    stacked = np.concatenate([image.astype(np.float32), mask[..., None].astype(np.float32) * 255], axis=2)
    tensor = torch.from_numpy(stacked).permute(2, 0, 1)[None]
    antialias = size[0] < image.shape[0] or size[1] < image.shape[1]  # shrinking: avoid aliasing
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]
    out = out.permute(1, 2, 0).numpy()
    return np.clip(out[..., :3] + 0.5, 0, 255).astype(np.uint8), out[..., 3] > 127.5


def synthesize_occlusion(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    occluder_image: np.ndarray,
    occluder_mask: np.ndarray,
    *,
    target: int,
    generator: np.random.Generator,
    config: OcclusionConfig,
) -> OcclusionResult | None:
    """Paste an occluder over object ``target`` of ``image``.

    Args:
      image: uint8 H x W x 3, the training image.
      masks: bool H x W per object of the training image; ``masks[target]`` is the occludee.
      occluder_image: uint8 h x w x 3, the image the occluder comes from (any size).
      occluder_mask: bool h x w, the occluder object in ``occluder_image``.
      target: index of the occludee in ``masks``.
      generator: draws flip, scale and centre (in that order, then centres again on retries).
      config: scales, visibility threshold and tries.

    Returns:
      An :class:`OcclusionResult`, or None when the occludee or the occluder is empty or no
      placement tried occludes the occludee partially (some but not too much of it).
    """
    if not 0 <= target < len(masks):
        raise IndexError(f"target {target} out of range for {len(masks)} masks")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 H x W x 3, got {image.dtype} {image.shape}")
    if occluder_image.shape[:2] != occluder_mask.shape:
        raise ValueError(f"occluder image {occluder_image.shape[:2]} and mask {occluder_mask.shape} differ")
    height, width = image.shape[:2]
    for i, m in enumerate(masks):
        if m.shape != (height, width):
            raise ValueError(f"mask {i} has shape {m.shape}, image is {(height, width)}")
    if not masks[target].any() or not occluder_mask.any():
        return None
    target_box = box_from_mask(masks[target]).astype(int).tolist()
    source_box = box_from_mask(occluder_mask).astype(int).tolist()

    # The occluder, cropped to its box, flipped, and scaled against the occludee box.
    sx0, sy0, sx1, sy1 = source_box
    crop_image = occluder_image[sy0 : sy1 + 1, sx0 : sx1 + 1]
    crop_mask = occluder_mask[sy0 : sy1 + 1, sx0 : sx1 + 1]
    flip = bool(generator.random() < 0.5)
    if flip:
        crop_image, crop_mask = crop_image[:, ::-1], crop_mask[:, ::-1]
    scale = float(generator.uniform(config.occluder_min_scale, config.occluder_max_scale))
    tx0, ty0, tx1, ty1 = target_box
    target_long = max(tx1 - tx0 + 1, ty1 - ty0 + 1)
    factor = scale * target_long / max(crop_mask.shape)
    occ_h = max(1, round(crop_mask.shape[0] * factor))
    occ_w = max(1, round(crop_mask.shape[1] * factor))
    occ_image, occ_mask = _resize(
        np.ascontiguousarray(crop_image), np.ascontiguousarray(crop_mask), (occ_h, occ_w)
    )
    if not occ_mask.any():
        return None

    original_areas = [int(m.sum()) for m in masks]
    for tries in range(1, max(1, config.max_tries) + 1):
        # Continuous centre, uniform over the occludee box (pixel centres span [x0, x1 + 1)).
        cx = float(generator.uniform(tx0, tx1 + 1))
        cy = float(generator.uniform(ty0, ty1 + 1))
        left, top = round(cx - occ_w / 2), round(cy - occ_h / 2)
        # Clip the paste to the image border.
        x0, y0 = max(0, left), max(0, top)
        x1, y1 = min(width, left + occ_w), min(height, top + occ_h)
        if x0 >= x1 or y0 >= y1:
            continue
        pasted = np.zeros((height, width), bool)
        pasted[y0:y1, x0:x1] = occ_mask[y0 - top : y1 - top, x0 - left : x1 - left]
        visible = int((masks[target] & ~pasted).sum())
        fraction = visible / original_areas[target]
        # Redraw when the occludee would vanish, or when a thin or small occluder misses it.
        if fraction < config.min_visible_fraction or visible == 0 or visible == original_areas[target]:
            continue
        new_image = image.copy()
        new_image[y0:y1, x0:x1] = np.where(
            pasted[y0:y1, x0:x1, None],
            occ_image[y0 - top : y1 - top, x0 - left : x1 - left],
            image[y0:y1, x0:x1],
        )
        kept, dropped, new_masks = [], [], []
        for i, m in enumerate(masks):
            updated = m & ~pasted
            area = int(updated.sum())
            if i != target and (area == 0 or area < config.min_visible_fraction * original_areas[i]):
                dropped.append(i)
                continue
            kept.append(i)
            new_masks.append(updated)
        return OcclusionResult(
            image=new_image,
            masks=new_masks,
            kept=kept,
            dropped=dropped,
            target=kept.index(target),
            occluder_mask=pasted,
            placement=OccluderPlacement(cx, cy, scale, flip, occ_w, occ_h, tries),
            visible_fraction=fraction,
        )
    return None
