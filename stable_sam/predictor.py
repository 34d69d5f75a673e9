"""StableSamPredictor: segment-anything's ``SamPredictor`` API for Stable-SAM, with an embedding cache."""

from __future__ import annotations

import logging

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from .embedding_cache import CachedEmbedding, EmbeddingCache, EmbeddingSpec, image_key
from .modeling.stable_sam import PromptTensors, StableSam

__all__ = ["StableSamPredictor", "clip_box"]

logger = logging.getLogger(__name__)


class StableSamPredictor:
    """Compute an image embedding once, then predict masks for any number of prompts.

    The API mirrors ``segment_anything.SamPredictor`` (``set_image``, ``set_torch_image``,
    ``predict``, ``predict_torch``, ``get_image_embedding``, ``reset_image``), plus:

    - ``routing``: the routing weights (α1, α2) of the last prediction, a B x 2 numpy array, one
      row per prompt (None when the model has no plug-ins or they are disabled);
    - ``offsets``: the DSP offsets of the last prediction (feature pixels, numpy);
    - an embedding cache, so setting an image seen before never re-runs the encoder. It is
      bypassed (with a log line) when LoRA/adapters change the encoder.

    Arguments:
      model: a :class:`StableSam` (use ``model.plugins_disabled()`` for plain SAM).
      cache: an :class:`EmbeddingCache` (default: a new in-memory one).
    """

    def __init__(self, model: StableSam, *, cache: EmbeddingCache | None = None) -> None:
        if not isinstance(model, StableSam):
            raise TypeError(f"StableSamPredictor needs a StableSam, got {type(model).__name__}")
        self.model = model
        self.transform = ResizeLongestSide(model.img_size)
        self.cache = cache if cache is not None else EmbeddingCache()
        if not model.encoder_is_frozen:
            logger.info("encoder is tuned (%s): the embedding cache is bypassed", model.tuning.encoder)
        self.reset_image()

    # ------------------------------------------------------------------------------ images
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an H x W x 3 uint8 image (RGB or BGR), or fetch its embedding from the cache."""
        if not isinstance(image, np.ndarray):
            raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 with values in [0, 255], got dtype {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"image is empty: shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.sam.image_format:
            image = image[..., ::-1]
        key = self._key(image, "longest_side")
        original_size = tuple(image.shape[:2])
        input_size = ResizeLongestSide.get_preprocess_shape(*original_size, self.model.img_size)
        if self._restore(key, input_size=input_size, original_size=original_size):
            return
        input_image = self.transform.apply_image(image)
        input_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self._encode(input_torch, tuple(image.shape[:2]), key)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed a 1 x 3 x h x w image already resized with ResizeLongestSide (SamPredictor API)."""
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3):
            raise ValueError(f"set_torch_image takes 1 x 3 x H x W, got {tuple(transformed_image.shape)}")
        if max(transformed_image.shape[2:]) != self.model.img_size:
            raise ValueError(
                f"set_torch_image input must have long side {self.model.img_size}, got "
                f"{tuple(transformed_image.shape[2:])}"
            )
        key = self._key(transformed_image, f"torch:{tuple(original_image_size)}")
        if self._restore(
            key, input_size=tuple(transformed_image.shape[-2:]), original_size=tuple(original_image_size)
        ):
            return
        self._encode(transformed_image, tuple(original_image_size), key)

    def _key(self, image: np.ndarray | torch.Tensor, preprocess: str) -> str | None:
        if not self.model.encoder_is_frozen:
            return None
        return image_key(image, model_id=self.model.encoder_id(), preprocess=preprocess)

    def _restore(
        self, key: str | None, *, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> bool:
        """Set the image from the cache; an entry of the wrong form is a miss (and recomputed)."""
        if key is None:
            return False
        prompt_encoder = self.model.sam.prompt_encoder
        spec = EmbeddingSpec(
            shape=(1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size),
            dtype=prompt_encoder.no_mask_embed.weight.dtype,
            input_size=tuple(input_size),
            original_size=tuple(original_size),
        )
        entry = self.cache.get(key, spec)
        if entry is None:
            return False
        self.reset_image()
        self.features = entry.embedding.to(self.device)
        self.input_size = tuple(entry.input_size)
        self.original_size = tuple(entry.original_size)
        self.is_image_set = True
        return True

    @torch.no_grad()
    def _encode(
        self, transformed_image: torch.Tensor, original_size: tuple[int, int], key: str | None
    ) -> None:
        self.reset_image()
        self.original_size = original_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.model.embed_images(transformed_image.float())
        self.is_image_set = True
        if key is not None:
            self.cache.put(key, CachedEmbedding(self.features, self.input_size, self.original_size))

    # --------------------------------------------------------------------------- prediction
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one prompt, with coordinates in the original image frame.

        Arguments:
          point_coords: N x 2 (x, y) pixel coordinates.
          point_labels: N labels (1 foreground, 0 background).
          box: (4,) xyxy box; one reaching over the image border is clipped to the image (with a
            warning), one with no overlap is refused (:func:`clip_box`).
          mask_input: 1 x h x w low-res logits from a previous prediction.
          multimask_output: return 3 masks (for ambiguous prompts) instead of 1.
          return_logits: return logits instead of binary masks.

        Returns:
          masks C x H x W, iou_predictions (C,), low_res_logits C x h x w (numpy).
        """
        self._require_image()
        h, w = self.original_size
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise ValueError(
                    "point_coords need point_labels (1 foreground, 0 background), and vice versa"
                )
            point_coords = np.asarray(point_coords, dtype=np.float32)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2:
                raise ValueError(f"point_coords must be N x 2 (x, y), got shape {point_coords.shape}")
            if point_labels.shape != (point_coords.shape[0],):
                raise ValueError(
                    f"point_labels must have one label per point: {point_coords.shape[0]} points, "
                    f"labels of shape {point_labels.shape}"
                )
            if not np.isin(point_labels, (0, 1)).all():
                raise ValueError(f"point_labels must be 0 or 1, got {np.unique(point_labels).tolist()}")
            _check_inside("point", point_coords, h, w)
            coords = self.transform.apply_coords(point_coords, self.original_size)
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = clip_box(box, h, w)
            box_torch = torch.as_tensor(
                self.transform.apply_boxes(box, self.original_size), device=self.device
            )
        if mask_input is not None:
            mask_input = np.asarray(mask_input, dtype=np.float32)
            expected = (1, *self.model.mask_input_size)
            if mask_input.shape != expected:
                raise ValueError(f"mask_input must have shape {expected}, got {mask_input.shape}")
            mask_torch = torch.as_tensor(mask_input, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the model's input frame (SamPredictor API).

        Arguments:
          point_coords: B x N x 2, point_labels: B x N, boxes: B x 4, mask_input: B x 1 x h x w.

        Returns:
          masks B x C x H x W (original size), iou_predictions B x C, low_res_logits B x C x h x w.
        """
        self._require_image()
        prompts = PromptTensors(
            point_coords=point_coords, point_labels=point_labels, boxes=boxes, mask_inputs=mask_input
        )
        out = self.model.decode(self.features, prompts, multimask_output=multimask_output)
        # numpy, like everything else this predictor returns to a user (predict_torch's tensors aside)
        self.routing = None if out.routing is None else out.routing.detach().cpu().numpy()
        self.offsets = None if out.offsets is None else out.offsets.detach().cpu().numpy()
        masks = self.model.sam.postprocess_masks(out.low_res_logits, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.sam.mask_threshold
        return masks, out.iou_predictions, out.low_res_logits

    # ------------------------------------------------------------------------------- state
    def get_image_embedding(self) -> torch.Tensor:
        """The 1 x C x H x W embedding of the current image."""
        self._require_image()
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.routing: np.ndarray | None = None
        self.offsets: np.ndarray | None = None

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")


def clip_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A box (4,) xyxy clipped to the image [0, W] x [0, H]; a warning says when it was clipped.

    A loose box reaching over the border is a normal prompt; only a box with no overlap with the
    image (or non-finite coordinates) is refused.

    Raises:
      ValueError: the box is not (4,) finite x0, y0, x1, y1 with x0 <= x1 and y0 <= y1, or it
        does not overlap the image (the message names the box and the image size).
    """
    box = np.asarray(box, dtype=np.float32)
    if box.shape != (4,):
        raise ValueError(f"box must be (4,) xyxy, got shape {box.shape}")
    if not np.isfinite(box).all():
        raise ValueError(f"box coordinates must be finite, got {box.tolist()}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"box {box.tolist()} has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)")
    x0, y0, x1, y1 = box.tolist()
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return box
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        raise ValueError(
            f"box {box.tolist()} does not overlap the {width}x{height} image (W x H): "
            f"it must reach into [0, {width}] x [0, {height}]"
        )
    clipped = np.clip(box, 0, np.array([width, height, width, height], dtype=np.float32))
    logger.warning(
        "box %s reaches outside the %dx%d image (W x H); clipped to %s",
        box.tolist(),
        width,
        height,
        clipped.tolist(),
    )
    return clipped


def _check_inside(what: str, coords: np.ndarray, height: int, width: int) -> None:
    """Points (N x 2, x y) must lie in the image [0, W] x [0, H]."""
    if not np.isfinite(coords).all():
        raise ValueError(f"{what} coordinates must be finite, got {coords.tolist()}")
    outside = (coords[:, 0] < 0) | (coords[:, 0] > width) | (coords[:, 1] < 0) | (coords[:, 1] > height)
    if outside.any():
        raise ValueError(
            f"{what} {coords.reshape(-1).tolist()} lies outside the {width}x{height} image (W x H)"
        )
