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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import CocoSample, Sample, prepare_eval_image, resize_mask_longest_side, resize_mask_stretch
from .embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingSpec, image_key
from .metrics import boundary_iou, encode_mask, mask_iou, mask_to_boundary, stability
from .modeling.stable_sam import PromptTensors, StableSam, group_by_structure
from .prompts import NoisyBoxError, Prompt, box_from_mask, draw_prompt, noisy_box

__all__ = [
    "COCO_NOISE_SCALES",
    "DETERMINISTIC_KINDS",
    "CocoImage",
    "CocoResult",
    "Decoded",
    "PreparedImage",
    "ReadOnlyEmbeddingCache",
    "coco_gt_subset",
    "coco_noisy_box_detections",
    "coco_noisy_boxes",
    "decode_prompts",
    "embed_images",
    "eval_prompts",
    "evaluate_prompts",
    "per_image_rows",
    "prepare_coco_image",
    "prepare_image",
    "summarize",
]

logger = logging.getLogger(__name__)

# Kinds whose prompt does not depend on the random draw: evaluated once.
DETERMINISTIC_KINDS = ("gt_box", "oracle_point")
# COCO "N-Box (0.5-0.6)": box noise scales tried in turn until a box lands in the IoU window
# (method spec 5.4: scale 0.4, escalated to 0.6 / 0.8 when 100 draws fail).
COCO_NOISE_SCALES = (0.4, 0.6, 0.8)


class ReadOnlyEmbeddingCache(EmbeddingCache):
    """An :class:`EmbeddingCache` that reads a folder written by someone else and never writes it.

    Pipeline stages read the ``embed`` stage's output through it: a miss is computed and kept in
    memory only, so no stage modifies another stage's DVC output. ``computed`` counts those misses.
    """

    def __init__(self, directory: str | Path | None = None, *, max_memory_items: int = 100_000) -> None:
        super().__init__(directory, max_memory_items=max_memory_items)
        self.computed = 0

    def put(self, key: str, entry: CachedEmbedding) -> None:
        self.computed += 1
        self._remember(
            key,
            CachedEmbedding(
                entry.embedding.detach().cpu(), tuple(entry.input_size), tuple(entry.original_size)
            ),
        )


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
        draw_prompt(
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
        offsets=None if any(o is None for o in offsets) else torch.stack(offsets),
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


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate records into {setting: {kind: figures}} in percent, the paper's layout.

    Figures: ``miou`` / ``mbiou`` = mean over draws of the dataset mean over images (for one
    dataset; several datasets are macro-averaged, HQ-SAM's convention), ``miou_std`` = std over
    draws of that dataset-level mIoU (Table S6's ±), ``st`` = mean over images of the stability
    of the draws (random kinds only), ``alpha1`` = mean α1 over images and draws, macro-averaged
    over datasets (plug-in settings only), ``n`` = images.
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
        # Macro average over datasets, like every other figure (Table S7 averages 4 datasets).
        alphas = [
            _nanmean(r["alpha1"] for r in predictions if r["dataset"] == ds and r.get("alpha1") is not None)
            for ds in datasets
        ]
        alphas = [a for a in alphas if not math.isnan(a)]
        if alphas:
            figures["alpha1"] = float(np.mean(alphas))
        summary[setting][kind] = figures
    return dict(summary)


def per_image_rows(
    records: Sequence[dict[str, Any]], *, baseline: str = "sam", model: str = "stable_sam"
) -> list[dict[str, Any]]:
    """One row per (dataset, image, kind): baseline vs model, averaged over the draws.

    Columns: dataset, image, kind, draws, ``iou_<setting>``, ``biou_<setting>``, ``st_<setting>``
    (random kinds), ``predicted_iou_<setting>`` for both settings, ``delta_iou`` / ``delta_biou``
    (model - baseline) and ``alpha1`` (the model's mean α1, if it routes). Values in [0, 1];
    sorting by ``delta_iou`` shows where the model loses to the baseline.
    """
    grouped: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in records:
        if r["setting"] in (baseline, model):
            grouped[(r["dataset"], r["image"], r["kind"])][r["setting"]].append(r)
    rows = []
    for (dataset, image, kind), by_setting in grouped.items():
        row: dict[str, Any] = {"dataset": dataset, "image": image, "kind": kind}
        for setting in (baseline, model):
            preds = [r for r in by_setting.get(setting, []) if r["draw"] >= 0]
            st = [r["st"] for r in by_setting.get(setting, []) if r["draw"] == -1]
            row["draws"] = max(row.get("draws", 0), len(preds))
            row[f"iou_{setting}"] = _nanmean(r["iou"] for r in preds)
            row[f"biou_{setting}"] = _nanmean(r["biou"] for r in preds)
            row[f"st_{setting}"] = st[0] if st else float("nan")
            row[f"predicted_iou_{setting}"] = _nanmean(r["predicted_iou"] for r in preds)
            if setting == model:
                row["alpha1"] = _nanmean(r["alpha1"] for r in preds if r.get("alpha1") is not None)
        row["delta_iou"] = row[f"iou_{model}"] - row[f"iou_{baseline}"]
        row["delta_biou"] = row[f"biou_{model}"] - row[f"biou_{baseline}"]
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["image"], r["kind"]))
    return rows


# ------------------------------------------------------------------------------------------------
# COCO: mask AP with noisy boxes ("N-Box (0.5-0.6)", method spec 5.4)


@dataclass
class CocoImage:
    """One COCO image in the model frame, with its instances.

    Attributes:
      image: the image as a :class:`PreparedImage` (its ``mask`` is the union of the instances,
        used for the original size; ``frame_mask`` likewise in the model frame).
      image_id: COCO image id.
      frame_masks: N x h x w bool instance masks in the model frame.
      masks: N x H x W bool instance masks at the original resolution.
      category_ids, annotation_ids: N int64.
    """

    image: PreparedImage
    image_id: int
    frame_masks: np.ndarray
    masks: np.ndarray
    category_ids: np.ndarray
    annotation_ids: np.ndarray


def prepare_coco_image(sample: CocoSample, *, index: int, resize: str, image_size: int) -> CocoImage:
    """Bring a :class:`stable_sam.data.CocoSample` to the model frame (as :func:`prepare_image`)."""
    union = sample.masks.any(axis=0) if len(sample.masks) else np.zeros(sample.image.shape[:2], bool)
    image, frame_union, input_size = prepare_eval_image(
        sample.image, union, mode=resize, target_length=image_size
    )
    if resize == "stretch":
        frame_masks = [resize_mask_stretch(m, image_size) for m in sample.masks]
    else:
        frame_masks = [resize_mask_longest_side(m, image_size) for m in sample.masks]
    prepared = PreparedImage(
        name=sample.file_name,
        index=index,
        input_image=image,
        frame_mask=frame_union,
        mask=union,
        input_size=tuple(input_size),
        resize=resize,
    )
    return CocoImage(
        image=prepared,
        image_id=int(sample.image_id),
        frame_masks=np.stack(frame_masks) if frame_masks else np.zeros((0, *input_size), bool),
        masks=sample.masks,
        category_ids=np.asarray(sample.category_ids, np.int64),
        annotation_ids=np.asarray(sample.annotation_ids, np.int64),
    )


def _reference_box(coco: CocoImage, j: int) -> np.ndarray | None:
    """The GT box of instance j in the model frame: from its resized mask, else its scaled box."""
    if coco.frame_masks[j].any():
        return box_from_mask(coco.frame_masks[j])
    if not coco.masks[j].any():
        return None
    # A thin object that the resize erased: scale its original-resolution box into the frame.
    box = box_from_mask(coco.masks[j]).astype(np.float64)
    (height, width), (h_in, w_in) = coco.masks[j].shape, coco.image.input_size
    scale = np.array([w_in / width, h_in / height] * 2)
    upper = np.array([w_in - 1, h_in - 1] * 2, np.float64)
    return np.clip(box * scale, 0.0, upper).astype(np.float32)


@dataclass
class CocoResult:
    """Detections of one setting, plus how the prompts came about.

    Attributes:
      detections: COCO result dicts (image_id, category_id, segmentation RLE, score).
      prompted: instances that got a noisy box.
      skipped: instances without one (empty mask, or no box in the IoU window at any scale).
      escalated: instances whose box needed a noise scale above the first.
    """

    detections: list[dict[str, Any]] = field(default_factory=list)
    prompted: int = 0
    skipped: int = 0
    escalated: int = 0


def coco_noisy_boxes(
    coco: CocoImage,
    *,
    seed: int,
    min_iou: float = 0.5,
    max_iou: float = 0.6,
    noise_scales: Sequence[float] = COCO_NOISE_SCALES,
) -> tuple[list[Prompt], list[int], int]:
    """One noisy box per instance with min_iou <= IoU(box, GT box) <= max_iou.

    Instance j draws from ``np.random.default_rng([seed, image_id, annotation_id])``; the noise
    scales are tried in turn (100 draws each). Returns (prompts, instance indices, escalated).
    """
    prompts, kept, escalated = [], [], 0
    for j in range(len(coco.frame_masks)):
        reference = _reference_box(coco, j)
        if reference is None:
            continue
        generator = np.random.default_rng([seed, coco.image_id, int(coco.annotation_ids[j])])
        for attempt, scale in enumerate(noise_scales):
            try:
                box = noisy_box(
                    reference,
                    image_size=coco.image.input_size,
                    generator=generator,
                    noise_scale=scale,
                    min_iou=min_iou,
                    max_iou=max_iou,
                )
            except NoisyBoxError:
                continue
            prompts.append(Prompt("noisy_box", box=box))
            kept.append(j)
            escalated += attempt > 0
            break
    return prompts, kept, escalated


@torch.no_grad()
def coco_noisy_box_detections(
    model: StableSam,
    images: Sequence[CocoImage],
    embeddings: Sequence[torch.Tensor],
    *,
    settings: dict[str, Any],
    seed: int,
    min_iou: float = 0.5,
    max_iou: float = 0.6,
    noise_scales: Sequence[float] = COCO_NOISE_SCALES,
    progress: bool = True,
) -> dict[str, CocoResult]:
    """COCO detections under the "N-Box (0.5-0.6)" protocol, per model setting.

    Every instance is prompted with a noisy version of its GT box whose IoU with it lies in
    [min_iou, max_iou] (:func:`coco_noisy_boxes`; the same boxes for every setting), SAM's
    single-mask output is kept, the score is SAM's predicted IoU and the category is the GT one.
    Feed the result to :func:`stable_sam.metrics.coco_mask_ap` with :func:`coco_gt_subset`.
    """
    results = {name: CocoResult() for name in settings}
    for coco, embedding in tqdm(
        list(zip(images, embeddings)), desc="coco", disable=not progress, mininterval=10
    ):
        prompts, kept, escalated = coco_noisy_boxes(
            coco, seed=seed, min_iou=min_iou, max_iou=max_iou, noise_scales=noise_scales
        )
        for name, context in settings.items():
            result = results[name]
            result.prompted += len(kept)
            result.skipped += len(coco.frame_masks) - len(kept)
            result.escalated += escalated
            if not prompts:
                continue
            with context():
                decoded = decode_prompts(model, embedding, prompts, image=coco.image, multimask_output=False)
            for mask, score, j in zip(decoded.masks, decoded.predicted_iou, kept):
                result.detections.append(
                    {
                        "image_id": coco.image_id,
                        "category_id": int(coco.category_ids[j]),
                        "segmentation": encode_mask(mask),
                        "score": float(score),
                    }
                )
    return results


def coco_gt_subset(dataset: dict[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """A COCO-format dict restricted to ``image_ids`` (all their annotations, crowd ones included)."""
    keep = set(image_ids)
    return {
        "images": [img for img in dataset["images"] if img["id"] in keep],
        "annotations": [a for a in dataset["annotations"] if a["image_id"] in keep],
        "categories": list(dataset["categories"]),
    }
