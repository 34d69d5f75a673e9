"""Prompt samplers of the training set: the robust mixture (Stable-SAM) and SAM's precise prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stable_sam.boxes import box_from_mask

from ..config import PromptMixConfig
from ..prompts import Prompt, random_points, sample_training_prompt

__all__ = [
    "PromptSampler",
    "jittered_box",
    "precise_prompt_sampler",
    "robust_prompt_sampler",
    "seeded_generator",
]


PromptSampler = Callable[[Sequence[np.ndarray], np.random.Generator], list[Prompt]]
"""(visible target masks, each H x W bool in the model frame; generator) -> one prompt per mask.

One prompt *kind* is drawn per call, so the prompts of one image share their structure and are
decoded in one call."""


def seeded_generator(*keys: int) -> np.random.Generator:
    """A numpy generator that is a pure function of integer keys (seed, epoch, index, ...)."""
    return np.random.default_rng([int(k) for k in keys])


def robust_prompt_sampler(mix: PromptMixConfig, *, mask_input_size: tuple[int, int]) -> PromptSampler:
    """Stable-SAM's robust training mixture: GT box, noisy box, 1/3/5/10 points, coarse mask."""
    weights = {
        "gt_box": mix.gt_box,
        "noisy_box": mix.noisy_box,
        "points": mix.points,
        "coarse_mask": mix.coarse_mask,
    }

    def sample(masks: Sequence[np.ndarray], generator: np.random.Generator) -> list[Prompt]:
        if len(masks) != 1:
            raise ValueError(f"the robust mixture draws one prompt for one target, got {len(masks)} targets")
        prompt = sample_training_prompt(
            masks[0],
            generator=generator,
            weights=weights,
            point_counts=mix.point_counts,
            mask_input_size=mask_input_size,
            noise_scale=mix.noise_scale,
            min_iou=mix.min_box_iou,
            coarse_values=mix.coarse_mask_values,
        )
        return [prompt]

    return sample


def jittered_box(mask: np.ndarray, *, generator: np.random.Generator, jitter: float) -> np.ndarray:
    """SAM's training box: the tight box with each coordinate moved by N(0, jitter x side).

    SAM adds noise of std 10 % of the box side (at most 20 px at 1024) to its training boxes; the
    shift here is clipped at 2 std and to the image. ``jitter=0`` gives the tight box.
    """
    box = box_from_mask(mask).astype(np.float64)
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
    shift = np.clip(generator.normal(0.0, jitter, 4), -2 * jitter, 2 * jitter) * side if jitter > 0 else 0.0
    h, w = mask.shape
    x0, y0, x1, y1 = np.clip(box + shift, 0, [w - 1, h - 1, w - 1, h - 1])
    return np.array([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], dtype=np.float32)


def precise_prompt_sampler(
    *, point_counts: Sequence[int], box_probability: float, box_jitter: float = 0.0
) -> PromptSampler:
    """Precise prompts only, as SAM is trained: GT boxes with SAM's small jitter, or k positive clicks.

    A single click is ambiguous: :func:`sam_training_step` supervises it through SAM's three
    multimask outputs (the best one takes the loss), as SAM does, so mask token 0 only ever
    learns from unambiguous prompts.
    """
    if not 0.0 <= box_probability <= 1.0:
        raise ValueError(f"box_probability must lie in [0, 1], got {box_probability}")
    if not point_counts or min(point_counts) < 1:
        raise ValueError(f"point_counts must be positive integers, got {list(point_counts)}")
    if box_jitter < 0:
        raise ValueError(f"box_jitter must be >= 0, got {box_jitter}")

    def sample(masks: Sequence[np.ndarray], generator: np.random.Generator) -> list[Prompt]:
        if generator.random() < box_probability:
            return [
                Prompt(kind="gt_box", box=jittered_box(m, generator=generator, jitter=box_jitter))
                for m in masks
            ]
        k = int(generator.choice(point_counts))
        return [
            Prompt(
                kind=f"point_{k}",
                point_coords=random_points(m, k, generator=generator, replace=True),
                point_labels=np.ones(k, np.int64),
            )
            for m in masks
        ]

    return sample
