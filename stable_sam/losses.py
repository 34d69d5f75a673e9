"""Mask losses: HQ-SAM's ``loss_masks``, BCE + dice on PointRend-sampled points.

Instead of comparing the 256 x 256 low-res logits with the full-resolution target pixel by pixel, both
are sampled at the same N relative positions (x, y) in [0, 1]^2: mostly where the prediction is
uncertain (logit near 0), plus some uniform points. Targets may be soft (HQ-SAM uses label / 255 after
bilinear resizing) and of any resolution.

Normalisation (as HQ-SAM / Mask2Former): each term is averaged over the points of a mask, summed over
the masks of the batch and divided by ``num_masks`` (the local batch size by default, not all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dense_mask_loss",
    "dice_loss",
    "mask_loss",
    "per_mask_losses",
    "point_sample",
    "sigmoid_bce_loss",
    "uncertain_point_coords",
]


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a map at relative positions (detectron2's ``point_sample``).

    Uses ``grid_sample(inputs, 2 * coords - 1, align_corners=False)`` with zero padding, as HQ-SAM: (0, 0)
    is the top-left corner of the top-left pixel, (1, 1) the bottom-right corner of the last one, so
    maps of different resolutions are sampled at the same physical positions.

    Arguments:
      inputs (torch.Tensor): B x C x H x W.
      coords (torch.Tensor): B x P x 2 relative coordinates (x, y) in [0, 1].

    Returns:
      (torch.Tensor): B x C x P.
    """
    if inputs.dim() != 4:
        raise ValueError(f"point_sample: inputs must be B x C x H x W, got shape {tuple(inputs.shape)}")
    if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"point_sample: coords must be B x P x 2 with B = {inputs.shape[0]}, got shape {tuple(coords.shape)}"
        )
    grid = 2.0 * coords.to(inputs.dtype).unsqueeze(2) - 1.0  # B x P x 1 x 2
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_point_coords(
    logits: torch.Tensor,
    *,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's training points (detectron2 ``get_uncertain_point_coords_with_randomness``).

    Draws int(oversample_ratio * num_points) uniform candidates per mask, keeps the
    int(importance_sample_ratio * num_points) with the highest uncertainty -|logit| (sampled
    bilinearly) and adds fresh uniform points for the rest. HQ-SAM: 12,544 points, 3x, 0.75.

    Arguments:
      logits (torch.Tensor): B x 1 x H x W mask logits.
      num_points (int): N, points per mask.
      oversample_ratio (float): >= 1.
      importance_sample_ratio (float): in [0, 1].
      generator (torch.Generator or None): source of the uniform draws (on any device; the points are
        drawn there and moved to the logits' device, so a CPU generator gives the same points on a GPU).

    Returns:
      (torch.Tensor): B x N x 2 relative coordinates (x, y) in [0, 1], without grad.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be B x 1 x H x W, got shape {tuple(logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    batch = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    device = generator.device if generator is not None else logits.device

    def uniform(n: int) -> torch.Tensor:
        return torch.rand(batch, n, 2, generator=generator, device=device).to(logits.device, logits.dtype)

    candidates = uniform(num_sampled)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # B x num_sampled
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_points > num_uncertain:
        coords = torch.cat([coords, uniform(num_points - num_uncertain)], dim=1)
    return coords


def sigmoid_bce_loss(
    point_logits: torch.Tensor, point_targets: torch.Tensor, num_masks: float
) -> torch.Tensor:
    """Binary cross-entropy with logits: mean over the P points of a mask, summed over masks, / num_masks.

    Arguments:
      point_logits (torch.Tensor): B x P logits.
      point_targets (torch.Tensor): B x P targets in [0, 1] (soft allowed).
      num_masks (float): normaliser, > 0.

    Returns:
      (torch.Tensor): scalar.
    """
    _check_points(point_logits, point_targets, num_masks)
    loss = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: torch.Tensor, point_targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice on the points: per mask 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), p = sigmoid(logit).

    The +1 smoothing keeps an empty target with an empty prediction at zero loss. Summed over masks,
    / num_masks.

    Arguments:
      point_logits (torch.Tensor): B x P logits.
      point_targets (torch.Tensor): B x P targets in [0, 1] (soft allowed).
      num_masks (float): normaliser, > 0.

    Returns:
      (torch.Tensor): scalar.
    """
    _check_points(point_logits, point_targets, num_masks)
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_targets).sum(-1)
    denominator = probs.sum(-1) + point_targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def _check_points(point_logits: torch.Tensor, point_targets: torch.Tensor, num_masks: float) -> None:
    if point_logits.dim() != 2 or point_logits.shape != point_targets.shape:
        raise ValueError(
            "point_logits and point_targets must both be B x P, got "
            f"{tuple(point_logits.shape)} and {tuple(point_targets.shape)}"
        )
    if not num_masks > 0:
        raise ValueError(f"num_masks must be > 0, got {num_masks}")


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    num_masks: float | None = None,
) -> dict[str, torch.Tensor]:
    """HQ-SAM's ``loss_masks``: point-sampled BCE + dice, weighted 1:1.

    The points come from the logits (``uncertain_point_coords``, no grad); logits and targets are then
    sampled there with ``point_sample``. Gradient flows to ``logits`` only.

    Arguments:
      logits (torch.Tensor): B x 1 x h x w mask logits (SAM: 256 x 256).
      targets (torch.Tensor): B x 1 x H x W float in [0, 1] (soft allowed) or bool; H, W may differ
        from h, w.
      num_points, oversample_ratio, importance_sample_ratio, generator: see ``uncertain_point_coords``.
      num_masks (float or None): normaliser; None = B.

    Returns:
      (dict[str, torch.Tensor]): scalars "bce", "dice" and "total" = bce + dice.
    """
    targets = _checked_targets(logits, targets)
    num_masks = logits.shape[0] if num_masks is None else num_masks

    coords = uncertain_point_coords(
        logits.detach(),
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
        generator=generator,
    )
    with torch.no_grad():
        point_targets = point_sample(targets.detach().to(logits.dtype), coords)[:, 0]
    point_logits = point_sample(logits, coords)[:, 0]
    bce = sigmoid_bce_loss(point_logits, point_targets, num_masks)
    dice = dice_loss(point_logits, point_targets, num_masks)
    return {"bce": bce, "dice": dice, "total": bce + dice}


def dense_mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE + dice (1:1) on every pixel: the logits are upsampled to the targets' size.

    Used to train SAM itself from scratch (the base model of the offline default), where all
    pixels carry signal; HQ-SAM's point-sampled :func:`mask_loss` is the fine-tuning loss.

    Arguments:
      logits (torch.Tensor): B x 1 x h x w mask logits.
      targets (torch.Tensor): B x 1 x H x W float in [0, 1] or bool.

    Returns:
      (dict[str, torch.Tensor]): "bce" (mean over pixels, then masks), "dice" (per mask, mean over
      masks) and "total" = bce + dice.
    """
    targets = _checked_targets(logits, targets)
    upsampled = F.interpolate(logits, targets.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(upsampled, targets)
    probs, flat = upsampled.sigmoid().flatten(1), targets.flatten(1)
    dice = (1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)).mean()
    return {"bce": bce, "dice": dice, "total": bce + dice}


def per_mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense BCE and dice of each of M candidate masks against its target (SAM's multimask loss).

    Arguments:
      logits (torch.Tensor): T x M x h x w mask logits (M = 1, or SAM's 3 multimask outputs).
      targets (torch.Tensor): T x 1 x H x W float in [0, 1] or bool.

    Returns:
      (dict[str, torch.Tensor]): "bce" and "dice", each T x M (mean over pixels / per mask), so
      that a caller can take the best of the M candidates per target before averaging.
    """
    if logits.dim() != 4 or logits.shape[0] == 0:
        raise ValueError(f"logits must be T x M x h x w with T >= 1, got shape {tuple(logits.shape)}")
    if targets.dim() != 4 or targets.shape[1] != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be T x 1 x H x W with T = {logits.shape[0]} (as logits), got shape {tuple(targets.shape)}"
        )
    targets = targets.to(logits.dtype)
    upsampled = F.interpolate(logits, targets.shape[-2:], mode="bilinear", align_corners=False)
    expanded = targets.expand_as(upsampled)
    bce = F.binary_cross_entropy_with_logits(upsampled, expanded, reduction="none").flatten(2).mean(2)
    probs, flat = upsampled.sigmoid().flatten(2), expanded.flatten(2)
    dice = 1 - (2 * (probs * flat).sum(2) + 1) / (probs.sum(2) + flat.sum(2) + 1)
    return {"bce": bce, "dice": dice}


def _checked_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Validate shapes and value ranges; returns the targets as floats like the logits."""
    if logits.dim() != 4 or logits.shape[1] != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be B x 1 x h x w with B >= 1, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if targets.dim() != 4 or targets.shape[1] != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be B x 1 x H x W with B = {logits.shape[0]} (as logits), got shape {tuple(targets.shape)}"
        )
    if targets.dtype == torch.bool:
        targets = targets.to(logits.dtype)
    elif not targets.is_floating_point():
        # An integer label is ambiguous ({0, 1} or {0, 255}); make the caller say which.
        raise ValueError(f"targets must be float in [0, 1] or bool, got dtype {targets.dtype}")
    if targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise ValueError(
            f"targets must lie in [0, 1], got [{targets.min().item()}, {targets.max().item()}] "
            "(HQ-SAM labels are divided by 255)"
        )
    return targets
