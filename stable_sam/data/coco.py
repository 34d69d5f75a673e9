"""COCO instances through pycocotools (polygons and RLE decoded by ``annToMask``)."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .folders import _DECODE_ERRORS, DatasetError, _listing, _why, load_image

__all__ = ["CocoInstances", "CocoSample"]


logger = logging.getLogger(__name__)


@dataclass
class CocoSample:
    """One COCO image with its instances.

    Attributes:
      image_id: COCO image id.
      file_name: the image file name.
      image: uint8 H x W x 3 RGB.
      masks: bool N x H x W (``annToMask``: polygons and RLE).
      boxes: float32 N x 4, xyxy in pixels (from the COCO ``bbox`` xywh).
      category_ids: int64 N.
      annotation_ids: int64 N.
    """

    image_id: int
    file_name: str
    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    annotation_ids: np.ndarray


class CocoInstances(Dataset):
    """COCO-format instance annotations, decoded with pycocotools.

    ``self.coco`` is the loaded ``pycocotools.coco.COCO`` object, for ``COCOeval``. Crowd
    annotations are left out of the samples by default (COCOeval treats them as ignore regions,
    and a crowd box is no object prompt).

    Args:
      images_dir: folder with the images named by ``file_name``.
      annotation_file: the instances JSON.
      max_images: keep the first N image ids (sorted) that have at least one instance.
      include_crowd: also return ``iscrowd`` annotations.

    Raises:
      DatasetError: the annotation file or images referenced by it are missing.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        *,
        max_images: int | None = None,
        include_crowd: bool = False,
    ) -> None:
        from pycocotools.coco import COCO  # heavy import only when COCO is used

        self.images_dir = Path(images_dir)
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise DatasetError(f"COCO annotation file not found: {annotation_file}")
        if not self.images_dir.is_dir():
            raise DatasetError(f"COCO images folder not found: {self.images_dir}")
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress to stdout
            self.coco = COCO(str(annotation_file))
        self.include_crowd = include_crowd
        ids = [i for i in sorted(self.coco.getImgIds()) if self._ann_ids(i)]
        if max_images is not None:
            ids = ids[:max_images]
        missing = [
            self.coco.imgs[i]["file_name"]
            for i in ids
            if not (self.images_dir / self.coco.imgs[i]["file_name"]).is_file()
        ]
        if missing:
            raise DatasetError(
                f"{len(missing)} COCO image(s) missing from {self.images_dir}: {_listing(missing)}"
            )
        if not ids:
            raise DatasetError(f"{annotation_file}: no image with an instance annotation")
        self.image_ids: list[int] = ids

    def _ann_ids(self, image_id: int) -> list[int]:
        crowd = None if self.include_crowd else False
        return self.coco.getAnnIds(imgIds=[image_id], iscrowd=crowd)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> CocoSample:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            image = load_image(path)
        except _DECODE_ERRORS as err:
            raise DatasetError(_why("corrupt", f"COCO image {path}", err)) from err
        if image.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} but the annotation says "
                f"{info['width']}x{info['height']}"
            )
        anns = self.coco.loadAnns(self._ann_ids(image_id))
        masks = (
            np.stack([self.coco.annToMask(a).astype(bool) for a in anns])
            if anns
            else np.zeros((0, *image.shape[:2]), bool)
        )
        boxes = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32
        ).reshape(-1, 4)
        return CocoSample(
            image_id=image_id,
            file_name=info["file_name"],
            image=image,
            masks=masks,
            boxes=boxes,
            category_ids=np.array([a["category_id"] for a in anns], np.int64),
            annotation_ids=np.array([a["id"] for a in anns], np.int64),
        )
