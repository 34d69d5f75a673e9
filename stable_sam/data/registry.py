"""The one registry of named datasets: the HQSeg-44K train mix, the four HQ evaluation sets,
the embedded dataset's splits, COCO, and any user folder in the same layout.

Each named set also carries the resize of its published evaluation protocol
(:func:`protocol_resize`): HQ-SAM evaluates the HQ sets squashed to a square ("stretch"), while
SAM's and HQ-SAM's COCO numbers come from ``SamPredictor`` ("longest_side"), so a COCO mask AP
is comparable with theirs only under that resize.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from .folders import DatasetError, ImagePair, SegmentationFolder, SkippedFile, _require_pairs, list_pairs

__all__ = [
    "DATASETS",
    "HQSEG44K_TRAIN",
    "HQSEG_EVAL",
    "DatasetSpec",
    "FolderSpec",
    "coco_paths",
    "dataset_family",
    "folder_specs",
    "open_dataset",
    "protocol_resize",
]


logger = logging.getLogger(__name__)


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
    """A named dataset: the family whose root holds it, its folders per split, and the resize of
    its evaluation protocol (a mode of ``stable_sam.data.prepare_eval_image``)."""

    name: str
    family: str
    splits: dict[str, tuple[FolderSpec, ...]] = field(default_factory=dict)
    eval_resize: str = "stretch"


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
        # SAM's and HQ-SAM's COCO protocols: SamPredictor's longest side (hqsam_pipeline.md 8)
        "coco_val2017": DatasetSpec("coco_val2017", "coco_val2017", {}, eval_resize="longest_side"),
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


def protocol_resize(name_or_path: str) -> str:
    """The resize of a set's evaluation protocol: its registry entry's (the HQ sets and the
    embedded set: "stretch", HQ-SAM's evaluation; coco_val2017: "longest_side", SAM's and
    HQ-SAM's COCO protocols); a folder in the HQSeg layout: "stretch", like the HQ sets."""
    spec = DATASETS.get(name_or_path)
    return spec.eval_resize if spec is not None else "stretch"


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
