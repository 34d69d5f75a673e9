"""The procedurally generated embedded dataset: layout, determinism and the ways it is hard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from pipeline.sources import CATEGORIES, generate_scene, generate_split, scene_generator
from stable_sam import data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "train"
    generate_split(
        out, num_images=24, image_size=96, min_objects=2, max_objects=5, generator_seed=7, split="train"
    )
    return out


def test_layout_and_annotations_agree(split_dir):
    names = sorted(p.stem for p in (split_dir / "im").glob("*.jpg"))
    assert names == [f"train_{i:05d}" for i in range(24)]
    coco = COCO(str(split_dir / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    for image_info in coco.loadImgs(coco.getImgIds()):
        stem = Path(image_info["file_name"]).stem
        with Image.open(split_dir / "im" / f"{stem}.jpg") as im:
            assert im.mode == "RGB" and im.size == (96, 96)
        gt = np.asarray(Image.open(split_dir / "gt" / f"{stem}.png"))
        inst = np.asarray(Image.open(split_dir / "instances" / f"{stem}.png"))
        assert gt.dtype == np.uint8 and gt.ndim == 2 and set(np.unique(gt)) <= {0, 255}
        ids = np.unique(inst)
        k = len(ids) - 1
        assert ids.tolist() == list(range(k + 1))  # ids 1..K, all visible
        # gt/ is ONE object: the target instance, not tiny.
        target = image_info["target_instance"]
        assert np.array_equal(gt == 255, inst == target)
        assert (gt == 255).sum() >= max(40, 0.01 * 96 * 96)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_info["id"]]))
        assert [a["z_order"] for a in anns] == list(range(1, k + 1))
        for a in anns:
            assert np.array_equal(coco.annToMask(a).astype(bool), inst == a["z_order"])


def test_generation_is_byte_identical_for_a_seed(tmp_path):
    kwargs = dict(num_images=6, image_size=64, min_objects=2, max_objects=4, generator_seed=3, split="val")
    generate_split(tmp_path / "a", **kwargs)
    generate_split(tmp_path / "b", **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) == 6 * 3 + 1
    generate_split(tmp_path / "c", **{**kwargs, "generator_seed": 4})
    assert _files(tmp_path / "c")["im/val_00000.jpg"] != a["im/val_00000.jpg"]


def test_scenes_do_not_depend_on_their_neighbours():
    one = generate_scene(scene_generator(0, "train", 5), image_size=64, min_objects=2, max_objects=4)
    again = generate_scene(scene_generator(0, "train", 5), image_size=64, min_objects=2, max_objects=4)
    other_split = generate_scene(scene_generator(0, "val", 5), image_size=64, min_objects=2, max_objects=4)
    assert np.array_equal(one.image, again.image)
    assert not np.array_equal(one.image, other_split.image)


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path):
    generate_split(tmp_path, num_images=5, image_size=48, generator_seed=0, split="train")
    summary = generate_split(tmp_path, num_images=3, image_size=48, generator_seed=0, split="train")
    assert len(list((tmp_path / "im").iterdir())) == 3 and len(list((tmp_path / "gt").iterdir())) == 3
    assert summary.num_images == 3 and summary.bytes > 0


def test_the_dataset_is_hard_where_the_method_matters(split_dir):
    """Textured backgrounds, several objects that touch, nest and are cut by the border, thin
    structures, holes."""
    stats = dict(multi=0, touch=0, nested=0, thin=0, holes=0, border=0, textured=0)
    for inst_path in sorted((split_dir / "instances").glob("*.png")):
        inst = np.asarray(Image.open(inst_path))
        image = np.asarray(Image.open(split_dir / "im" / f"{inst_path.stem}.jpg")).astype(float)
        masks = data.instance_masks(inst)
        stats["multi"] += len(masks) >= 2
        if image[inst == 0].std(axis=0).mean() > 8:  # background varies: texture, not a flat colour
            stats["textured"] += 1
        for k, m in enumerate(masks, start=1):
            ring = ndimage.binary_dilation(m) & ~m
            neighbours = set(np.unique(inst[ring]).tolist()) - {k}
            stats["touch"] += bool(neighbours - {0})
            # Nested: another object fills a hole of this one's visible mask.
            filled = ndimage.binary_fill_holes(m)
            stats["nested"] += any(filled[inst == j].all() for j in range(1, len(masks) + 1) if j != k)
            stats["thin"] += ndimage.distance_transform_edt(m).max() <= 2.0
            stats["holes"] += (ndimage.binary_fill_holes(m) & ~m).sum() > 0
            stats["border"] += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    assert stats["multi"] >= 20, stats
    assert stats["textured"] >= 20, stats
    for key in ("touch", "nested", "thin", "holes", "border"):
        assert stats[key] >= 3, (key, stats)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="min_objects"):
        generate_split(tmp_path, num_images=1, min_objects=4, max_objects=2)
    with pytest.raises(ValueError, match="num_images"):
        generate_split(tmp_path, num_images=0)
