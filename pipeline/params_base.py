"""The ``base``, ``tighten`` and ``extend`` sections of params.yaml: the released base SAM's own
pipeline, ``base/dvc.yaml`` (declared like the sections of ``pipeline/params.py``, which collects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stable_sam.config import (
    COUNT,
    NON_NEGATIVE,
    POINT_COUNTS,
    POSITIVE,
    PROBABILITY,
    SEED,
    SHA256,
    Rule,
    allows,
    integer,
    option,
    ordered,
)

__all__ = ["BaseTrainConfig", "ExtendConfig", "TightenConfig"]


@dataclass
class BaseTrainConfig:
    """Pretraining the released small base SAM (base/dvc.yaml; precise prompts only, like SAM)."""

    steps: int = option(COUNT)
    batch_size: int = option(COUNT)
    lr: float = option(POSITIVE)
    weight_decay: float = option(NON_NEGATIVE)
    warmup_steps: int = option(integer(0))
    num_images: int = option(COUNT)  # its own generated split, disjoint from embedded train/val
    point_counts: list[int] = field(metadata=allows(POINT_COUNTS))
    box_probability: float = option(PROBABILITY)
    box_jitter: float = option(NON_NEGATIVE)  # std of SAM's jittered GT box, x the box side
    correction_clicks: int = option(integer(0))
    iou_loss_weight: float = option(NON_NEGATIVE)
    lsj_min_scale: float = option(POSITIVE)
    lsj_max_scale: float = option(POSITIVE)
    checkpoint_every: int = option(COUNT)
    log_every: int = option(COUNT)
    threads: int = option(COUNT)
    seed: int = option(SEED)

    rules: ClassVar[tuple[Rule, ...]] = (ordered("lsj_min_scale", "lsj_max_scale"),)


@dataclass
class TightenConfig:
    """The base's second phase (base/dvc.yaml: tighten): the pretrained base trained on with SAM's
    tight boxes (box jitter 0 instead of ``base.box_jitter``) at a lower rate, so that its decoder
    follows the box's geometry the way SAM's does. Every other choice is the ``base`` section's."""

    steps: int = option(COUNT)
    lr: float = option(POSITIVE)
    warmup_steps: int = option(integer(0))
    box_jitter: float = option(NON_NEGATIVE)
    seed: int = option(SEED)


@dataclass
class ExtendConfig(TightenConfig):
    """A round of training on (base/dvc.yaml: extend): the last released base (as committed in fp16;
    v1 made v2) trained on for longer with tight boxes, as a new release is trained on
    from the last one. ``init_sha256`` pins the file it starts from, the way ``sam.sha256`` pins the
    checkpoint the default pipeline uses. Every other choice is the ``base`` section's."""

    init_sha256: str = option(SHA256)
