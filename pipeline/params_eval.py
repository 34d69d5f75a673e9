"""The ``eval`` section of params.yaml and the values of ``data.eval_resize`` (declared like the
sections of ``pipeline/params.py``, which collects them into its ``Params``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from stable_sam.config import (
    COUNT,
    EVAL_PROMPT_KIND,
    EVAL_RESIZE_MODES,
    NAME,
    NON_NEGATIVE,
    PROBABILITY,
    SEED,
    Allowed,
    Rule,
    allows,
    integer,
    list_of,
    nullable,
    one_of,
    option,
    ordered,
)
from stable_sam.evaluation import DETECTION_SCORES

__all__ = ["EVAL_DEVICES", "EVAL_RESIZE", "EVAL_RESIZE_AUTO", "EvalConfig"]

EVAL_DEVICES = ("auto", "cuda", "cpu")
# data.eval_resize: each evaluation set's protocol resize (stable_sam.data.protocol_resize).
EVAL_RESIZE_AUTO = "auto"
EVAL_RESIZE = Allowed(
    lambda v: (
        v == EVAL_RESIZE_AUTO
        or v in EVAL_RESIZE_MODES
        or (
            isinstance(v, Mapping)
            and bool(v)
            and all(isinstance(k, str) and k and m in EVAL_RESIZE_MODES for k, m in v.items())
        )
    ),
    f"{EVAL_RESIZE_AUTO!r} (each set's protocol), "
    + " or ".join(repr(m) for m in EVAL_RESIZE_MODES)
    + " (every set), or a non-empty mapping of set names to one of them (the others: auto)",
)
_DETECTIONS = Allowed(
    lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and NAME.accepts(f) for k, f in v.items()),
    "a mapping of set names to detection files ({} for none)",
)


@dataclass
class EvalConfig:
    """Evaluation protocol (method spec sections 5 and 6); also the prompt protocol of the sweeps."""

    prompts: list[str] = field(metadata=allows(list_of(EVAL_PROMPT_KIND)))
    draws: int = option(COUNT)  # K prompt draws for mIoU ± std and ST [19, 20]
    seed: int = option(SEED)
    noise_scale: float = option(NON_NEGATIVE)
    min_box_iou: float = option(PROBABILITY)
    multimask_output: bool
    coco_max_images: int | None = option(nullable(COUNT))
    coco_min_box_iou: float = option(PROBABILITY)  # COCO "N-Box (0.5-0.6)"
    coco_max_box_iou: float = option(PROBABILITY)
    # {COCO-format set of data.val: a detector's COCO results file}: its boxes prompt the models too
    coco_detections: dict[str, str] = field(metadata=allows(_DETECTIONS))
    coco_detection_min_score: float = option(NON_NEGATIVE)  # 0: every detection (HQ-SAM)
    coco_detection_score: str = option(one_of(DETECTION_SCORES))
    num_figures: int = option(integer(0))
    threads: int | None = option(nullable(COUNT))  # None: torch's default (all cores)
    device: str = option(one_of(EVAL_DEVICES))
    embed_batch_size: int = option(COUNT)

    rules: ClassVar[tuple[Rule, ...]] = (ordered("coco_min_box_iou", "coco_max_box_iou"),)
