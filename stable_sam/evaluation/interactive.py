"""Interactive segmentation: the RITM click protocol, NoC@IoU and mIoU per click.

The standard protocol (RITM's ``isegm/inference``; the supplement's SAM-based setting):

- click 1 is :func:`stable_sam.prompts.oracle_point` of the GT (the interior point farthest from
  its boundary); click k + 1 is the centre of the largest error region of prediction k (positive
  in a false-negative region, negative in a false-positive one), never on a pixel clicked before;
- every prediction sees all clicks so far and, from click 2 on, the previous prediction's low-res
  logits as SAM's ``mask_input`` (mask feedback);
- with ``multimask_output`` (the supplement keeps SAM's default, True) the mask with the highest
  predicted IoU of the 3 is kept, and its logits are fed back;
- up to ``max_clicks`` (20) clicks; NoC@t is the first click whose IoU reaches t, or
  ``max_clicks`` when none does (RITM's convention).

Frames: clicks are placed where the IoU is measured, on the GT and the prediction at the original
resolution (as RITM does), and scaled into the model frame for the prompt the way
``SamPredictor``'s ``ResizeLongestSide.apply_coords`` scales them (x · w/W, y · h/H). The encoder
does not run here: the caller passes the image's cached embedding (:func:`embed_images`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..metrics import mask_iou
from ..modeling.stable_sam import StableSam
from ..prompts import Prompt, oracle_point
from .protocol import Decoded, PreparedImage, decode_prompts

__all__ = [
    "ClickTrace",
    "click_trace",
    "frame_points",
    "model_decoder",
    "number_of_clicks",
    "summarize_traces",
]

# One prompt in the model frame -> the prediction for it (a :class:`Decoded` of one prompt).
Decoder = Callable[[Prompt], Decoded]


@dataclass
class ClickTrace:
    """One target followed through the click protocol.

    Attributes:
      name: the image's name.
      ious: (max_clicks,) IoU with the GT after click 1, 2, ... at the original resolution. When
        no error is left outside clicked pixels the protocol stops and the last IoU carries on.
      points: K x 2 float32 clicks (x, y) at the original resolution (K <= max_clicks).
      labels: (K,) 1 positive, 0 negative.
      predicted_iou: (K,) SAM's IoU-head score of each kept mask.
    """

    name: str
    ious: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    predicted_iou: np.ndarray


def frame_points(points: np.ndarray, image: PreparedImage) -> np.ndarray:
    """N x 2 (x, y) at the original resolution -> the model frame (``apply_coords``' scaling)."""
    (height, width), (h_in, w_in) = image.original_size, image.input_size
    return (np.asarray(points, np.float32) * np.array([w_in / width, h_in / height], np.float32)).astype(
        np.float32
    )


def model_decoder(
    model: StableSam, embedding: torch.Tensor, image: PreparedImage, *, multimask_output: bool = True
) -> Decoder:
    """The :data:`Decoder` of ``model`` on one image (1 x C x H x W embedding), in its current
    state (run it inside ``model.plugins_disabled()`` for SAM)."""

    def decode(prompt: Prompt) -> Decoded:
        return decode_prompts(model, embedding, [prompt], image=image, multimask_output=multimask_output)

    return decode


def click_trace(
    decode: Decoder, image: PreparedImage, *, max_clicks: int = 20, mask_feedback: bool = True
) -> ClickTrace:
    """Run the click protocol on one target.

    Args:
      decode: predicts one prompt (:func:`model_decoder`; tests pass a fake).
      image: the target (its ``mask`` at the original resolution is the GT).
      max_clicks: clicks per target.
      mask_feedback: feed the previous low-res logits back as ``mask_input`` (the protocol; False
        only to measure what the feedback does).
    """
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    gt = np.asarray(image.mask, bool)
    if not gt.any():
        raise ValueError(f"{image.name}: the GT is empty, there is nothing to click on")
    not_clicked = np.ones_like(gt)
    pred: np.ndarray | None = None
    logits: np.ndarray | None = None
    points: list[np.ndarray] = []
    labels: list[int] = []
    ious: list[float] = []
    scores: list[float] = []
    for _ in range(max_clicks):
        try:
            point, label = oracle_point(gt, pred, not_clicked=not_clicked)
        except ValueError:  # nothing left to correct: the result stands for the remaining clicks
            ious.append(ious[-1])
            continue
        points.append(point)
        labels.append(label)
        not_clicked[int(point[1]), int(point[0])] = False
        prompt = Prompt(
            "interactive",
            point_coords=frame_points(np.stack(points), image),
            point_labels=np.asarray(labels, np.int64),
            mask_input=logits if mask_feedback else None,
        )
        decoded = decode(prompt)
        pred = decoded.masks[0]
        logits = decoded.low_res_logits[0].detach().cpu().numpy()  # h x w, the kept mask's logits
        ious.append(mask_iou(gt, pred))
        scores.append(float(decoded.predicted_iou[0]))
    return ClickTrace(
        name=image.name,
        ious=np.asarray(ious, np.float64),
        points=np.stack(points).astype(np.float32),
        labels=np.asarray(labels, np.int64),
        predicted_iou=np.asarray(scores, np.float32),
    )


def number_of_clicks(ious: Sequence[float], threshold: float, *, max_clicks: int) -> int:
    """NoC@threshold: the first click (1-based) whose IoU reaches ``threshold``, else ``max_clicks``."""
    reached = np.flatnonzero(np.asarray(ious, np.float64)[:max_clicks] >= threshold)
    return int(reached[0]) + 1 if reached.size else int(max_clicks)


def summarize_traces(
    traces: Sequence[ClickTrace], *, thresholds: Sequence[float], max_clicks: int
) -> dict[str, Any]:
    """The protocol's figures over N targets (percent for IoUs).

    Returns:
      ``n`` (targets); ``miou`` and ``miou_std`` (max_clicks,): mean and std over the targets of
      the IoU after each click; ``miou_<k>`` for k = 1, 5, 20 (those <= max_clicks); per threshold
      t (as a percent, e.g. 85): ``noc<t>`` the mean NoC@t, ``noc<t>_std`` its std, ``nof<t>``
      the targets that never reach t within max_clicks.
    """
    if not traces:
        raise ValueError("no click traces to summarize")
    ious = np.stack([t.ious[:max_clicks] for t in traces])  # N x max_clicks
    miou = 100 * ious.mean(axis=0)
    summary: dict[str, Any] = {
        "n": len(traces),
        "miou": miou.tolist(),
        "miou_std": (100 * ious.std(axis=0)).tolist(),
    }
    for k in (1, 5, 20):
        if k <= max_clicks:
            summary[f"miou_{k}"] = float(miou[k - 1])
    for threshold in thresholds:
        tag = f"{round(100 * threshold):d}"
        nocs = np.array([number_of_clicks(t.ious, threshold, max_clicks=max_clicks) for t in traces])
        reached = np.array([bool((t.ious[:max_clicks] >= threshold).any()) for t in traces])
        summary[f"noc{tag}"] = float(nocs.mean())
        summary[f"noc{tag}_std"] = float(nocs.std())
        summary[f"nof{tag}"] = int((~reached).sum())
    return summary
