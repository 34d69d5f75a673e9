"""The params sections of the annotator stages: ``automatic`` and ``interactive`` (params.yaml).

Declared like the sections of ``pipeline/params.py`` (no defaults: params.yaml sets every key;
what a key accepts is declared next to it) and collected into its ``Params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stable_sam.config import (
    COUNT,
    NAME,
    NON_NEGATIVE,
    PROBABILITY,
    Rule,
    allows,
    integer,
    list_of,
    nullable,
    number,
    one_of,
    option,
)
from stable_sam.evaluation import AMG_SCORES

__all__ = ["AutomaticConfig", "InteractiveConfig"]

_SETS = list_of(NAME, non_empty=True, distinct=True)
_THRESHOLDS = list_of(number(above=0.0, maximum=1.0), non_empty=True, distinct=True)


@dataclass
class AutomaticConfig:
    """Automatic mask generation (segment-anything's SamAutomaticMaskGenerator), SAM vs Stable-SAM,
    scored by class-agnostic COCO mask AP / AR@100 on sets with COCO instances."""

    sets: list[str] = field(metadata=allows(_SETS))  # embedded | coco_val2017 | a folder with instances.json
    max_images: int | None = option(nullable(COUNT))  # the first N images of each set; None: all
    score: str = option(one_of(AMG_SCORES))  # what ranks the masks in COCOeval
    # SamAutomaticMaskGenerator's own arguments (segment-anything's defaults are for 1024 px ViT-H).
    points_per_side: int = option(COUNT)
    points_per_batch: int = option(COUNT)
    pred_iou_thresh: float = option(PROBABILITY)
    stability_score_thresh: float = option(PROBABILITY)
    stability_score_offset: float = option(NON_NEGATIVE)
    box_nms_thresh: float = option(PROBABILITY)
    crop_n_layers: int = option(integer(0))
    crop_nms_thresh: float = option(PROBABILITY)
    crop_overlap_ratio: float = option(PROBABILITY)
    crop_n_points_downscale_factor: int = option(COUNT)
    min_mask_region_area: int = option(integer(0))  # > 0 needs opencv (segment-anything's choice)

    def generator_options(self) -> dict[str, object]:
        """The keyword arguments of ``SamAutomaticMaskGenerator`` (COCO RLE output)."""
        keys = (
            "points_per_side",
            "points_per_batch",
            "pred_iou_thresh",
            "stability_score_thresh",
            "stability_score_offset",
            "box_nms_thresh",
            "crop_n_layers",
            "crop_nms_thresh",
            "crop_overlap_ratio",
            "crop_n_points_downscale_factor",
            "min_mask_region_area",
        )
        return {key: getattr(self, key) for key in keys} | {"output_mode": "coco_rle"}


@dataclass
class InteractiveConfig:
    """The interactive-segmentation click protocol (RITM clicks, mask feedback), NoC@IoU."""

    sets: list[str] = field(metadata=allows(_SETS))  # like data.val: registered names or HQSeg folders
    max_clicks: int = option(COUNT)
    iou_thresholds: list[float] = field(metadata=allows(_THRESHOLDS))  # NoC@85, NoC@90
    multimask_output: bool  # every click; the best-scored mask of 3 is kept and fed back
    max_images: int | None = option(nullable(COUNT))  # the first N targets of each set; None: all

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("iou_thresholds",),
            lambda values: all(abs(100 * v - round(100 * v)) < 1e-9 for v in values),
            "thresholds in whole percent (0.85, 0.9): they name the NoC@85 / NoC@90 metrics",
        ),
    )
