"""Matplotlib figures: masks, prompts, DSP offsets, SAM vs Stable-SAM, sweep curves.

Pure functions of arrays that return a ``matplotlib.figure.Figure`` (or draw on a given ``Axes``);
nothing is shown or saved here, so the pipeline (Agg backend, files) and notebooks (inline) share
them. Conventions are those of the rest of the package: images uint8 H x W x 3, masks bool H x W,
points (x, y) pixel coordinates, boxes xyxy with an inclusive max index, DSP offsets in feature
pixels as (x, y) on the h' x w' embedding grid of an S x S model input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "MaskPanel",
    "clicks_figure",
    "compare_masks",
    "draw_box",
    "draw_offsets",
    "draw_points",
    "draw_prompt",
    "looseness_figure",
    "offsets_figure",
    "overlay_mask",
    "sweep_figure",
]

# Colours: GT green, SAM orange, Stable-SAM blue, prompts red/blue (positive/negative clicks).
GT_COLOR = (0.1, 0.8, 0.2)
SAM_COLOR = (1.0, 0.55, 0.0)
STABLE_COLOR = (0.15, 0.45, 1.0)


def overlay_mask(
    ax: Axes, image: np.ndarray | None, mask: np.ndarray, *, color=STABLE_COLOR, alpha: float = 0.5
) -> None:
    """Show ``image`` (if given) and a translucent ``mask`` on top, with its outline."""
    if image is not None:
        ax.imshow(image)
    mask = np.asarray(mask, bool)
    rgba = np.zeros((*mask.shape, 4), np.float32)
    rgba[mask] = (*color, alpha)
    ax.imshow(rgba, interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=0.8)
    ax.set_axis_off()


def draw_box(ax: Axes, box: np.ndarray, *, color="red", linewidth: float = 1.5, linestyle: str = "-") -> None:
    """An xyxy box (inclusive max index: drawn from pixel edge to pixel edge)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5),
            x1 - x0 + 1,
            y1 - y0 + 1,
            fill=False,
            edgecolor=color,
            linewidth=linewidth,
            linestyle=linestyle,
        )
    )


def draw_points(ax: Axes, coords: np.ndarray, labels: np.ndarray | None = None, *, size: float = 40) -> None:
    """Clicks: positive as red stars, negative as blue crosses."""
    coords = np.asarray(coords, np.float32).reshape(-1, 2)
    labels = np.ones(len(coords), np.int64) if labels is None else np.asarray(labels)
    pos, neg = coords[labels == 1], coords[labels == 0]
    if len(pos):
        ax.scatter(pos[:, 0], pos[:, 1], marker="*", s=size, c="red", edgecolors="white", linewidths=0.6)
    if len(neg):
        ax.scatter(neg[:, 0], neg[:, 1], marker="X", s=size, c="blue", edgecolors="white", linewidths=0.6)


def draw_prompt(ax: Axes, prompt, *, scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """Draw a :class:`stable_sam.prompts.Prompt` (box and/or points).

    ``scale`` = (sx, sy) maps prompt coordinates (model frame) to the displayed image.
    """
    sx, sy = scale
    if prompt.box is not None:
        draw_box(ax, np.asarray(prompt.box) * np.array([sx, sy, sx, sy]))
    if prompt.point_coords is not None:
        draw_points(ax, np.asarray(prompt.point_coords) * np.array([sx, sy]), prompt.point_labels)


def draw_offsets(
    ax: Axes,
    image: np.ndarray | None,
    offsets: np.ndarray,
    *,
    input_size: tuple[int, int] | None = None,
    stride: int = 1,
    min_length: float = 0.0,
    color="yellow",
) -> int:
    """DSP offsets Δp as arrows from each feature cell's centre to where it samples.

    Args:
      ax: where to draw (the image is shown first if given).
      image: h x w x 3 image in the model frame (or None).
      offsets: h' x w' x 2 (one offset group) or G x h' x w' x 2 (groups are averaged), in feature
        pixels (x, y), as :class:`stable_sam.modeling.stable_sam.DecoderOutput` holds them.
      input_size: (h, w) of the model frame the grid covers (default: the image's size).
      stride: draw every ``stride``-th cell in each direction.
      min_length: skip arrows shorter than this (image pixels).
      color: arrow colour.

    Returns:
      The number of arrows drawn.
    """
    offsets = np.asarray(offsets, np.float32)
    if offsets.ndim == 4:
        offsets = offsets.mean(axis=0)
    if offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must be h x w x 2 or G x h x w x 2, got shape {offsets.shape}")
    if image is not None:
        ax.imshow(image)
    if input_size is None:
        if image is None:
            raise ValueError("give input_size when no image is drawn")
        input_size = image.shape[:2]
    grid_h, grid_w = offsets.shape[:2]
    cell_y, cell_x = input_size[0] / grid_h, input_size[1] / grid_w
    ys, xs = np.mgrid[0:grid_h:stride, 0:grid_w:stride]
    dx = offsets[ys, xs, 0] * cell_x
    dy = offsets[ys, xs, 1] * cell_y
    keep = np.hypot(dx, dy) >= min_length
    origin_x, origin_y = (xs + 0.5) * cell_x, (ys + 0.5) * cell_y
    count = int(keep.sum())
    if count:
        ax.quiver(
            origin_x[keep],
            origin_y[keep],
            dx[keep],
            dy[keep],
            angles="xy",
            scale_units="xy",
            scale=1.0,
            color=color,
            width=0.004,
        )
    ax.set_xlim(-0.5, input_size[1] - 0.5)
    ax.set_ylim(input_size[0] - 0.5, -0.5)
    ax.set_axis_off()
    return count


@dataclass
class MaskPanel:
    """One row of :func:`compare_masks`: a prompt and the two models' answers to it.

    Attributes:
      label: row title, e.g. "noisy box".
      prompt: the :class:`stable_sam.prompts.Prompt` (model frame), drawn on every panel.
      sam_mask, stable_mask: H x W bool predictions at the displayed resolution.
      sam_iou, stable_iou: their IoU with the GT (shown in the titles), or None.
    """

    label: str
    prompt: object
    sam_mask: np.ndarray
    stable_mask: np.ndarray
    sam_iou: float | None = None
    stable_iou: float | None = None


def compare_masks(
    image: np.ndarray,
    gt: np.ndarray,
    panels: Sequence[MaskPanel],
    *,
    prompt_scale: tuple[float, float] = (1.0, 1.0),
    title: str | None = None,
    panel_size: float = 2.6,
) -> Figure:
    """SAM vs Stable-SAM under the same prompts, as the paper's visualisations.

    One row per prompt, columns: GT with the prompt, SAM's mask, Stable-SAM's mask (each with the
    prompt drawn and its IoU in the title).
    """
    rows = len(panels)
    if rows == 0:
        raise ValueError("compare_masks needs at least one panel")
    fig = Figure(figsize=(3 * panel_size, rows * panel_size), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, panel in zip(axes, panels):
        columns = (
            (f"GT · {panel.label}", gt, GT_COLOR, None),
            ("SAM", panel.sam_mask, SAM_COLOR, panel.sam_iou),
            ("Stable-SAM", panel.stable_mask, STABLE_COLOR, panel.stable_iou),
        )
        for ax, (name, mask, color, iou) in zip(row, columns):
            overlay_mask(ax, image, mask, color=color)
            draw_prompt(ax, panel.prompt, scale=prompt_scale)
            ax.set_title(name if iou is None else f"{name}: IoU {100 * iou:.1f}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def offsets_figure(
    image: np.ndarray,
    entries: Sequence[tuple[str, object, np.ndarray, np.ndarray | None]],
    *,
    stride: int = 1,
    panel_size: float = 3.0,
    title: str | None = None,
) -> Figure:
    """DSP offsets for several prompts on one image (model frame).

    ``entries``: (label, prompt, offsets h' x w' x 2 or G x h' x w' x 2, mask or None) per panel;
    the mask (Stable-SAM's prediction in the model frame) is shaded under the arrows.
    """
    if not entries:
        raise ValueError("offsets_figure needs at least one entry")
    fig = Figure(figsize=(len(entries) * panel_size, panel_size), layout="constrained")
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    for ax, (label, prompt, offsets, mask) in zip(axes, entries):
        ax.imshow(image)
        if mask is not None:
            overlay_mask(ax, None, mask, color=STABLE_COLOR, alpha=0.35)
        draw_offsets(ax, None, offsets, input_size=image.shape[:2], stride=stride)
        draw_prompt(ax, prompt)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _curves_with_bands(
    ax: Any, x: np.ndarray, series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]]
) -> None:
    """One line per series over ``x``, with a ± std band where the stds are given."""
    for label, (means, stds) in series.items():
        means = np.asarray(means, np.float64)
        (line,) = ax.plot(x, means, marker="o", label=label)
        if stds is not None:
            stds = np.asarray(stds, np.float64)
            ax.fill_between(x, means - stds, means + stds, color=line.get_color(), alpha=0.2)


def sweep_figure(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    *,
    xlabel: str,
    ylabel: str = "mIoU (%)",
    title: str | None = None,
    log_x: bool = False,
    reference: Mapping[str, float] | None = None,
) -> Figure:
    """Curves with ± std bands: ``series`` maps a label to (means, stds or None) over ``x``.

    ``reference`` adds horizontal dashed lines (label -> y), e.g. SAM's value at α1 = 0.
    """
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.asarray(x, np.float64)
    _curves_with_bands(ax, x, series)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1.0, color="grey", label=label)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def looseness_figure(
    noise_scales: Sequence[float],
    box_series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    clicks: Sequence[int],
    click_series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
) -> Figure:
    """Two panels at a glance: mIoU (± std bands) against box noise scale, and against clicks."""
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, x, series in ((left, noise_scales, box_series), (right, clicks, click_series)):
        _curves_with_bands(ax, np.asarray(x, np.float64), series)
        ax.grid(alpha=0.3)
    left.set_xlabel("box noise scale (0 = GT box; looser to the right)")
    left.set_ylabel("mIoU (%)")
    right.set_xscale("log")
    right.set_xticks(np.asarray(clicks, np.float64))
    right.set_xticklabels([str(c) for c in clicks])
    right.set_xlabel("number of clicks (fewer = looser)")
    right.invert_xaxis()
    left.legend(fontsize=8)
    fig.suptitle("SAM vs Stable-SAM as prompts get looser (± std over prompt draws)", fontsize=10)
    return fig


def clicks_figure(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float] | None]]],
    *,
    thresholds: Sequence[float] = (),
) -> Figure:
    """mIoU (%) against the click number, one panel per dataset: ``curves`` maps a dataset to
    {model label: (means, stds or None)} over clicks 1..K; ``thresholds`` (in [0, 1]) are drawn as
    dotted lines (the NoC targets)."""
    fig = Figure(figsize=(5.0 * len(curves), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(curves), sharey=True))
    for ax, (dataset, series) in zip(axes, curves.items()):
        clicks = np.arange(1, 1 + max(len(means) for means, _ in series.values()))
        _curves_with_bands(ax, clicks, series)
        for threshold in thresholds:
            ax.axhline(100 * threshold, linestyle=":", linewidth=1.0, color="grey")
        ax.set_xticks(clicks[:: max(1, len(clicks) // 10)])
        ax.set_xlabel("click number")
        ax.set_title(f"{dataset}: mIoU per click (± std over targets)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[0].legend(fontsize=8)
    return fig
