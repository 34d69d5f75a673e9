"""Evaluation at decoder cost: embed each image once, then decode every prompt, model and setting.

The protocol follows HQ-SAM's evaluation and the method spec (sections 5 and 6): the image and its
GT are brought to the model frame ("stretch": squashed to S x S like HQ-SAM, or "longest_side" like
SamPredictor), prompts are drawn from the GT in that frame, and the predicted low-res logits are
brought back to the original resolution, where IoU and Boundary IoU are measured (logit > 0 vs
GT). Random prompt kinds are drawn ``draws`` times from ``np.random.default_rng([seed, draw,
image, kind])``, so every model and every routing setting sees the very same prompts.

The image encoder never runs inside the loops: :func:`embed_images` computes (or fetches from an
:class:`EmbeddingCache`) one embedding per image and model input, which every prompt kind, draw,
model (SAM = the same weights with plug-ins off) and sweep point reuses.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Sample, prepare_eval_image
from .embedding_cache import CachedEmbedding, EmbeddingCache, image_key
from .metrics import boundary_iou, mask_iou, stability
from .modeling.stable_sam import PromptTensors, StableSam, group_by_structure
from .prompts import Prompt, draw_prompt

__all__ = [
    "DETERMINISTIC_KINDS",
    "Decoded",
    "PreparedImage",
    "decode_prompts",
    "embed_images",
    "eval_prompts",
    "evaluate_prompts",
    "prepare_image",
    "summarize",
]

logger = logging.getLogger(__name__)

# Kinds whose prompt does not depend on the random draw: evaluated once.
DETERMINISTIC_KINDS = ("gt_box", "oracle_point")


@dataclass
class PreparedImage:
    """One evaluation image in both frames.

    Attributes:
      name: sample name.
      index: position in its dataset (part of the prompt seed).
      input_image: uint8 h x w x 3 in the model frame.
      frame_mask: bool h x w GT in the model frame (prompts are drawn from it).
      mask: bool H x W GT at the original resolution (metrics are measured on it).
      input_size: (h, w) of the image inside the model's S x S input.
      resize: "stretch" or "longest_side".
    """

    name: str
    index: int
    input_image: np.ndarray
    frame_mask: np.ndarray
    mask: np.ndarray
    input_size: tuple[int, int]
    resize: str

    @property
    def original_size(self) -> tuple[int, int]:
        return tuple(self.mask.shape)


def prepare_image(sample: Sample, *, index: int, resize: str, image_size: int) -> PreparedImage:
    """Bring a :class:`Sample` to the model frame (see :func:`stable_sam.data.prepare_eval_image`)."""
    image, frame_mask, input_size = prepare_eval_image(
        sample.image, sample.mask, mode=resize, target_length=image_size
    )
    return PreparedImage(
        name=sample.name,
        index=index,
        input_image=image,
        frame_mask=frame_mask,
        mask=sample.mask,
        input_size=tuple(input_size),
        resize=resize,
    )


@torch.no_grad()
def embed_images(
    model: StableSam,
    images: Sequence[PreparedImage],
    *,
    cache: EmbeddingCache | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[torch.Tensor]:
    """One 1 x C x H x W embedding per image, from ``cache`` when possible.

    Models whose encoder is tuned (LoRA/adapters) cannot use a cache: they are embedded afresh
    and a log line says so.
    """
    use_cache = cache is not None and model.encoder_is_frozen
    if cache is not None and not use_cache:
        logger.info("encoder is tuned (%s): embedding cache bypassed", model.tuning.encoder)
    model_id = f"{model.sam_type}:{model.encoder_fingerprint()}" if use_cache else ""
    keys = [
        image_key(im.input_image, model_id=model_id, preprocess=im.resize) if use_cache else None
        for im in images
    ]
    out: list[torch.Tensor | None] = [None] * len(images)
    missing = []
    for i, key in enumerate(keys):
        entry = cache.get(key) if use_cache else None
        if entry is None:
            missing.append(i)
        else:
            out[i] = entry.embedding
    device = model.device
    for start in tqdm(range(0, len(missing), batch_size), desc="embed", disable=not progress or not missing):
        chunk = missing[start : start + batch_size]
        shapes = {images[i].input_image.shape for i in chunk}
        groups = [chunk] if len(shapes) == 1 else [[i] for i in chunk]
        for group in groups:
            batch = torch.stack(
                [torch.as_tensor(images[i].input_image).permute(2, 0, 1) for i in group]
            ).float()
            embeddings = model.embed_images(batch.to(device)).cpu()
            for i, embedding in zip(group, embeddings):
                out[i] = embedding[None]
                if use_cache:
                    cache.put(
                        keys[i],
                        CachedEmbedding(embedding[None], images[i].input_size, images[i].original_size),
                    )
    return out


def _kind_id(kind: str) -> int:
    return zlib.crc32(kind.encode())


def eval_prompts(
    image: PreparedImage,
    kind: str,
    *,
    draws: int,
    seed: int,
    mask_input_size: tuple[int, int],
    noise_scale: float = 0.4,
    min_iou: float = 0.5,
) -> list[Prompt]:
    """The prompts of one kind for one image: ``draws`` of them (1 for deterministic kinds)."""
    count = 1 if kind in DETERMINISTIC_KINDS else draws
    return [
        draw_prompt(
            kind,
            image.frame_mask,
            generator=np.random.default_rng([seed, draw, image.index, _kind_id(kind)]),
            mask_input_size=mask_input_size,
            noise_scale=noise_scale,
            min_iou=min_iou,
        )
        for draw in range(count)
    ]


@dataclass
class Decoded:
    """Predictions for P prompts of one image.

    Attributes:
      masks: P x H x W bool at the original resolution.
      alpha1: (P,) routing weight α1, or None without (enabled) plug-ins.
      predicted_iou: (P,) SAM's IoU-head score.
      low_res_logits: P x h x w.
    """

    masks: np.ndarray
    alpha1: np.ndarray | None
    predicted_iou: np.ndarray
    low_res_logits: torch.Tensor


@torch.no_grad()
def decode_prompts(
    model: StableSam,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    *,
    image: PreparedImage,
    multimask_output: bool = False,
) -> Decoded:
    """Decode prompts on one image embedding; prompts of equal structure share one decoder call.

    With ``multimask_output`` the mask with the highest predicted IoU of the 3 is kept.
    """
    device = model.device
    embedding = embedding.to(device)
    count = len(prompts)
    logits = [None] * count
    ious = np.zeros(count, np.float32)
    alphas = np.full(count, np.nan, np.float32)
    for indices in group_by_structure(prompts):
        batch = PromptTensors.stack([prompts[i] for i in indices], device)
        out = model.decode(embedding, batch, multimask_output=multimask_output)
        best = out.iou_predictions.argmax(dim=1)
        rows = torch.arange(len(indices), device=best.device)
        chosen = out.low_res_logits[rows, best]
        for j, i in enumerate(indices):
            logits[i] = chosen[j]
            ious[i] = float(out.iou_predictions[j, best[j]])
            if out.routing is not None:
                alphas[i] = float(out.routing[j, 0])
    low_res = torch.stack(logits)[:, None]
    if image.resize == "stretch":
        # HQ-SAM: no padding was added, so the low-res logits map straight onto the original size.
        full = F.interpolate(low_res, image.original_size, mode="bilinear", align_corners=False)
    else:
        full = model.sam.postprocess_masks(low_res, image.input_size, image.original_size)
    masks = (full[:, 0] > model.sam.mask_threshold).cpu().numpy()
    return Decoded(
        masks=masks,
        alpha1=None if np.isnan(alphas).all() else alphas,
        predicted_iou=ious,
        low_res_logits=low_res[:, 0].cpu(),
    )


def evaluate_prompts(
    model: StableSam,
    images: Sequence[PreparedImage],
    embeddings: Sequence[torch.Tensor],
    *,
    kinds: Sequence[str],
    draws: int,
    seed: int,
    settings: dict[str, Any],
    noise_scale: float = 0.4,
    min_iou: float = 0.5,
    multimask_output: bool = False,
    dataset: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-image records for every prompt kind, draw and model setting.

    Args:
      settings: name -> a context-manager factory for the model state, e.g.
        ``{"sam": model.plugins_disabled, "stable_sam": contextlib.nullcontext,
        "alpha1=0.4": lambda: model.forced_alpha1(0.4)}``. Prompts are drawn once per image and
        kind and shared by all settings.

    Returns:
      One record per (image, kind, setting, draw): dataset, image, kind, setting, draw, iou,
      biou (in [0, 1]), alpha1 (or None), predicted_iou; plus, per (image, kind, setting) with
      at least 2 draws, a record with draw = -1 holding the stability ``st`` of its draws.
    """
    mask_input_size = model.mask_input_size
    records: list[dict[str, Any]] = []
    for image, embedding in tqdm(list(zip(images, embeddings)), desc=f"eval {dataset}", disable=not progress):
        for kind in kinds:
            prompts = eval_prompts(
                image,
                kind,
                draws=draws,
                seed=seed,
                mask_input_size=mask_input_size,
                noise_scale=noise_scale,
                min_iou=min_iou,
            )
            for setting, context in settings.items():
                with context():
                    decoded = decode_prompts(
                        model, embedding, prompts, image=image, multimask_output=multimask_output
                    )
                base = {"dataset": dataset, "image": image.name, "kind": kind, "setting": setting}
                for draw, mask in enumerate(decoded.masks):
                    records.append(
                        {
                            **base,
                            "draw": draw,
                            "iou": mask_iou(image.mask, mask),
                            "biou": boundary_iou(image.mask, mask),
                            "alpha1": None if decoded.alpha1 is None else float(decoded.alpha1[draw]),
                            "predicted_iou": float(decoded.predicted_iou[draw]),
                        }
                    )
                if len(decoded.masks) >= 2:
                    records.append({**base, "draw": -1, "st": stability(list(decoded.masks))})
    return records


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate records into {setting: {kind: figures}} in percent, the paper's layout.

    Figures: ``miou`` / ``mbiou`` = mean over draws of the dataset mean over images (for one
    dataset; several datasets are macro-averaged, HQ-SAM's convention), ``miou_std`` = std over
    draws of that dataset-level mIoU (Table S6's ±), ``st`` = mean over images of the stability
    of the draws (random kinds only), ``alpha1`` = mean α1 (plug-in settings only), ``n`` = images.
    """
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[(record["setting"], record["kind"])].append(record)
    summary: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (setting, kind), rows in by_key.items():
        predictions = [r for r in rows if r["draw"] >= 0]
        datasets = sorted({r["dataset"] for r in predictions})
        per_draw: dict[int, list[float]] = defaultdict(list)
        per_draw_b: dict[int, list[float]] = defaultdict(list)
        for draw in sorted({r["draw"] for r in predictions}):
            for ds in datasets:
                sel = [r for r in predictions if r["draw"] == draw and r["dataset"] == ds]
                per_draw[draw].append(_nanmean(r["iou"] for r in sel))
                per_draw_b[draw].append(_nanmean(r["biou"] for r in sel))
        draw_miou = [float(np.mean(v)) for v in per_draw.values()]
        draw_mbiou = [float(np.mean(v)) for v in per_draw_b.values()]
        figures = {
            "miou": 100 * float(np.mean(draw_miou)),
            "miou_std": 100 * float(np.std(draw_miou)),
            "mbiou": 100 * float(np.mean(draw_mbiou)),
            "n": len({(r["dataset"], r["image"]) for r in predictions}),
        }
        st_rows = [r for r in rows if r["draw"] == -1]
        if st_rows:
            figures["st"] = 100 * float(
                np.mean([_nanmean(r["st"] for r in st_rows if r["dataset"] == ds) for ds in datasets])
            )
        alphas = [r["alpha1"] for r in predictions if r.get("alpha1") is not None]
        if alphas:
            figures["alpha1"] = float(np.mean(alphas))
        summary[setting][kind] = figures
    return dict(summary)
