"""Datasets, resizing conventions and training augmentation.

- HQSeg-style folder datasets (``im/*.jpg`` + ``gt/*.png``, or both side by side), paired by
  file stem, validated, with bad files (stray, unreadable, undecodable, over Pillow's
  decompression-bomb limit, mismatched, empty) skipped and recorded in ``skipped`` rather than
  crashing a long run or being replaced by another sample.
- A registry of the named datasets: the HQSeg-44K train mix (7 folders), the four HQ evaluation
  sets, the embedded dataset's splits, and any user folder in the same layout; with the resize
  of each set's evaluation protocol.
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

from .coco import CocoInstances, CocoSample
from .folders import (
    BadSampleError,
    DatasetError,
    FolderListing,
    ImagePair,
    Sample,
    SegmentationFolder,
    SkippedFile,
    binarize_mask,
    find_pairs,
    instance_masks,
    list_pairs,
    load_image,
    load_mask,
    load_sample,
)
from .registry import (
    DATASETS,
    HQSEG44K_TRAIN,
    HQSEG_EVAL,
    DatasetSpec,
    FolderSpec,
    coco_paths,
    dataset_family,
    folder_specs,
    open_dataset,
    protocol_resize,
)
from .transforms import (
    large_scale_jitter,
    prepare_eval_image,
    random_hflip,
    resize_longest_side,
    resize_mask_longest_side,
    resize_mask_stretch,
    resize_stretch,
)

__all__ = [
    "DATASETS",
    "HQSEG44K_TRAIN",
    "HQSEG_EVAL",
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
    "protocol_resize",
    "random_hflip",
    "resize_longest_side",
    "resize_mask_longest_side",
    "resize_mask_stretch",
    "resize_stretch",
]
