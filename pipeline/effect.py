"""The comparison every evaluation makes: SAM vs Stable-SAM on the headline prompt types.

Shared by the stages that produce the comparison (``evaluate``, ``ablate``) and the one that
presents it (``report``): the names of the two settings in every results file, the prompt types
of the headline (evaluated whatever ``eval.prompts`` says), how a prompt type is named in tables
and figure legends, and the fixed-shape effect numbers taken from an evaluation's macro mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BASELINE",
    "EFFECT_PROMPTS",
    "MODEL",
    "PROMPT_LABELS",
    "effect_numbers",
    "prompt_label",
    "rounded",
]

# The two settings of every results file: SAM (plug-ins off, or a plain SAM) and Stable-SAM.
BASELINE, MODEL = "sam", "stable_sam"
EFFECT_PROMPTS = ("gt_box", "noisy_box", "point_1", "point_3", "point_10")
PROMPT_LABELS = {
    "gt_box": "GT box",
    "noisy_box": "Noisy box",
    "oracle_point": "Oracle point",
    "coarse_mask": "Coarse mask",
}


def prompt_label(kind: str) -> str:
    """ "point_3" -> "3 points", "gt_box" -> "GT box"."""
    if kind in PROMPT_LABELS:
        return PROMPT_LABELS[kind]
    if kind.startswith("point_"):
        k = kind.split("_", 1)[1]
        return f"{k} point" if k == "1" else f"{k} points"
    return kind


def rounded(value: Any) -> float | None:
    """A metric as the pipeline's JSON files hold it: 4 decimals; None for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def effect_numbers(mean: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """{"base": {PROMPT: {miou, mbiou, st}}, "stable_sam": {PROMPT: {..., alpha1}}} for EFFECT_PROMPTS.

    ``mean``: an evaluation's macro mean over its sets (``reports/evaluation.json``: ``mean``). A GT
    box is deterministic, so its ST is 100.
    """

    def entry(setting: str, kind: str, with_alpha: bool) -> dict[str, Any]:
        figures = mean.get(setting, {}).get(kind, {})
        value = {
            "miou": rounded(figures.get("miou")),
            "mbiou": rounded(figures.get("mbiou")),
            "st": 100.0 if kind == "gt_box" else rounded(figures.get("st")),
        }
        if with_alpha:
            value["alpha1"] = rounded(figures.get("alpha1"))
        return value

    return {
        "base": {kind: entry(BASELINE, kind, False) for kind in EFFECT_PROMPTS},
        "stable_sam": {kind: entry(MODEL, kind, True) for kind in EFFECT_PROMPTS},
    }
