"""Datasets, resizing conventions and training augmentation.

- HQSeg-style folder datasets (``im/*.jpg`` + ``gt/*.png``, or both side by side), paired by
  file stem, validated, with bad files (stray, unreadable, undecodable, over Pillow's
  decompression-bomb limit, mismatched, empty) skipped and recorded in ``skipped`` rather than
  crashing a long run or being replaced by another sample.
- A registry of the named datasets: the HQSeg-44K train mix (7 folders), the four HQ evaluation
  sets, the embedded dataset's splits, and any user folder in the same layout.
- COCO instances through pycocotools (polygons and RLE decoded by ``annToMask``).
- Both resize conventions whose choice moves published numbers: SAM's longest side (+ pad,
  done by the model) and HQ-SAM's evaluation stretch to a square.
- HQ-SAM's training augmentation (``RandomHFlip`` + ``LargeScaleJitter``) with explicit
  generators.

Conventions: images are uint8 H x W x 3 RGB numpy arrays; binary masks are bool H x W; soft
masks are float32 H x W in [0, 1]. Ground truth PNGs are binarised as HQ-SAM does: ``> 128``
on the 0..255 scale (3-dim GT: channel 0).

EXIF orientation policy: pixels are used in their stored order; the EXIF orientation tag is
ignored (like PIL's plain ``open`` and imageio's v3 reader), because the GT PNGs carry no EXIF
and were drawn on the stored pixel grid of most releases. Images with a non-trivial
orientation tag are counted (``SegmentationFolder.exif_rotated``) and logged; a rotation by
90° shows up as an image/mask size mismatch and the pair is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "BadSampleError",
    "CocoInstances",
    "CocoSample",
    "DatasetError",
    "DatasetSpec",
    "FolderListing",
    "FolderSpec",
    "ImagePair",
    "Sample",
    "SegmentationFolder",
    "SkippedFile",
    "binarize_mask",
    "coco_paths",
    "dataset_family",
    "find_pairs",
    "folder_specs",
    "instance_masks",
    "large_scale_jitter",
    "list_pairs",
    "load_image",
    "load_mask",
    "load_sample",
    "open_dataset",
    "prepare_eval_image",
    "random_hflip",
    "resize_longest_side",
    "resize_mask_longest_side",
    "resize_mask_stretch",
    "resize_stretch",
]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_MAX_LISTED = 20


class DatasetError(ValueError):
    """A dataset that cannot be used as given (missing folders, no valid pair)."""


# What decoding a file can raise. Pillow's DecompressionBombError (an image over twice
# ``Image.MAX_IMAGE_PIXELS``) is a plain Exception, not an OSError.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _why(state: str, what: str, err: Exception) -> str:
    """Why ``what`` ("image", "mask PATH") could not be read; a bomb also names Pillow's limit."""
    if isinstance(err, Image.DecompressionBombError):
        return (
            f"{what} is over Pillow's decompression-bomb limit: {err} (Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}; raise PIL.Image.MAX_IMAGE_PIXELS to use such images)"
        )
    return f"{state} {what}: {err}"


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


# ------------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class ImagePair:
    """One image and its GT mask (and, for the embedded data, its instance-id map)."""

    name: str
    image_path: Path
    mask_path: Path
    instances_path: Path | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of a dataset, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class FolderListing:
    """The pairs of one image/mask folder, and its stray files (an image without a mask or a mask
    without an image), each with the reason it was left out."""

    pairs: list[ImagePair]
    unmatched: list[SkippedFile]


def list_pairs(
    im_dir: str | Path,
    gt_dir: str | Path,
    *,
    im_ext: str = ".jpg",
    gt_ext: str = ".png",
    inst_dir: str | Path | None = None,
) -> FolderListing:
    """Pair ``im_dir/STEM{im_ext}`` with ``gt_dir/STEM{gt_ext}``, sorted by stem; list the strays.

    ``im_dir`` and ``gt_dir`` may be the same folder (cascade_psp keeps ``x.jpg`` and ``x.png``
    side by side). Extensions match exactly (HQ-SAM globs ``*.jpg``); other files are ignored.
    An image without a mask or a mask without an image is a stray: it is left out and listed in
    ``unmatched`` (one stray file never makes a 44k-image set unusable).

    Args:
      im_dir, gt_dir: the image and mask folders.
      im_ext, gt_ext: the extensions, with the dot.
      inst_dir: optional folder of instance-id maps ``STEM.png`` (embedded data); each pair
        gets one if it exists.

    Raises:
      DatasetError: a folder is missing.
    """
    im_dir, gt_dir = Path(im_dir), Path(gt_dir)
    for folder in (im_dir, gt_dir):
        if not folder.is_dir():
            raise DatasetError(f"dataset folder not found: {folder}")
    images = {p.name[: -len(im_ext)]: p for p in im_dir.iterdir() if p.name.endswith(im_ext) and p.is_file()}
    masks = {p.name[: -len(gt_ext)]: p for p in gt_dir.iterdir() if p.name.endswith(gt_ext) and p.is_file()}
    unmatched = [
        SkippedFile(str(images[s]), f"image without a {gt_ext} mask in {gt_dir}")
        for s in sorted(set(images) - set(masks))
    ] + [
        SkippedFile(str(masks[s]), f"mask without a {im_ext} image in {im_dir}")
        for s in sorted(set(masks) - set(images))
    ]
    inst = Path(inst_dir) if inst_dir is not None else None
    pairs = []
    for stem in sorted(set(images) & set(masks)):
        inst_path = inst / f"{stem}.png" if inst is not None else None
        if inst_path is not None and not inst_path.is_file():
            inst_path = None
        pairs.append(ImagePair(stem, images[stem], masks[stem], inst_path))
    return FolderListing(pairs, unmatched)


def _require_pairs(listing: FolderListing, im_dir: Path, gt_dir: Path, im_ext: str, gt_ext: str) -> None:
    if not listing.pairs:
        strays = (
            f" (only {len(listing.unmatched)} stray file(s) without a partner: "
            f"{_listing([Path(s.path).name for s in listing.unmatched])})"
            if listing.unmatched
            else ""
        )
        raise DatasetError(
            f"no {im_ext} images with {gt_ext} masks of the same stem in {im_dir} and {gt_dir}{strays}"
        )


def find_pairs(
    im_dir: str | Path,
    gt_dir: str | Path,
    *,
    im_ext: str = ".jpg",
    gt_ext: str = ".png",
    inst_dir: str | Path | None = None,
) -> list[ImagePair]:
    """The pairs of :func:`list_pairs`; stray files are logged (named) and left out.

    Raises:
      DatasetError: a folder is missing, or not a single pair is left (the message names the
        folders and the strays).
    """
    im_dir, gt_dir = Path(im_dir), Path(gt_dir)
    listing = list_pairs(im_dir, gt_dir, im_ext=im_ext, gt_ext=gt_ext, inst_dir=inst_dir)
    _require_pairs(listing, im_dir, gt_dir, im_ext, gt_ext)
    for stray in listing.unmatched:
        logger.warning("skipping %s: %s", stray.path, stray.reason)
    return listing.pairs


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image as uint8 H x W x 3 RGB (grayscale replicated, alpha dropped, EXIF ignored)."""
    with Image.open(path) as img:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).copy()


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a GT mask as uint8 H x W on the 0..255 scale (channel 0 of multi-channel PNGs).

    Palette PNGs are expanded to RGB first and bilevel (mode "1") ones mapped to 0/255, as
    skimage (HQ-SAM's reader) returns them.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode == "1":
            img = img.convert("L")
        elif img.mode == "P":
            img = img.convert("RGB")
        array = np.asarray(img)
    if array.ndim == 3:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: mask has dtype {array.dtype} (mode {img.mode}); expected 8-bit 0..255")
    return array.copy()


def binarize_mask(gt: np.ndarray) -> np.ndarray:
    """HQ-SAM's binarisation: ``gt > 128`` on the 0..255 scale; a 3-dim GT uses channel 0.

    Args:
      gt: H x W or H x W x C array (uint8 or float on the 0..255 scale).

    Returns:
      bool H x W.
    """
    gt = np.asarray(gt)
    if gt.ndim == 3:
        gt = gt[..., 0]
    if gt.ndim != 2:
        raise ValueError(f"expected an H x W or H x W x C mask, got shape {gt.shape}")
    return gt > 128


def instance_masks(instances: np.ndarray) -> list[np.ndarray]:
    """Split an instance-id map (uint8 H x W, 0 = background, ids 1..K) into K bool masks.

    Ids absent from the map give no mask; the list is in increasing id (z-) order.
    """
    ids = np.unique(instances)
    return [instances == k for k in ids[ids > 0]]


# ------------------------------------------------------------------------------------------------
# Folder datasets


@dataclass
class Sample:
    """One item of a :class:`SegmentationFolder`.

    Attributes:
      name: the pair's name (file stem, prefixed by the folder name in multi-folder sets).
      image: uint8 H x W x 3 RGB.
      mask: bool H x W, the binarised GT.
      instances: uint8 H x W instance ids when the dataset has instance maps, else None.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray | None = None


class BadSampleError(ValueError):
    """One pair that cannot be used (corrupt file, size mismatch, empty mask); says why."""


def _exif_rotated(img: Image.Image) -> bool:
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # malformed EXIF is not our concern here
        return False


def _check_header(pair: ImagePair) -> tuple[str | None, bool]:
    """(reason or None, exif_rotated) from the file headers only (no pixel decoding)."""
    try:
        with Image.open(pair.image_path) as img:
            image_size, rotated = img.size, _exif_rotated(img)
    except _DECODE_ERRORS as err:
        return _why("unreadable", "image", err), False
    try:
        with Image.open(pair.mask_path) as gt:
            mask_size = gt.size
    except _DECODE_ERRORS as err:
        return _why("unreadable", f"mask {pair.mask_path}", err), rotated
    if image_size != mask_size:
        return (
            f"image is {image_size[0]}x{image_size[1]} (WxH) but mask {pair.mask_path.name} is "
            f"{mask_size[0]}x{mask_size[1]}",
            rotated,
        )
    return None, rotated


def load_sample(pair: ImagePair) -> Sample:
    """Decode and check one pair.

    Raises:
      BadSampleError: corrupt image or mask, image/mask size mismatch, empty mask (no pixel
        > 128), or a bad instance map; the message names the file and the reason.
    """
    try:
        image = load_image(pair.image_path)
    except _DECODE_ERRORS as err:
        raise BadSampleError(_why("corrupt", "image", err)) from err
    try:
        mask = binarize_mask(load_mask(pair.mask_path))
    except _DECODE_ERRORS as err:
        raise BadSampleError(_why("corrupt", f"mask {pair.mask_path}", err)) from err
    if image.shape[:2] != mask.shape:
        raise BadSampleError(
            f"image is {image.shape[1]}x{image.shape[0]} (WxH) but mask {pair.mask_path.name} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    if not mask.any():
        raise BadSampleError(f"empty mask (no pixel > 128) in {pair.mask_path.name}")
    instances = None
    if pair.instances_path is not None:
        try:
            instances = load_mask(pair.instances_path)
        except _DECODE_ERRORS as err:
            raise BadSampleError(_why("corrupt", f"instance map {pair.instances_path}", err)) from err
        if instances.shape != mask.shape:
            raise BadSampleError(f"instance map {pair.instances_path.name} size differs from the image")
    return Sample(pair.name, image, mask, instances)


class SegmentationFolder(Dataset):
    """A validated list of image/mask pairs; items are :class:`Sample`.

    Every file left out is in ``skipped`` (path + reason, in the order found; ``num_skipped``
    counts them, ``skipped_dicts()`` gives JSON-ready records): stray files (``unmatched``),
    paths of the ``exclude`` list, and pairs that fail validation. An index always returns its
    own pair, never another one, so ``len()`` is the number of distinct images a consumer sees.

    - ``validate="full"`` (default) decodes every pair at construction (a few ms each; threads
      overlap the I/O and PIL releases the GIL while decoding) and skips unreadable or corrupt
      files, decompression bombs, image/mask size mismatches and empty masks: every index then
      loads.
    - ``validate="header"`` reads only the file headers (a 44k-image set opens in seconds):
      unreadable files, bombs and size mismatches are skipped, but corrupt pixel data and empty
      masks are only found in ``__getitem__``, which records the pair in ``skipped`` and raises
      :class:`BadSampleError`. Use it for data validated fully before, whose bad files come in
      ``exclude`` (the fetch stage's skip list).
    - ``validate="none"`` checks nothing (only ``exclude`` applies).

    (In DataLoader worker processes the record made by ``__getitem__`` stays in the worker; the
    exception and the log line are what reach the user.)

    Args:
      pairs: from :func:`list_pairs` / :func:`find_pairs` (possibly several folders concatenated).
      name: the dataset name (logs, errors).
      validate: "full", "header" or "none".
      exclude: paths known to be bad (e.g. the skip list of the raw-data manifest) with their
        reasons; they are skipped without opening them.
      unmatched: stray files found while pairing (:attr:`FolderListing.unmatched`); recorded.
      num_threads: threads for validation (default: min(16, cpu count + 4)).

    Raises:
      DatasetError: no valid pair remains.
    """

    def __init__(
        self,
        pairs: Sequence[ImagePair],
        *,
        name: str,
        validate: Literal["header", "full", "none"] = "full",
        exclude: dict[str, str] | None = None,
        unmatched: Sequence[SkippedFile] = (),
        num_threads: int | None = None,
    ) -> None:
        if validate not in ("header", "full", "none"):
            raise ValueError(f"validate must be 'header', 'full' or 'none', got {validate!r}")
        self.name = name
        self.validate = validate
        self.unmatched: list[SkippedFile] = list(unmatched)
        self.skipped: list[SkippedFile] = []
        self.exif_rotated = 0
        for stray in self.unmatched:
            self._record(stray)
        exclude = exclude or {}
        candidates = []
        for pair in pairs:
            reason = exclude.get(str(pair.image_path))
            if reason is not None:  # known bad: recorded, not logged one by one again
                self.skipped.append(SkippedFile(str(pair.image_path), reason))
            else:
                candidates.append(pair)
        excluded = len(pairs) - len(candidates)
        threads = num_threads or min(16, (os.cpu_count() or 1) + 4)
        if validate == "header":
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(_check_header, candidates))
            reasons = [r for r, _ in results]
            self.exif_rotated = sum(rot for _, rot in results)
        elif validate == "full":

            def check(pair: ImagePair) -> str | None:
                try:
                    load_sample(pair)
                except BadSampleError as err:
                    return str(err)
                return None

            with ThreadPoolExecutor(threads) as pool:
                reasons = list(pool.map(check, candidates))
                self.exif_rotated = sum(rot for _, rot in pool.map(_check_header, candidates))
        else:
            reasons = [None] * len(candidates)
        self.pairs: list[ImagePair] = []
        for pair, reason in zip(candidates, reasons):
            if reason is None:
                self.pairs.append(pair)
            else:
                self._record(SkippedFile(str(pair.image_path), reason))
        if self.exif_rotated:
            logger.info(
                "%s: %d image(s) carry a non-trivial EXIF orientation (ignored)", name, self.exif_rotated
            )
        if not self.pairs:
            raise DatasetError(
                f"dataset {name!r}: no valid image/mask pair among {len(pairs)} pair(s) and "
                f"{len(self.unmatched)} stray file(s); first reasons: "
                f"{_listing([f'{s.path}: {s.reason}' for s in self.skipped])}"
            )
        if self.skipped:
            logger.warning(
                "%s: %d valid pair(s); %d file(s) skipped (%d stray, %d known bad from the exclude list)",
                name,
                len(self.pairs),
                len(self.skipped),
                len(self.unmatched),
                excluded,
            )

    def _record(self, skipped: SkippedFile) -> None:
        # Each file is named in the log up to a limit (all are in ``skipped``); the counts follow.
        level = logging.WARNING if len(self.skipped) < _MAX_LISTED else logging.DEBUG
        logger.log(level, "%s: skipping %s: %s", self.name, skipped.path, skipped.reason)
        self.skipped.append(skipped)

    @property
    def num_skipped(self) -> int:
        """How many files were left out (strays, excluded and invalid pairs)."""
        return len(self.skipped)

    def skipped_dicts(self) -> list[dict[str, str]]:
        """``skipped`` as ``[{"path": ..., "reason": ...}]`` (for JSON outputs)."""
        return [s.to_dict() for s in self.skipped]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        """The sample of pair ``index``.

        Raises:
          BadSampleError: the pair fails to decode or has an empty mask (possible only with
            ``validate="header"`` or ``"none"``, or a file changed since opening); it is recorded
            in ``skipped`` first. The message names the dataset, the file and the reason.
        """
        n = len(self.pairs)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name!r} with {n} pairs")
        pair = self.pairs[index]
        try:
            return load_sample(pair)
        except BadSampleError as err:
            path = str(pair.image_path)
            if not any(s.path == path for s in self.skipped):
                self._record(SkippedFile(path, str(err)))
            raise BadSampleError(
                f"dataset {self.name!r}: {path}: {err} (opened with validate={self.validate!r}; "
                "validate='full' skips such pairs when the dataset is opened)"
            ) from err


# ------------------------------------------------------------------------------------------------
# Named datasets


@dataclass(frozen=True)
class FolderSpec:
    """One image/mask folder pair, relative to a dataset family root."""

    name: str
    im_dir: str
    gt_dir: str
    im_ext: str = ".jpg"
    gt_ext: str = ".png"
    inst_dir: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: the family whose root holds it, and its folders per split."""

    name: str
    family: str
    splits: dict[str, tuple[FolderSpec, ...]] = field(default_factory=dict)


_TOT = "thin_object_detection"
# hqsam_pipeline.md 1.3: the HQSeg-44K train mix, in HQ-SAM's order.
HQSEG44K_TRAIN = (
    FolderSpec("DIS5K-TR", "DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt"),
    FolderSpec("ThinObject5K-TR", f"{_TOT}/ThinObject5K/images_train", f"{_TOT}/ThinObject5K/masks_train"),
    FolderSpec("FSS", "cascade_psp/fss_all", "cascade_psp/fss_all"),
    FolderSpec("DUTS-TR", "cascade_psp/DUTS-TR", "cascade_psp/DUTS-TR"),
    FolderSpec("DUTS-TE", "cascade_psp/DUTS-TE", "cascade_psp/DUTS-TE"),
    FolderSpec("ECSSD", "cascade_psp/ecssd", "cascade_psp/ecssd"),
    FolderSpec("MSRA10K", "cascade_psp/MSRA_10K", "cascade_psp/MSRA_10K"),
)
# The four HQ evaluation sets, in HQ-SAM's metric order (val_iou_0..3).
HQSEG_EVAL = (
    FolderSpec("DIS-VD", "DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt"),
    FolderSpec("COIFT", f"{_TOT}/COIFT/images", f"{_TOT}/COIFT/masks"),
    FolderSpec("HR-SOD", f"{_TOT}/HRSOD/images", f"{_TOT}/HRSOD/masks_max255"),
    FolderSpec("ThinObject5K-TE", f"{_TOT}/ThinObject5K/images_test", f"{_TOT}/ThinObject5K/masks_test"),
)


def _build_registry() -> dict[str, DatasetSpec]:
    registry = {
        "hqseg44k": DatasetSpec("hqseg44k", "hqseg44k", {"train": HQSEG44K_TRAIN}),
        "embedded": DatasetSpec(
            "embedded",
            "embedded",
            {
                split: (
                    FolderSpec(
                        f"embedded-{split}", f"{split}/im", f"{split}/gt", inst_dir=f"{split}/instances"
                    ),
                )
                for split in ("train", "val")
            },
        ),
        "coco_val2017": DatasetSpec("coco_val2017", "coco_val2017", {}),
    }
    for spec in HQSEG44K_TRAIN:
        registry[spec.name] = DatasetSpec(spec.name, "hqseg44k", {"train": (spec,)})
    for spec in HQSEG_EVAL:
        registry[spec.name] = DatasetSpec(spec.name, "hqseg44k", {"val": (spec,)})
    return registry


# Name -> spec. Families: "hqseg44k" (root = the folder holding DIS5K/, cascade_psp/,
# thin_object_detection/), "embedded" (root holds train/ and val/), "coco_val2017" (root holds
# val2017/ and annotations/; opened with CocoInstances, see coco_paths).
DATASETS: dict[str, DatasetSpec] = _build_registry()


def dataset_family(name: str) -> str | None:
    """The family (root folder key) of a registered dataset name; None for a path."""
    spec = DATASETS.get(name)
    return spec.family if spec is not None else None


def folder_specs(name: str, split: str) -> tuple[FolderSpec, ...]:
    """The folders of a registered dataset's split (relative to its family root)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or a folder path)")
    spec = DATASETS[name]
    if name == "coco_val2017":
        raise DatasetError(
            "coco_val2017 is an instance dataset: open it with CocoInstances(*coco_paths(root))"
        )
    if split not in spec.splits:
        raise DatasetError(f"dataset {name!r} has no split {split!r}; it has {sorted(spec.splits)}")
    return spec.splits[split]


def coco_paths(root: str | Path) -> tuple[Path, Path]:
    """(images folder, instances annotation file) of COCO val2017 under ``root``."""
    root = Path(root)
    return root / "val2017", root / "annotations" / "instances_val2017.json"


def _user_folder(path: Path, split: str) -> FolderSpec:
    for base in (path, path / split):
        if (base / "im").is_dir() and (base / "gt").is_dir():
            inst = base / "instances"
            return FolderSpec(
                path.name, str(base / "im"), str(base / "gt"), inst_dir=str(inst) if inst.is_dir() else None
            )
    raise DatasetError(
        f"{path} is neither a registered dataset name ({sorted(DATASETS)}) nor a folder in the HQSeg "
        f"layout: expected {path}/im + {path}/gt or {path}/{split}/im + {path}/{split}/gt"
    )


def open_dataset(
    name_or_path: str,
    *,
    split: str,
    root: str | Path | None = None,
    validate: Literal["header", "full", "none"] = "full",
    exclude: dict[str, str] | None = None,
) -> SegmentationFolder:
    """Open a registered dataset or any folder in the HQSeg layout.

    Args:
      name_or_path: a name of :data:`DATASETS` ("hqseg44k", "DIS-VD", "COIFT", "HR-SOD",
        "ThinObject5K-TE", one train component such as "DUTS-TR", "embedded"), or a folder
        with ``im/`` + ``gt/`` (optionally ``instances/``), directly or under ``<split>/``.
      split: "train" or "val" (the HQ evaluation sets only have "val", the HQSeg-44K mix only
        "train": asking otherwise is an error, so an eval set is never trained on by accident).
      root: the family root of a registered name (``pipeline.raw_data`` resolves it from the
        raw-data manifest); unused for paths.
      validate, exclude: see :class:`SegmentationFolder`.

    Returns:
      A :class:`SegmentationFolder`; in multi-folder sets the sample names are
      ``<folder>/<stem>`` so they stay unique. Stray files (an image without a mask or the
      reverse) are left out and listed in its ``skipped`` / ``unmatched``.

    Raises:
      DatasetError: a folder is missing or has no image/mask pair at all (named), or no valid
        pair is left.
    """
    if name_or_path in DATASETS:
        if root is None:
            raise DatasetError(f"dataset {name_or_path!r} needs the root folder of its family")
        specs = folder_specs(name_or_path, split)
        base = Path(root)
    else:
        specs = (_user_folder(Path(name_or_path), split),)
        base = Path()
    pairs: list[ImagePair] = []
    unmatched: list[SkippedFile] = []
    for spec in specs:
        im_dir, gt_dir = base / spec.im_dir, base / spec.gt_dir
        listing = list_pairs(
            im_dir,
            gt_dir,
            im_ext=spec.im_ext,
            gt_ext=spec.gt_ext,
            inst_dir=base / spec.inst_dir if spec.inst_dir else None,
        )
        _require_pairs(listing, im_dir, gt_dir, spec.im_ext, spec.gt_ext)
        found = listing.pairs
        if len(specs) > 1:
            found = [replace(p, name=f"{spec.name}/{p.name}") for p in found]
        pairs.extend(found)
        unmatched.extend(listing.unmatched)
    return SegmentationFolder(
        pairs, name=f"{name_or_path}:{split}", validate=validate, exclude=exclude, unmatched=unmatched
    )


# ------------------------------------------------------------------------------------------------
# COCO


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


# ------------------------------------------------------------------------------------------------
# Resizing


def _interpolate(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False, no antialias) of H x W or H x W x C, as float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
    return (out[0] if array.ndim == 2 else out.permute(1, 2, 0)).numpy()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # HQ-SAM casts the resampled float image with .astype(np.uint8): truncation, not rounding.
    return np.clip(image, 0, 255).astype(np.uint8)


def resize_longest_side(image: np.ndarray, target_length: int) -> np.ndarray:
    """SAM's resize: longest side to ``target_length`` (``ResizeLongestSide.apply_image``).

    The model pads the result to a square itself. Returns uint8 H' x W' x 3.
    """
    return ResizeLongestSide(target_length).apply_image(image)


def resize_mask_longest_side(mask: np.ndarray, target_length: int, *, soft: bool = False) -> np.ndarray:
    """A mask brought to the frame of :func:`resize_longest_side` (bilinear, see resize_mask_stretch)."""
    h, w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], target_length)
    return _resize_mask(mask, (h, w), soft)


def resize_stretch(image: np.ndarray, size: int) -> np.ndarray:
    """HQ-SAM's evaluation resize: bilinear to size x size, aspect ratio not kept, no padding.

    Returns uint8 size x size x 3 (truncated like HQ-SAM).
    """
    return _to_uint8(_interpolate(image, (size, size)))


def _resize_mask(mask: np.ndarray, size: tuple[int, int], soft: bool) -> np.ndarray:
    # On the 0..255 scale then > 128, as HQ-SAM resizes the label and thresholds it.
    scaled = mask.astype(np.float32) * (255.0 if mask.dtype == bool or mask.max(initial=0) <= 1 else 1.0)
    out = _interpolate(scaled, size)
    return (out / 255.0).astype(np.float32) if soft else out > 128


def resize_mask_stretch(mask: np.ndarray, size: int, *, soft: bool = False) -> np.ndarray:
    """A mask (bool, or 0..255 / [0, 1] values) stretched to size x size.

    Bilinear on the 0..255 scale, then ``> 128`` (bool) or divided by 255 (``soft``: float32 in
    [0, 1]).
    """
    return _resize_mask(mask, (size, size), soft)


def prepare_eval_image(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    mode: Literal["longest_side", "stretch"],
    target_length: int = 1024,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Bring an evaluation image and its GT to the model's input frame.

    Args:
      image: uint8 H x W x 3.
      mask: bool H x W (the GT; prompts are drawn from its resized version, as HQ-SAM does).
      mode: "longest_side" (SamPredictor: longest side = target_length, the model pads) or
        "stretch" (HQ-SAM eval: target_length x target_length, no padding).
      target_length: the model's input size (1024 for SAM).

    Returns:
      (image uint8 h x w x 3, mask bool h x w, input_size (h, w)); metrics are computed back at
      the original H x W.
    """
    if mode == "longest_side":
        resized = resize_longest_side(image, target_length)
        return resized, resize_mask_longest_side(mask, target_length), resized.shape[:2]
    if mode == "stretch":
        return (
            resize_stretch(image, target_length),
            resize_mask_stretch(mask, target_length),
            (target_length, target_length),
        )
    raise ValueError(f"resize mode must be 'longest_side' or 'stretch', got {mode!r}")


# ------------------------------------------------------------------------------------------------
# Training augmentation


def random_hflip(
    image: np.ndarray, mask: np.ndarray, *, generator: np.random.Generator, probability: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Flip image (H x W x C) and mask (H x W) left-right together with ``probability``."""
    if generator.random() < probability:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    return image, mask


def large_scale_jitter(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    generator: np.random.Generator,
    output_size: int,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """HQ-SAM's ``LargeScaleJitter`` (hqsam_pipeline.md 2.2).

    The longest side is resized to ``round(s * output_size)``, ``s ~ U(min_scale, max_scale)``
    (bilinear, align_corners=False, no antialias), a random crop of at most output_size² is
    taken, and the result is padded bottom/right to output_size² (image with 128, mask with 0).

    Args:
      image: uint8 H x W x 3.
      mask: bool or float H x W (bool is treated as {0, 1}; uint8 0..255 is scaled to [0, 1]).
      generator: draws the scale and the crop offsets.
      output_size: S.

    Returns:
      (image uint8 S x S x 3 (truncated like HQ-SAM), mask float32 S x S soft in [0, 1],
      valid_hw: the (h, w) of the content in the top-left corner before the padding).
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    h, w = mask.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    soft = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    scale = generator.uniform(min_scale, max_scale)
    long_side = round(scale * output_size)
    factor = long_side / max(h, w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    image_r = _interpolate(image, (new_h, new_w))
    mask_r = _interpolate(soft, (new_h, new_w))
    crop_h, crop_w = min(output_size, new_h), min(output_size, new_w)
    top = int(generator.integers(0, new_h - crop_h + 1))
    left = int(generator.integers(0, new_w - crop_w + 1))
    out_image = np.full((output_size, output_size, 3), 128, np.uint8)
    out_mask = np.zeros((output_size, output_size), np.float32)
    out_image[:crop_h, :crop_w] = _to_uint8(image_r[top : top + crop_h, left : left + crop_w])
    out_mask[:crop_h, :crop_w] = np.clip(mask_r[top : top + crop_h, left : left + crop_w], 0, 1)
    return out_image, out_mask, (crop_h, crop_w)
