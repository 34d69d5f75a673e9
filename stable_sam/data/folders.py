"""HQSeg-style folder datasets: ``im/*.jpg`` + ``gt/*.png`` (or side by side), paired by stem.

EXIF: pixels are used in their stored order (see the package docstring).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "BadSampleError",
    "DatasetError",
    "FolderListing",
    "ImagePair",
    "Sample",
    "SegmentationFolder",
    "SkippedFile",
    "binarize_mask",
    "find_pairs",
    "instance_masks",
    "list_pairs",
    "load_image",
    "load_mask",
    "load_sample",
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
