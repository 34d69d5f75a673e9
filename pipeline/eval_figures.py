"""The evaluate stage's figures: SAM vs Stable-SAM under the same noisy box and the same single
click, and the DSP offsets, for ``eval.num_figures`` fixed, evenly spaced images of each set (no
picking). Rendered to PNG bytes; the stage writes them with its other outputs as one set."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stable_sam.evaluation import PreparedImage, decode_prompts, eval_prompts
from stable_sam.metrics import mask_iou

from .effect import BASELINE, MODEL
from .eval_inputs import ModelPass
from .params import EvalConfig

__all__ = ["draw_figures", "figure_indices"]


def figure_indices(count: int, wanted: int) -> set[int]:
    if wanted <= 0 or count == 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(wanted, count)).round()}


def _to_frame(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample of an original-resolution mask to the displayed model frame."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.ix_(rows, cols)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def draw_figures(
    passes: Sequence[ModelPass],
    embeddings: Sequence[torch.Tensor],
    image: PreparedImage,
    *,
    dataset: str,
    cfg: EvalConfig,
    out: Path,
) -> dict[Path, bytes]:
    """SAM vs Stable-SAM under the same noisy box and the same single click; DSP offsets.

    Returns the PNG files (path under ``out`` -> content): they are written with the other outputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    from stable_sam.visualize import MaskPanel, compare_masks, offsets_figure

    frame = image.input_image
    size = frame.shape[:2]
    mask_input_size = passes[0].model.mask_input_size
    panels, offset_entries = [], []
    for kind, label in (("noisy_box", "noisy box"), ("point_1", "1 click")):
        (prompt,) = eval_prompts(
            image,
            kind,
            draws=1,
            seed=cfg.seed,
            mask_input_size=mask_input_size,
            noise_scale=cfg.noise_scale,
            min_iou=cfg.min_box_iou,
        )
        decoded = {}
        for p, embedding in zip(passes, embeddings):
            for setting, context in p.settings.items():
                with context():
                    decoded[setting] = decode_prompts(
                        p.model, embedding, [prompt], image=image, multimask_output=cfg.multimask_output
                    )
        sam, stable = decoded[BASELINE], decoded[MODEL]
        panels.append(
            MaskPanel(
                label=label,
                prompt=prompt,
                sam_mask=_to_frame(sam.masks[0], size),
                stable_mask=_to_frame(stable.masks[0], size),
                sam_iou=mask_iou(image.mask, sam.masks[0]),
                stable_iou=mask_iou(image.mask, stable.masks[0]),
            )
        )
        if stable.offsets is not None:
            alpha = "" if stable.alpha1 is None else f", α1 = {stable.alpha1[0]:.2f}"
            offset_entries.append(
                (
                    f"DSP offsets · {label}{alpha}",
                    prompt,
                    stable.offsets[0].numpy(),
                    _to_frame(stable.masks[0], size),
                )
            )
    stem = _safe(f"{dataset}_{image.name}")
    rendered = {}
    fig = compare_masks(frame, _to_frame(image.mask, size), panels, title=f"{dataset} · {image.name}")
    rendered[out / f"{stem}_sam_vs_stable_sam.png"] = _png_bytes(fig)
    if offset_entries:
        fig = offsets_figure(frame, offset_entries, title=f"{dataset} · {image.name}")
        rendered[out / f"{stem}_offsets.png"] = _png_bytes(fig)
    return rendered
