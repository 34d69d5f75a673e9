"""The evaluation prompt protocol: prepared images, cached embeddings, prompts per kind and draw,
decoding with SAM and Stable-SAM, per-prompt records.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import Sample, prepare_eval_image
from ..embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingSpec, image_key
from ..metrics import boundary_iou, mask_iou, mask_to_boundary, stability
from ..modeling.stable_sam import PromptTensors, StableSam, group_by_structure
from ..prompts import Prompt, sample_prompt

__all__ = [
    "DETERMINISTIC_KINDS",
    "Decoded",
    "PreparedImage",
    "decode_prompts",
    "embed_images",
    "eval_prompts",
    "evaluate_prompts",
    "logits_to_masks",
    "prepare_image",
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
    model_id = model.encoder_id() if use_cache else ""
    keys = [
        image_key(im.input_image, model_id=model_id, preprocess=im.resize) if use_cache else None
        for im in images
    ]
    out: list[torch.Tensor | None] = [None] * len(images)
    missing = []
    prompt_encoder = model.sam.prompt_encoder
    shape = (1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)
    for i, key in enumerate(keys):
        # An entry of another shape (another SAM, a damaged file) is a miss: recomputed, overwritten.
        spec = EmbeddingSpec(
            shape=shape, input_size=images[i].input_size, original_size=images[i].original_size
        )
        entry = cache.get(key, spec) if use_cache else None
        if entry is None:
            missing.append(i)
        else:
            out[i] = entry.embedding
    device = model.device
    for start in tqdm(
        range(0, len(missing), batch_size), desc="embed", disable=not progress or not missing, mininterval=10
    ):
        chunk = missing[start : start + batch_size]
        shapes = {images[i].input_image.shape for i in chunk}
        groups = [chunk] if len(shapes) == 1 else [[i] for i in chunk]
        for group in groups:
            batch = torch.stack(
                [torch.as_tensor(images[i].input_image).permute(2, 0, 1) for i in group]
            ).float()
            embeddings = model.embed_images(batch.to(device)).cpu()
            for i, embedding in zip(group, embeddings):
                # clone: a view would keep (and torch.save would write) the whole batch's storage.
                out[i] = embedding[None].clone()
                if use_cache:
                    cache.put(
                        keys[i],
                        CachedEmbedding(out[i], images[i].input_size, images[i].original_size),
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
    draw_ids: Sequence[int] | None = None,
) -> list[Prompt]:
    """The prompts of one kind for one image: ``draws`` of them (1 for deterministic kinds).

    Draw ``d`` comes from ``np.random.default_rng([seed, d, image.index, crc32(kind)])``, so a
    prompt depends on nothing but these four numbers. ``draw_ids`` picks the draws explicitly
    (default ``range(draws)``): a sweep over "seeds" 0-4 reuses the evaluation's draws 0-4.
    """
    ids = _draw_ids(draws, draw_ids)
    if kind in DETERMINISTIC_KINDS:
        ids = ids[:1]
    return [
        sample_prompt(
            kind,
            image.frame_mask,
            generator=np.random.default_rng([seed, draw, image.index, _kind_id(kind)]),
            mask_input_size=mask_input_size,
            noise_scale=noise_scale,
            min_iou=min_iou,
        )
        for draw in ids
    ]


def _draw_ids(draws: int, draw_ids: Sequence[int] | None) -> list[int]:
    ids = list(range(draws)) if draw_ids is None else [int(d) for d in draw_ids]
    if not ids:
        raise ValueError("need at least one draw (draws >= 1 or a non-empty draw_ids)")
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"draw ids must be distinct non-negative integers, got {ids}")
    return ids


@dataclass
class Decoded:
    """Predictions for P prompts of one image.

    Attributes:
      masks: P x H x W bool at the original resolution.
      alpha1: (P,) routing weight α1, or None without (enabled) plug-ins.
      predicted_iou: (P,) SAM's IoU-head score.
      low_res_logits: P x h x w.
      offsets: P x G x h' x w' x 2 DSP offsets (feature pixels, (x, y)) of the main plug-in site,
        or None (no DSP, or plug-ins disabled).
    """

    masks: np.ndarray
    alpha1: np.ndarray | None
    predicted_iou: np.ndarray
    low_res_logits: torch.Tensor
    offsets: torch.Tensor | None = None


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
    offsets: list[torch.Tensor | None] = [None] * count
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
            if out.offsets is not None:
                offsets[i] = out.offsets[j].cpu()
    low_res = torch.stack(logits)
    return Decoded(
        masks=logits_to_masks(model, low_res, image),
        alpha1=None if np.isnan(alphas).all() else alphas,
        predicted_iou=ious,
        low_res_logits=low_res.cpu(),
        offsets=None if any(o is None for o in offsets) else torch.stack(offsets),
    )


def logits_to_masks(model: StableSam, low_res: torch.Tensor, image: PreparedImage) -> np.ndarray:
    """P x h x w low-res logits -> P x H x W bool masks at the image's original size."""
    low_res = low_res[:, None]
    if image.resize == "stretch":
        # HQ-SAM: no padding was added, so the low-res logits map straight onto the original size.
        full = F.interpolate(low_res, image.original_size, mode="bilinear", align_corners=False)
    else:
        full = model.sam.postprocess_masks(low_res, image.input_size, image.original_size)
    return (full[:, 0] > model.sam.mask_threshold).cpu().numpy()


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
    draw_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per-image records for every prompt kind, draw and model setting.

    Args:
      settings: name -> a context-manager factory for the model state, e.g.
        ``{"sam": model.plugins_disabled, "stable_sam": contextlib.nullcontext,
        "alpha1=0.4": lambda: model.forced_alpha1(0.4)}``. Prompts are drawn once per image and
        kind and shared by all settings.
      draw_ids: which draws to use (see :func:`eval_prompts`); default ``range(draws)``.

    Returns:
      One record per (image, kind, setting, draw): dataset, image, kind, setting, draw (the draw
      id), iou, biou (in [0, 1]), alpha1 (or None), predicted_iou; plus, per (image, kind,
      setting) with at least 2 draws, a record with draw = -1 holding the stability ``st`` of its
      draws. An image whose GT vanished in the model frame (a tiny object, resized away) gets no
      prompt and no record; a warning names it.
    """
    ids = _draw_ids(draws, draw_ids)
    mask_input_size = model.mask_input_size
    records: list[dict[str, Any]] = []
    pairs = list(zip(images, embeddings))
    for image, embedding in tqdm(pairs, desc=f"eval {dataset}", disable=not progress, mininterval=10):
        if not image.frame_mask.any():
            logger.warning("%s %s: the GT is empty in the model frame; image skipped", dataset, image.name)
            continue
        gt_boundary = mask_to_boundary(image.mask)  # once per image, for every prediction
        for kind in kinds:
            prompts = eval_prompts(
                image,
                kind,
                draws=len(ids),
                seed=seed,
                mask_input_size=mask_input_size,
                noise_scale=noise_scale,
                min_iou=min_iou,
                draw_ids=ids,
            )
            for setting, context in settings.items():
                with context():
                    decoded = decode_prompts(
                        model, embedding, prompts, image=image, multimask_output=multimask_output
                    )
                base = {"dataset": dataset, "image": image.name, "kind": kind, "setting": setting}
                for j, mask in enumerate(decoded.masks):
                    records.append(
                        {
                            **base,
                            "draw": ids[j],
                            "iou": mask_iou(image.mask, mask),
                            "biou": boundary_iou(image.mask, mask, gt_boundary=gt_boundary),
                            "alpha1": None if decoded.alpha1 is None else float(decoded.alpha1[j]),
                            "predicted_iou": float(decoded.predicted_iou[j]),
                        }
                    )
                if len(decoded.masks) >= 2:
                    records.append({**base, "draw": -1, "st": stability(list(decoded.masks))})
    return records
