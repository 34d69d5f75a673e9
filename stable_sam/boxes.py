"""Boxes of masks, box IoU, and HQ-SAM's noisy boxes (DN-DETR box noise with an IoU floor).

Conventions: see :mod:`stable_sam.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import as_bool_mask

__all__ = ["EmptyMaskError", "NoisyBoxError", "box_from_mask", "box_iou", "noisy_box"]


class EmptyMaskError(ValueError):
    """The mask has no foreground pixel, so no prompt can be derived from it."""


class NoisyBoxError(RuntimeError):
    """No noisy box within the IoU window was drawn in the allowed number of tries."""


def check_box(box: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(box)):
        raise ValueError(f"{name} must be finite, got {box.tolist()}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{name} must be xyxy with x0 <= x1 and y0 <= y1, got {box.tolist()}")


def check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"{name} must be two positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box of a mask's foreground, HQ-SAM's ``masks_to_boxes``.

    Arguments:
      mask (np.ndarray): H x W binary mask.

    Returns:
      (np.ndarray): 4 float32 xyxy pixel indices, max inclusive (a 1-pixel object gives x0 == x1).

    Raises:
      EmptyMaskError: the mask has no foreground (HQ-SAM would return a garbage 1e8 box here).
    """
    mask = as_bool_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise EmptyMaskError(f"cannot take the box of an empty mask (shape {mask.shape})")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes, with width = x1 - x0 (torchvision / HQ-SAM convention).

    Boxes are segments between pixel centres, so a 1-pixel-wide object's box has zero width. An axis
    on which BOTH boxes have zero extent is left out of the IoU (it counts 1 if their coordinates on
    it coincide, else 0), so degenerate boxes compare as segments or points: a box always has IoU 1
    with itself. A flipped side (x1 < x0) counts as zero extent.

    Arguments:
      a, b (np.ndarray): 4 xyxy coordinates each.

    Returns:
      (float): IoU in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != (4,) or b.shape != (4,):
        raise ValueError(f"box_iou expects two boxes of shape (4,), got {a.shape} and {b.shape}")
    inter, area_a, area_b = 1.0, 1.0, 1.0
    for lo, hi in ((0, 2), (1, 3)):
        len_a = max(a[hi] - a[lo], 0.0)
        len_b = max(b[hi] - b[lo], 0.0)
        if len_a == 0.0 and len_b == 0.0:
            inter *= float(a[lo] == b[lo])
            continue
        inter *= max(min(a[hi], b[hi]) - max(a[lo], b[lo]), 0.0)
        area_a *= len_a
        area_b *= len_b
    union = area_a + area_b - inter
    return float(inter / union) if union > 0.0 else 0.0


def _jitter_box(box: np.ndarray, u: np.ndarray, noise_scale: float) -> np.ndarray:
    """DN-DETR / HQ-SAM ``box_noise`` for one box and a given draw u in [-1, 1]^4 (no clamping).

    (cx, cy, w, h) += u * (w / 2, h / 2, w, h) * noise_scale, then back to xyxy. So the centre moves
    by at most noise_scale * w / 2 and the size changes by at most noise_scale * w (likewise for h).

    Arguments:
      box (np.ndarray): 4 xyxy.
      u (np.ndarray): 4 values in [-1, 1], in the order (cx, cy, w, h).
      noise_scale (float): the DN-DETR box noise scale.

    Returns:
      (np.ndarray): 4 float64 xyxy.
    """
    box = np.asarray(box, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    w, h = box[2] - box[0], box[3] - box[1]
    cxcywh = np.array([box[0] + w / 2, box[1] + h / 2, w, h])
    cxcywh = cxcywh + u * np.array([w / 2, h / 2, w, h]) * noise_scale
    cx, cy, w, h = cxcywh
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _reference_extent(lo: float, hi: float, limit: int) -> tuple[float, float]:
    """Widen a zero-width extent to one pixel (pixel-centre to pixel-centre), kept inside [0, limit - 1]."""
    width = min(1.0, float(limit - 1))
    if hi - lo >= width:
        return lo, hi
    centre = (lo + hi) / 2
    lo = float(np.clip(centre - width / 2, 0.0, limit - 1 - width))
    return lo, lo + width


def noisy_box(
    box: np.ndarray,
    *,
    image_size: tuple[int, int],
    generator: np.random.Generator,
    noise_scale: float = 0.4,
    min_iou: float = 0.5,
    max_iou: float = 1.0,
    max_tries: int = 100,
) -> np.ndarray:
    """A noisy version of a box: HQ-SAM's ``box_noise`` redrawn until min_iou <= IoU(noisy, box) <= max_iou.

    Each try draws u ~ U(-1, 1)^4 from ``generator``, applies ``_jitter_box`` and clamps the result to
    the image ([0, W - 1] x [0, H - 1], the range of an inclusive box). The IoU (``box_iou``) is that
    of the clamped box, i.e. of the prompt actually fed to SAM. ``max_iou`` < 1 gives the COCO
    "N-Box (0.5-0.6)" protocol.

    Degenerate boxes: a side shorter than one pixel (a 1-pixel-wide object has x0 == x1) is first
    widened to one pixel around its centre (shifted to stay inside the image), and that widened box is
    both jittered and used as the IoU reference. Without it the noise would be zero (it is relative to
    w) and the IoU 0/0. Boxes of at least one pixel per side are used exactly as given. Draws with a
    flipped side (possible only for noise_scale >= 1) are rejected.

    Arguments:
      box (np.ndarray): 4 xyxy, inclusive max index.
      image_size (tuple(int, int)): (H, W) of the frame the box lives in.
      generator (np.random.Generator): the only source of randomness.
      noise_scale (float): DN-DETR box noise scale (0.4 in Stable-SAM).
      min_iou, max_iou (float): accepted IoU window with the (reference) box.
      max_tries (int): number of draws before giving up.

    Returns:
      (np.ndarray): 4 float32 xyxy inside the image.

    Raises:
      NoisyBoxError: no draw landed in the IoU window in ``max_tries`` tries.
    """
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,):
        raise ValueError(f"box must have shape (4,) (xyxy), got {box.shape}")
    check_box(box, "box")
    height, width = check_size(image_size, "image_size")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    if not 0.0 <= min_iou <= max_iou <= 1.0:
        raise ValueError(f"need 0 <= min_iou <= max_iou <= 1, got min_iou={min_iou}, max_iou={max_iou}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")

    x0, x1 = _reference_extent(box[0], box[2], width)
    y0, y1 = _reference_extent(box[1], box[3], height)
    reference = np.array([x0, y0, x1, y1])
    upper = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float64)
    for _ in range(max_tries):
        u = generator.uniform(-1.0, 1.0, size=4)
        candidate = _jitter_box(reference, u, noise_scale)
        if candidate[2] < candidate[0] or candidate[3] < candidate[1]:
            continue
        candidate = np.clip(candidate, 0.0, upper)
        if min_iou <= box_iou(candidate, reference) <= max_iou:
            return candidate.astype(np.float32)
    raise NoisyBoxError(
        f"no noisy box with IoU in [{min_iou}, {max_iou}] of box {box.tolist()} (image {height}x{width}) "
        f"in {max_tries} tries at noise_scale={noise_scale}"
    )
