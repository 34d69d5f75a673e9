"""Prompts for training and evaluation: boxes, noisy boxes, points, oracle clicks and coarse masks.

Everything here is a pure numpy function of a ground-truth mask and an explicit
``np.random.Generator``; nothing touches global RNG state, so the same seed gives the same prompts for
every model and every sweep.

Conventions (those of HQ-SAM's training code, which SAM's prompt encoder expects):
  * masks are H x W arrays, bool or numbers in {0, 1}, in the frame where the prompt is used;
  * coordinates are pixel indices (x = column, y = row); SAM's prompt encoder adds 0.5 itself;
  * boxes are float32 xyxy with an INCLUSIVE max index (``masks_to_boxes``): a 1-pixel object has
    x0 == x1. Geometrically a box is the segment between pixel centres, so its width is x1 - x0
    (the torchvision / HQ-SAM ``box_iou`` convention) and such a box has zero area.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .boxes import EmptyMaskError, box_from_mask, check_box, check_size, noisy_box
from .metrics import as_bool_mask

__all__ = [
    "COARSE_MASK_LOGIT",
    "TRAINING_PROMPT_TYPES",
    "NotEnoughPixelsError",
    "Prompt",
    "coarse_mask",
    "oracle_point",
    "random_points",
    "sample_prompt",
    "sample_training_prompt",
]


# Magnitude of the coarse-mask prompt for values="logits": sigmoid(20) = 1 - 2e-9, i.e. a confident
# low-res logit like those SAM itself feeds back in iterative prompting.
COARSE_MASK_LOGIT = 20.0


# HQ-SAM feeds the binary coarse mask as {0, 255} straight into SAM's mask input.
_HQSAM_MASK_VALUE = 255.0


# Mask Transfiner's "incoherent region" detector: down/up-sampling factor and residual threshold.
_INCOHERENT_FACTOR = 8


_INCOHERENT_THRESHOLD = 0.01


TRAINING_PROMPT_TYPES = ("gt_box", "noisy_box", "points", "coarse_mask")


_POINT_KIND = re.compile(r"point_([0-9]+)")


class NotEnoughPixelsError(ValueError):
    """The mask has fewer foreground pixels than the number of points asked for."""


@dataclass(frozen=True, eq=False)
class Prompt:
    """One prompt for one object, in the arguments' layout of ``SamPredictor.predict``.

    Arrays are normalised to the dtypes below; equality is identity (arrays do not compare as bools).

    Arguments:
      kind (str): what drew it, e.g. "gt_box", "noisy_box", "point_10", "coarse_mask", "oracle_point".
      point_coords (np.ndarray or None): N x 2 float32 pixel coordinates (x, y).
      point_labels (np.ndarray or None): N int64 labels, 1 = positive (foreground), 0 = negative.
      box (np.ndarray or None): 4 float32, xyxy with inclusive max index.
      mask_input (np.ndarray or None): h x w float32 low-res mask prompt (e.g. 256 x 256).
    """

    kind: str
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Prompt.kind must be a non-empty string, got {self.kind!r}")
        if (self.point_coords is None) != (self.point_labels is None):
            raise ValueError("Prompt: point_coords and point_labels must be given together")
        if self.point_coords is None and self.box is None and self.mask_input is None:
            raise ValueError(f"Prompt {self.kind!r} has no points, no box and no mask_input")
        if self.point_coords is not None:
            coords = np.asarray(self.point_coords, dtype=np.float32)
            labels = np.asarray(self.point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
                raise ValueError(f"Prompt.point_coords must be N x 2 with N >= 1, got shape {coords.shape}")
            if labels.shape != (coords.shape[0],):
                raise ValueError(
                    f"Prompt.point_labels must have shape ({coords.shape[0]},) to match point_coords, "
                    f"got {labels.shape}"
                )
            if not np.all(np.isfinite(coords)):
                raise ValueError("Prompt.point_coords must be finite")
            if not np.all((labels == 0) | (labels == 1)):
                raise ValueError(f"Prompt.point_labels must be 0 or 1, got {np.unique(labels).tolist()}")
            object.__setattr__(self, "point_coords", coords)
            object.__setattr__(self, "point_labels", labels.astype(np.int64))
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float32)
            if box.shape != (4,):
                raise ValueError(f"Prompt.box must have shape (4,) (xyxy), got {box.shape}")
            check_box(box, "Prompt.box")
            object.__setattr__(self, "box", box)
        if self.mask_input is not None:
            mask_input = np.asarray(self.mask_input, dtype=np.float32)
            if mask_input.ndim != 2:
                raise ValueError(f"Prompt.mask_input must be h x w, got shape {mask_input.shape}")
            object.__setattr__(self, "mask_input", mask_input)


def random_points(
    mask: np.ndarray, k: int, *, generator: np.random.Generator, replace: bool = False
) -> np.ndarray:
    """k positive points drawn uniformly from a mask's foreground pixels (HQ-SAM ``masks_sample_points``).

    With at least k foreground pixels the points are distinct (drawn without replacement) whatever
    ``replace`` says, so the flag never changes the prompts of ordinary objects.

    Arguments:
      mask (np.ndarray): H x W binary mask.
      k (int): number of points, >= 1.
      generator (np.random.Generator): the only source of randomness.
      replace (bool): with fewer than k foreground pixels, draw with replacement instead of raising.

    Returns:
      (np.ndarray): k x 2 float32 pixel coordinates (x, y).

    Raises:
      EmptyMaskError: the mask has no foreground.
      NotEnoughPixelsError: fewer than k foreground pixels and replace=False.
    """
    mask = as_bool_mask(mask)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        raise EmptyMaskError(f"cannot sample points from an empty mask (shape {mask.shape})")
    if flat.size < k and not replace:
        raise NotEnoughPixelsError(
            f"mask has {flat.size} foreground pixels, fewer than the {k} points asked for "
            "(pass replace=True to draw with replacement)"
        )
    chosen = generator.choice(flat, size=k, replace=bool(flat.size < k))
    rows, cols = np.unravel_index(chosen, mask.shape)
    return np.stack([cols, rows], axis=1).astype(np.float32)


def oracle_point(
    gt: np.ndarray, pred: np.ndarray | None = None, *, not_clicked: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """RITM's next click: the interior point of the largest error region.

    FN = gt & ~pred, FP = ~gt & pred. Each is padded with a 1-pixel ring of zeros, so that the image
    border acts as a region boundary, and its exact Euclidean distance transform is taken (distance of
    every error pixel to the nearest non-error pixel). The click is positive iff max(D_FN) > max(D_FP)
    (ties give a negative click) and lies at the first pixel, in row-major order, attaining the max of
    the chosen map. With ``pred`` None (empty prediction) this is the first click: the GT pixel farthest
    from the GT boundary.

    Arguments:
      gt (np.ndarray): H x W binary ground truth.
      pred (np.ndarray or None): H x W binary current prediction; None = nothing predicted yet.
      not_clicked (np.ndarray or None): H x W binary, True where a click may still go (RITM's
        ``not_clicked_map``); already clicked pixels (False) are never chosen again. None = all.

    Returns:
      (np.ndarray): 2 float32 pixel coordinates (x, y).
      (int): label, 1 = positive (add foreground), 0 = negative (remove foreground).

    Raises:
      ValueError: the prediction has no error left (pred == gt) outside already clicked pixels.
    """
    gt = as_bool_mask(gt, "gt")
    pred = np.zeros_like(gt) if pred is None else as_bool_mask(pred, "pred")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    allowed = np.ones_like(gt) if not_clicked is None else as_bool_mask(not_clicked, "not_clicked")
    if allowed.shape != gt.shape:
        raise ValueError(f"not_clicked shape {allowed.shape} differs from gt shape {gt.shape}")

    def distances(error: np.ndarray) -> np.ndarray:
        padded = np.pad(error, 1, constant_values=False)
        return ndimage.distance_transform_edt(padded)[1:-1, 1:-1] * allowed

    fn_dist = distances(gt & ~pred)
    fp_dist = distances(~gt & pred)
    fn_max, fp_max = fn_dist.max(), fp_dist.max()
    if fn_max == 0 and fp_max == 0:
        raise ValueError("oracle_point: the prediction has no error left (pred == gt outside clicked pixels)")
    is_positive = fn_max > fp_max
    # argmax returns the first maximum in row-major order, like RITM's np.where(...)[0].
    row, col = np.unravel_index(np.argmax(fn_dist if is_positive else fp_dist), gt.shape)
    return np.array([col, row], dtype=np.float32), int(is_positive)


def coarse_mask(
    mask: np.ndarray,
    *,
    generator: np.random.Generator,
    size: tuple[int, int],
    values: str = "hqsam",
) -> np.ndarray:
    """A coarse mask prompt: HQ-SAM's ``masks_noise`` (from Mask Transfiner).

    m = bilinear resize of the GT to ``size`` (align_corners=False, no antialias; values in [0, 1]);
    coarse = up(down(m, factor 8)), both bilinear; the "incoherent" band |m - coarse| >= 0.01 lies
    around the object's edges; noisy = (m + eps * band) > 0.5 with eps ~ N(0, 1) per pixel. So the
    interior and the background stay, and edges flip at random.

    Arguments:
      mask (np.ndarray): H x W binary mask.
      generator (np.random.Generator): the only source of randomness.
      size (tuple(int, int)): (h, w) of the mask prompt, both divisible by 8 (SAM: 256 x 256).
      values (str): "hqsam" gives {0, 255} (what HQ-SAM feeds to SAM as mask "logits");
        "logits" gives {-COARSE_MASK_LOGIT, +COARSE_MASK_LOGIT} = {-20, 20}.

    Returns:
      (np.ndarray): h x w float32.
    """
    mask = as_bool_mask(mask)
    h, w = check_size(size, "size")
    if h % _INCOHERENT_FACTOR or w % _INCOHERENT_FACTOR:
        raise ValueError(f"size must be divisible by {_INCOHERENT_FACTOR}, got {(h, w)}")
    if values == "hqsam":
        low, high = 0.0, _HQSAM_MASK_VALUE
    elif values == "logits":
        low, high = -COARSE_MASK_LOGIT, COARSE_MASK_LOGIT
    else:
        raise ValueError(f"values must be 'hqsam' or 'logits', got {values!r}")

    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
    small = F.interpolate(
        m, (h // _INCOHERENT_FACTOR, w // _INCOHERENT_FACTOR), mode="bilinear", align_corners=False
    )
    coarse = F.interpolate(small, (h, w), mode="bilinear", align_corners=False)
    band = ((m - coarse).abs() >= _INCOHERENT_THRESHOLD)[0, 0].numpy()
    eps = generator.standard_normal((h, w), dtype=np.float32)
    noisy = (m[0, 0].numpy() + eps * band) > 0.5
    return np.where(noisy, high, low).astype(np.float32)


def sample_prompt(
    kind: str,
    mask: np.ndarray,
    *,
    generator: np.random.Generator,
    mask_input_size: tuple[int, int],
    noise_scale: float = 0.4,
    min_iou: float = 0.5,
    coarse_values: str = "hqsam",
) -> Prompt:
    """One prompt of a given kind for one object.

    Kinds: "gt_box" (tight box), "noisy_box" (``noisy_box`` of the tight box), "point_K" for an
    integer K >= 1 (K positive points; a mask with fewer than K pixels gets points drawn with
    replacement, so tiny objects never fail evaluation), "coarse_mask" (``coarse_mask`` at
    ``mask_input_size``), "oracle_point" (RITM first click: one positive point, deterministic).

    Arguments:
      kind (str): the prompt kind.
      mask (np.ndarray): H x W binary ground-truth mask, in the frame of the prompt.
      generator (np.random.Generator): the only source of randomness.
      mask_input_size (tuple(int, int)): (h, w) of a coarse-mask prompt.
      noise_scale, min_iou: see ``noisy_box``.
      coarse_values: see ``coarse_mask`` ``values``.

    Returns:
      (Prompt): the prompt, with ``kind`` as given.

    Raises:
      EmptyMaskError: the mask has no foreground.
    """
    mask = as_bool_mask(mask)
    if not mask.any():
        raise EmptyMaskError(f"cannot draw a {kind!r} prompt for an empty mask (shape {mask.shape})")
    point_kind = _POINT_KIND.fullmatch(kind) if isinstance(kind, str) else None
    if kind == "gt_box":
        return Prompt(kind, box=box_from_mask(mask))
    if kind == "noisy_box":
        box = noisy_box(
            box_from_mask(mask),
            image_size=mask.shape,
            generator=generator,
            noise_scale=noise_scale,
            min_iou=min_iou,
        )
        return Prompt(kind, box=box)
    if point_kind is not None and int(point_kind.group(1)) >= 1:
        k = int(point_kind.group(1))
        coords = random_points(mask, k, generator=generator, replace=True)
        return Prompt(kind, point_coords=coords, point_labels=np.ones(k, dtype=np.int64))
    if kind == "coarse_mask":
        return Prompt(
            kind,
            mask_input=coarse_mask(mask, generator=generator, size=mask_input_size, values=coarse_values),
        )
    if kind == "oracle_point":
        point, label = oracle_point(mask)
        return Prompt(kind, point_coords=point[None], point_labels=np.array([label]))
    raise ValueError(
        f"unknown prompt kind {kind!r}; expected 'gt_box', 'noisy_box', 'point_K' (K >= 1), "
        "'coarse_mask' or 'oracle_point'"
    )


def sample_training_prompt(
    mask: np.ndarray,
    *,
    generator: np.random.Generator,
    weights: Mapping[str, float],
    point_counts: Sequence[int],
    mask_input_size: tuple[int, int],
    noise_scale: float = 0.4,
    min_iou: float = 0.5,
    coarse_values: str = "hqsam",
) -> Prompt:
    """One prompt from Stable-SAM's robust-training mixture (one prompt per object per step).

    The type is drawn with probability proportional to ``weights`` (keys among "gt_box", "noisy_box",
    "points", "coarse_mask"; a missing key weighs 0); for "points", k is drawn uniformly from
    ``point_counts``. A mask with fewer than k foreground pixels falls back to "gt_box", as HQ-SAM
    falls back to a box when point sampling fails. Draw order on ``generator``: type, then k (points
    only), then the prompt itself.

    Arguments:
      mask (np.ndarray): H x W binary ground-truth mask (the visible part, after occlusion).
      generator (np.random.Generator): the only source of randomness.
      weights (Mapping[str, float]): non-negative weight per prompt type, not all zero.
      point_counts (Sequence[int]): candidate numbers of points, each >= 1 (Stable-SAM: 1, 3, 5, 10).
      mask_input_size, noise_scale, min_iou, coarse_values: see ``sample_prompt``.

    Returns:
      (Prompt): kind "gt_box", "noisy_box", "point_K" or "coarse_mask".
    """
    unknown = sorted(set(weights) - set(TRAINING_PROMPT_TYPES))
    if unknown:
        raise ValueError(
            f"unknown prompt weight keys {unknown}; expected some of {list(TRAINING_PROMPT_TYPES)}"
        )
    probs = np.array([float(weights.get(name, 0.0)) for name in TRAINING_PROMPT_TYPES])
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError(f"prompt weights must be finite and >= 0, got {dict(weights)}")
    if probs.sum() == 0:
        raise ValueError(f"prompt weights are all zero: {dict(weights)}")
    counts = list(point_counts)
    if probs[TRAINING_PROMPT_TYPES.index("points")] > 0 and (
        not counts or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in counts)
    ):
        raise ValueError(f"point_counts must be a non-empty list of ints >= 1, got {point_counts!r}")
    mask = as_bool_mask(mask)
    n_pixels = int(mask.sum())
    if n_pixels == 0:
        raise EmptyMaskError(f"cannot draw a training prompt for an empty mask (shape {mask.shape})")

    kind = TRAINING_PROMPT_TYPES[generator.choice(len(TRAINING_PROMPT_TYPES), p=probs / probs.sum())]
    if kind == "points":
        k = int(counts[generator.integers(len(counts))])
        kind = f"point_{k}" if n_pixels >= k else "gt_box"
    return sample_prompt(
        kind,
        mask,
        generator=generator,
        mask_input_size=mask_input_size,
        noise_scale=noise_scale,
        min_iou=min_iou,
        coarse_values=coarse_values,
    )
