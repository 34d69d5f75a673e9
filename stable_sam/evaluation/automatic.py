"""Automatic mask generation with Stable-SAM, and its class-agnostic COCO evaluation.

segment-anything's ``SamAutomaticMaskGenerator`` prompts a grid of single points (exactly where
SAM is weakest). It takes a ``Sam`` and calls ``sam.mask_decoder(...)`` directly, through its own
``SamPredictor``. Stable-SAM's plug-ins live inside that decoder instance, and the DRP reads its
output token from the attention query itself (:class:`stable_sam.modeling.OutputTokenReader`),
not from anything :meth:`StableSam.decode` sets up, so ``SamAutomaticMaskGenerator(model.sam)``
runs Stable-SAM as it is, and ``with model.plugins_disabled():`` runs SAM. Nothing is forked: the
only addition is :class:`CachedSamPredictor`, a ``SamPredictor`` whose encoder is
:meth:`StableSam.embed_images` (so the encoder fast path applies) and whose ``set_image`` reads an
:class:`EmbeddingCache`, so SAM and Stable-SAM share one encoder pass per image (crop).

Evaluation: :func:`amg_coco_eval` scores the generated masks against COCO instances with
pycocotools' ``COCOeval`` (``iouType="segm"``) class-agnostically (``useCats = 0``: automatic
masks have no category), ranking masks by SAM's ``predicted_iou`` (or ``stability_score``).
"""

from __future__ import annotations

import colorsys
import contextlib
import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from ..embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingSpec, image_key
from ..modeling.stable_sam import StableSam

__all__ = [
    "AMG_SCORES",
    "CachedSamPredictor",
    "amg_coco_eval",
    "amg_detections",
    "amg_overlay",
    "mask_generator",
    "write_amg",
]

# What ranks the automatic masks in COCOeval: SAM's IoU head or its stability score.
AMG_SCORES = ("predicted_iou", "stability_score")


class CachedSamPredictor(SamPredictor):
    """segment-anything's ``SamPredictor`` whose encoder is :meth:`StableSam.embed_images`, with a cache.

    The encoder runs through the model's single entry, so the encoder fast path
    (``model.encoder_precision``) applies here as everywhere. With a ``cache``, ``set_image``
    looks the embedding up first; the key is :class:`stable_sam.predictor.StableSamPredictor`'s
    (the image as given, SAM's "longest_side" preprocessing, :meth:`StableSam.encoder_id`), so
    both predictors share a cache. Everything else is ``SamPredictor``'s own code.

    Arguments:
      model: the Stable-SAM whose ``sam`` this predictor runs (its encoder must be frozen).
      cache: where embeddings are looked up and stored (None: none, every image is embedded).
    """

    def __init__(self, model: StableSam, cache: EmbeddingCache | None = None) -> None:
        if not model.encoder_is_frozen:
            raise ValueError(
                f"the encoder is tuned ({model.tuning.encoder}): its embeddings are not cacheable"
            )
        super().__init__(model.sam)
        self.stable_sam = model
        self.cache = cache

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """image: H x W x 3 uint8; its 1 x C x h x w embedding comes from the cache when there."""
        if self.cache is None:
            super().set_image(image, image_format=image_format)
            return
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        key = image_key(image, model_id=self.stable_sam.encoder_id(), preprocess="longest_side")
        encoder = self.model.image_encoder
        prompt_encoder = self.model.prompt_encoder
        spec = EmbeddingSpec(
            shape=(1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size),
            input_size=ResizeLongestSide.get_preprocess_shape(*image.shape[:2], encoder.img_size),
            original_size=tuple(image.shape[:2]),
        )
        entry = self.cache.get(key, spec)
        if entry is None:
            super().set_image(image, image_format=self.model.image_format)
            self.cache.put(key, CachedEmbedding(self.features.cpu(), self.input_size, self.original_size))
            return
        self.reset_image()
        self.features = entry.embedding.to(self.device)
        self.input_size = tuple(entry.input_size)
        self.original_size = tuple(entry.original_size)
        self.is_image_set = True

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """``SamPredictor.set_torch_image`` with the encoder run by :meth:`StableSam.embed_images`."""
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.stable_sam.embed_images(transformed_image.float())
        self.is_image_set = True


def mask_generator(
    model: StableSam, *, cache: EmbeddingCache | None = None, **options: Any
) -> SamAutomaticMaskGenerator:
    """segment-anything's automatic mask generator on ``model.sam`` (the plug-ins included).

    Args:
      model: the Stable-SAM; run the generator inside ``model.plugins_disabled()`` for SAM.
      cache: share image embeddings through it (ignored when LoRA/adapters tune the encoder).
      options: ``SamAutomaticMaskGenerator``'s keyword arguments (points_per_side,
        pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_n_layers, output_mode, ...).
    """
    generator = SamAutomaticMaskGenerator(model.sam, **options)
    if model.encoder_is_frozen:
        generator.predictor = CachedSamPredictor(model, cache)
    return generator


def amg_detections(
    records: Sequence[dict[str, Any]], *, image_id: int, score: str = "predicted_iou"
) -> list[dict[str, Any]]:
    """COCO result dicts (one category: 1) of one image's automatic masks (``coco_rle`` output)."""
    if score not in AMG_SCORES:
        raise ValueError(f"score must be one of {AMG_SCORES}, got {score!r}")
    return [
        {
            "image_id": int(image_id),
            "category_id": 1,
            "segmentation": record["segmentation"],
            "score": float(record[score]),
        }
        for record in records
    ]


def amg_coco_eval(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Class-agnostic COCO mask AP / AR (pycocotools ``COCOeval``, ``iouType="segm"``, one category).

    Standard parameters otherwise: IoU 0.50:0.95, maxDets 1 / 10 / 100 per image (the top-scored
    masks), all areas. Neither argument is modified.

    Args:
      gt: COCO-format ground truth ("images", "annotations" with RLE or polygons, "categories").
      detections: image_id, segmentation (RLE), score (category_id is ignored).

    Returns:
      In [0, 1]: ``ap`` (AP@[.5:.95], maxDets 100), ``ap50``, ``ap75``, ``ar1``, ``ar10``, ``ar100``;
      all 0.0 without detections.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gt.get("annotations"):
        raise ValueError("gt has no annotations: COCO AP/AR are undefined")
    keys = ("ap", "ap50", "ap75", "ar1", "ar10", "ar100")
    if not detections:  # loadRes cannot take an empty list; with GT and no mask, AP = AR = 0
        return dict.fromkeys(keys, 0.0)
    # useCats=0 alone is not enough: COCOeval still keeps only detections whose category is one of
    # the GT's, so every GT instance and every mask goes to one category "object".
    dataset = copy.deepcopy(gt)
    dataset["categories"] = [{"id": 1, "name": "object"}]
    for annotation in dataset["annotations"]:
        annotation["category_id"] = 1
    results = [{**copy.deepcopy(det), "category_id": 1} for det in detections]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.useCats = 0
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    values = (stats[0], stats[1], stats[2], stats[6], stats[7], stats[8])
    # -1 marks "no GT in this range": with annotations present it cannot occur for "all" areas.
    return {k: max(0.0, float(v)) for k, v in zip(keys, values)}


def _colours(count: int) -> np.ndarray:
    """count distinct RGB colours (golden-ratio hue steps: deterministic, no RNG), count x 3 float."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues], np.float32).reshape(-1, 3) * 255


def amg_overlay(
    image: np.ndarray, records: Sequence[dict[str, Any]], *, opacity: float = 0.55
) -> Image.Image:
    """The image with every automatic mask blended in its own colour (large masks first).

    Args:
      image: H x W x 3 uint8 RGB.
      records: the generator's ``coco_rle`` records (``segmentation`` RLE, ``area``).
    """
    out = image.astype(np.float32).copy()
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    for colour, i in zip(_colours(len(order)), order):
        mask = mask_utils.decode(records[i]["segmentation"]).astype(bool)
        out[mask] = (1 - opacity) * out[mask] + opacity * colour
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def write_amg(
    image: np.ndarray, records: Sequence[dict[str, Any]], *, out_dir: str | Path, stem: str
) -> tuple[Path, Path]:
    """``<stem>_masks.json`` (the COCO RLE records, as segment-anything's ``scripts/amg.py`` writes
    them) and ``<stem>_amg.png`` (:func:`amg_overlay`) in ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks_path, overlay_path = out_dir / f"{stem}_masks.json", out_dir / f"{stem}_amg.png"
    masks_path.write_text(json.dumps(list(records)))
    amg_overlay(image, records).save(overlay_path)
    return masks_path, overlay_path
