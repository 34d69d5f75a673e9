"""stable_sam.visualize: offsets arrows land where the plug-in samples, figures render to PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from stable_sam.prompts import Prompt
from stable_sam.visualize import (
    MaskPanel,
    compare_masks,
    draw_offsets,
    offsets_figure,
    overlay_mask,
    sweep_figure,
)


def _png(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def test_offsets_arrows_start_at_cell_centres_and_scale_to_image_pixels():
    offsets = np.zeros((4, 4, 2), np.float32)
    offsets[1, 2] = (1.0, -0.5)  # feature pixels (x, y)
    ax = Figure().subplots()
    count = draw_offsets(ax, np.zeros((64, 64, 3), np.uint8), offsets, min_length=1e-3)
    assert count == 1
    quiver = ax.collections[-1]
    # cell (row 1, col 2) of a 4 x 4 grid over 64 px: centre (40, 24); 1 feature px = 16 image px
    np.testing.assert_allclose(quiver.get_offsets(), [[40.0, 24.0]])
    np.testing.assert_allclose(quiver.U, [16.0])
    np.testing.assert_allclose(quiver.V, [-8.0])


def test_offsets_groups_are_averaged_and_stride_thins_the_grid():
    offsets = np.ones((2, 8, 8, 2), np.float32)
    offsets[1] *= 3.0
    ax = Figure().subplots()
    assert draw_offsets(ax, None, offsets, input_size=(32, 32), stride=2) == 16
    np.testing.assert_allclose(ax.collections[-1].U, 8.0)  # mean offset 2 feature px x 4 px/cell
    with pytest.raises(ValueError, match="h x w x 2"):
        draw_offsets(ax, None, np.zeros((4, 4)), input_size=(8, 8))


def test_overlay_mask_colours_only_the_mask():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    ax = Figure().subplots()
    overlay_mask(ax, None, mask, color=(1.0, 0.0, 0.0), alpha=0.5)
    rgba = ax.images[-1].get_array()
    assert rgba[mask, 3].min() == pytest.approx(0.5) and rgba[~mask, 3].max() == 0.0


def test_compare_masks_has_one_row_per_prompt_and_renders():
    image = np.full((32, 32, 3), 90, np.uint8)
    gt = np.zeros((32, 32), bool)
    gt[8:20, 8:20] = True
    panels = [
        MaskPanel("noisy box", Prompt("noisy_box", box=np.array([6, 6, 22, 22])), gt, ~gt, 1.0, 0.0),
        MaskPanel(
            "1 click",
            Prompt("point_1", point_coords=np.array([[12, 12]]), point_labels=np.array([1])),
            gt,
            gt,
            1.0,
            1.0,
        ),
    ]
    fig = compare_masks(image, gt, panels, title="x")
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:3]] == [
        "GT · noisy box",
        "SAM: IoU 100.0",
        "Stable-SAM: IoU 0.0",
    ]
    assert _png(fig).shape[2] == 4
    with pytest.raises(ValueError):
        compare_masks(image, gt, [])


def test_offsets_figure_and_sweep_figure_render():
    image = np.zeros((32, 32, 3), np.uint8)
    prompt = Prompt("gt_box", box=np.array([4, 4, 20, 20]))
    fig = offsets_figure(
        image,
        [("a", prompt, np.ones((4, 4, 2)), None), ("b", prompt, np.zeros((1, 4, 4, 2)), image[..., 0] > 0)],
    )
    assert len(fig.axes) == 2 and _png(fig).ndim == 3
    fig = sweep_figure(
        [1, 3, 10],
        {"SAM": ([40.0, 70.0, 80.0], [1.0, 1.0, 0.5]), "Stable-SAM": ([70.0, 80.0, 85.0], None)},
        xlabel="points",
        log_x=True,
        reference={"ref": 50.0},
    )
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["SAM", "Stable-SAM", "ref"]
    assert len(ax.collections) == 1  # one ± std band
    assert _png(fig).ndim == 3
