"""The embedded dataset on disk: generated scenes (:mod:`.scenes`) written in the HQSeg layout.

Layout written by :func:`generate_split` (one split = one folder)::

    out_dir/im/NAME.jpg          RGB, JPEG quality JPEG_QUALITY (PIL: deterministic bytes)
    out_dir/gt/NAME.png          uint8 H x W, 0/255: ONE target object (HQSeg convention)
    out_dir/instances/NAME.png   uint8 H x W instance ids of all visible objects, 0 = background,
                                 ids 1..K in z-order (K = the topmost)
    out_dir/instances.json       COCO instances (RLE via pycocotools, one category per shape
                                 family); images carry ``target_instance`` (the id in gt/)

Masks are *visible* masks: an object partly covered by another loses the covered pixels, so
the object nested in a ring's hole and the ring are disjoint, as in HQSeg's annotations.

Every scene draws from its own ``np.random.Generator`` seeded by ``(seed, split, index)``, so a
scene does not depend on how many came before it and a split is byte-identical across runs.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from stable_sam.atomic_write import write_bytes_atomic

from .scenes import _RELATIONS, CATEGORIES, JPEG_QUALITY, Scene, generate_scene, scene_generator

__all__ = ["SplitSummary", "generate_split", "target_families"]


logger = logging.getLogger(__name__)


@dataclass
class SplitSummary:
    """What :func:`generate_split` wrote."""

    split: str
    out_dir: Path
    num_images: int
    num_instances: int
    image_size: int
    seed: int
    seconds: float
    bytes: int
    category_counts: dict[str, int] = field(default_factory=dict)
    relation_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What was generated, without the wall-clock ``seconds``: it goes into DVC outputs, which
        must be byte-identical across reruns so that DVC skips what did not really change."""
        return {
            "split": self.split,
            "out_dir": str(self.out_dir),
            "num_images": self.num_images,
            "num_instances": self.num_instances,
            "image_size": self.image_size,
            "seed": self.seed,
            "bytes": self.bytes,
            "category_counts": dict(self.category_counts),
            "relation_counts": dict(self.relation_counts),
        }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # No fsync per image: the files are small and many, and a rerun regenerates them identically.
    write_bytes_atomic(path, data, fsync=False)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    anns = []
    for k, category in enumerate(scene.categories, start=1):
        mask = np.asfortranarray((scene.instances == k).astype(np.uint8))
        rle = mask_utils.encode(mask)
        anns.append(
            {
                "id": first_id + k - 1,
                "image_id": image_id,
                "category_id": CATEGORIES.index(category) + 1,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "z_order": k,
                "relation": scene.relations[k - 1],
            }
        )
    return anns


def target_families(split_dir: str | Path) -> dict[str, str]:
    """{image stem: shape family of its gt/ target} from a split's ``instances.json``."""
    coco = json.loads((Path(split_dir) / "instances.json").read_text())
    family = {(a["image_id"], a["z_order"]): CATEGORIES[a["category_id"] - 1] for a in coco["annotations"]}
    return {
        im["file_name"].rsplit(".", 1)[0]: family[(im["id"], im["target_instance"])] for im in coco["images"]
    }


def generate_split(
    out_dir: str | Path,
    *,
    num_images: int,
    image_size: int = 128,
    min_objects: int = 2,
    max_objects: int = 5,
    generator_seed: int = 0,
    split: str = "train",
) -> SplitSummary:
    """Generate ``num_images`` scenes into ``out_dir`` (see the module docstring for the layout).

    Idempotent: every file is written atomically and regenerated identically for a seed; files
    of an earlier, larger run with this split's naming pattern are removed.

    Args:
      out_dir: the split folder (e.g. ``data/raw/embedded/train``).
      num_images: number of scenes; names are ``{split}_{index:05d}``.
      image_size: side of the square images.
      min_objects, max_objects: objects drawn per scene (before occlusion removes any).
      generator_seed: the seed; with ``split`` and the index it seeds each scene.
      split: the split name (part of the seed and of the file names).

    Returns:
      A :class:`SplitSummary` with counts, seconds and bytes on disk.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    dirs = {k: out_dir / k for k in ("im", "gt", "instances")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    names = [f"{split}_{i:05d}" for i in range(num_images)]
    keep = set(names)
    for d in dirs.values():  # a rerun with fewer images leaves no stale files behind
        for stale in d.glob(f"{split}_*"):
            if stale.stem not in keep:
                stale.unlink()

    images, annotations = [], []
    cat_counts = dict.fromkeys(CATEGORIES, 0)
    rel_counts = dict.fromkeys(_RELATIONS, 0)
    for index, name in enumerate(tqdm(names, desc=f"embedded {split}", unit="img", mininterval=10)):
        scene = generate_scene(
            scene_generator(generator_seed, split, index),
            image_size=image_size,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        gt = np.where(scene.instances == scene.target, 255, 0).astype(np.uint8)
        _atomic_write_bytes(
            dirs["im"] / f"{name}.jpg", _encode(Image.fromarray(scene.image), "JPEG", quality=JPEG_QUALITY)
        )
        _atomic_write_bytes(dirs["gt"] / f"{name}.png", _encode(Image.fromarray(gt), "PNG"))
        _atomic_write_bytes(
            dirs["instances"] / f"{name}.png", _encode(Image.fromarray(scene.instances), "PNG")
        )
        image_id = index + 1
        images.append(
            {
                "id": image_id,
                "file_name": f"{name}.jpg",
                "height": image_size,
                "width": image_size,
                "target_instance": scene.target,
            }
        )
        annotations.extend(_coco_annotations(scene, image_id, len(annotations) + 1))
        for c in scene.categories:
            cat_counts[c] += 1
        for r in scene.relations:
            rel_counts[r] += 1

    coco = {
        "info": {
            "description": f"Stable-SAM embedded dataset, split {split!r}",
            "version": "1",
            "seed": generator_seed,
            "image_size": image_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CATEGORIES)],
    }
    _atomic_write_bytes(out_dir / "instances.json", json.dumps(coco, separators=(",", ":")).encode())
    total_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    summary = SplitSummary(
        split=split,
        out_dir=out_dir,
        num_images=num_images,
        num_instances=len(annotations),
        image_size=image_size,
        seed=generator_seed,
        seconds=time.perf_counter() - start,
        bytes=total_bytes,
        category_counts=cat_counts,
        relation_counts=rel_counts,
    )
    logger.info(
        "embedded %s: %d images, %d instances, %.1f s, %.2f MB in %s",
        split,
        num_images,
        len(annotations),
        summary.seconds,
        total_bytes / 1e6,
        out_dir,
    )
    return summary
