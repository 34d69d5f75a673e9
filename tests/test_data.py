"""Folder datasets, the dataset registry, COCO, resizing conventions and LSJ augmentation."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from segment_anything.utils.transforms import ResizeLongestSide

from stable_sam import data


def _write_pair(
    im_dir: Path, gt_dir: Path, stem: str, size=(24, 32), *, empty=False, gray=False, mask_size=None
) -> None:
    rng = np.random.default_rng(zlib.crc32(stem.encode()))
    h, w = size
    im_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(im_dir / f"{stem}.jpg", quality=95)
    mh, mw = mask_size or size
    mask = np.zeros((mh, mw), np.uint8)
    if not empty:
        mask[mh // 4 : mh // 2, mw // 4 : mw // 2] = 255
    Image.fromarray(mask).save(gt_dir / f"{stem}.png")


# ------------------------------------------------------------------------------------------------
# Masks and pairs


def test_binarize_mask_uses_hqsam_threshold_and_channel_zero():
    gt = np.array([[0, 128, 129, 255]], np.uint8)
    assert data.binarize_mask(gt).tolist() == [[False, False, True, True]]
    rgb = np.stack([gt, np.full_like(gt, 255), np.zeros_like(gt)], axis=-1)
    assert data.binarize_mask(rgb).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="shape"):
        data.binarize_mask(np.zeros((2, 2, 2, 2)))


def test_find_pairs_sorted_by_stem_and_same_folder_layout(tmp_path):
    for stem in ["b", "a", "c"]:
        _write_pair(tmp_path / "im", tmp_path / "gt", stem)
    pairs = data.find_pairs(tmp_path / "im", tmp_path / "gt")
    assert [p.name for p in pairs] == ["a", "b", "c"]
    assert (
        pairs[0].image_path == tmp_path / "im" / "a.jpg" and pairs[0].mask_path == tmp_path / "gt" / "a.png"
    )
    # cascade_psp: x.jpg and x.png side by side; other files are ignored.
    flat = tmp_path / "flat"
    for stem in ["x", "y"]:
        _write_pair(flat, flat, stem)
    (flat / "README.txt").write_text("not data")
    assert [p.name for p in data.find_pairs(flat, flat)] == ["x", "y"]


def test_stray_files_are_skipped_named_and_counted(tmp_path, caplog):
    for i in range(25):
        _write_pair(tmp_path / "im", tmp_path / "gt", f"img{i:02d}")
    for i in range(22):
        (tmp_path / "gt" / f"img{i:02d}.png").unlink()
    (tmp_path / "gt" / "orphan.png").write_bytes(b"x")
    listing = data.list_pairs(tmp_path / "im", tmp_path / "gt")
    assert [p.name for p in listing.pairs] == ["img22", "img23", "img24"]
    reasons = {Path(s.path).name: s.reason for s in listing.unmatched}
    assert len(reasons) == 23
    assert reasons["img00.jpg"] == f"image without a .png mask in {tmp_path / 'gt'}"
    assert reasons["orphan.png"] == f"mask without a .jpg image in {tmp_path / 'im'}"
    with caplog.at_level("WARNING"):
        assert len(data.find_pairs(tmp_path / "im", tmp_path / "gt")) == 3
    assert f"skipping {tmp_path / 'gt' / 'orphan.png'}: mask without a .jpg image" in caplog.text
    # Opening the folder as a dataset keeps the 3 pairs and records the 23 strays.
    ds = data.open_dataset(str(tmp_path), split="val")
    assert len(ds) == 3 and len(ds.unmatched) == 23 and ds.num_skipped == 23
    assert {
        "path": str(tmp_path / "gt" / "orphan.png"),
        "reason": reasons["orphan.png"],
    } in ds.skipped_dicts()
    # Only when nothing is left is it an error, naming the folders and the strays.
    for i in range(22, 25):
        (tmp_path / "gt" / f"img{i:02d}.png").unlink()
    with pytest.raises(data.DatasetError) as err:
        data.open_dataset(str(tmp_path), split="val")
    message = str(err.value)
    assert (
        f"no .jpg images with .png masks of the same stem in {tmp_path / 'im'} and {tmp_path / 'gt'}"
        in message
    )
    assert "26 stray file(s)" in message and "img00.jpg" in message and "(and 6 more)" in message


def test_find_pairs_missing_or_empty_folder(tmp_path):
    with pytest.raises(data.DatasetError, match="not found"):
        data.find_pairs(tmp_path / "nope", tmp_path / "gt")
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    with pytest.raises(data.DatasetError, match=r"no \.jpg images"):
        data.find_pairs(tmp_path / "im", tmp_path / "gt")


# ------------------------------------------------------------------------------------------------
# SegmentationFolder


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """3 good pairs, a corrupt image, a size mismatch, an empty mask."""
    im, gt = tmp_path / "im", tmp_path / "gt"
    for stem in ["good1", "good2", "good3"]:
        _write_pair(im, gt, stem)
    _write_pair(im, gt, "corrupt")
    (im / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    _write_pair(im, gt, "mismatch", mask_size=(20, 32))
    _write_pair(im, gt, "empty", empty=True)
    return tmp_path


def test_full_validation_skips_bad_pairs_with_reasons(messy_folder):
    ds = data.SegmentationFolder(
        data.find_pairs(messy_folder / "im", messy_folder / "gt"), name="t", validate="full"
    )
    assert [p.name for p in ds.pairs] == ["good1", "good2", "good3"]
    reasons = {Path(s.path).stem: s.reason for s in ds.skipped}
    assert set(reasons) == {"corrupt", "mismatch", "empty"}
    assert "corrupt image" in reasons["corrupt"]
    assert "32x24" in reasons["mismatch"] and "32x20" in reasons["mismatch"]
    assert "empty mask" in reasons["empty"]
    sample = ds[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape == (24, 32, 3)
    assert sample.mask.dtype == bool and sample.mask.shape == (24, 32) and sample.mask.any()
    assert ds.skipped_dicts()[0].keys() == {"path", "reason"}


def test_header_validation_is_cheap_and_an_undecodable_pair_is_named_not_replaced(messy_folder):
    pairs = data.find_pairs(messy_folder / "im", messy_folder / "gt")
    ds = data.SegmentationFolder(pairs, name="t", validate="header")
    # Headers catch the unreadable image and the size mismatch; the empty mask needs decoding.
    assert {Path(s.path).stem for s in ds.skipped} == {"corrupt", "mismatch"}
    names = [p.name for p in ds.pairs]
    assert names == ["empty", "good1", "good2", "good3"]
    with pytest.raises(data.BadSampleError) as err:
        ds[0]  # never replaced by another pair: the index is "empty" or nothing
    assert f"dataset 't': {messy_folder / 'im' / 'empty.jpg'}: empty mask" in str(err.value)
    assert "validate='full'" in str(err.value)
    assert {Path(s.path).stem for s in ds.skipped} == {"corrupt", "mismatch", "empty"}
    with pytest.raises(data.BadSampleError):
        ds[0]
    assert ds.num_skipped == 3  # recorded once
    assert [ds[i].name for i in range(1, 4)] == ["good1", "good2", "good3"]


def _truncated_jpeg(path: Path) -> None:
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2])  # the header still reads, the pixels do not


def test_folder_given_as_eval_set_counts_each_distinct_image_once(tmp_path):
    """A plain folder opens with a full decode check: length = distinct decodable images."""
    for stem in ["a", "b", "c", "d"]:
        _write_pair(tmp_path / "im", tmp_path / "gt", stem, size=(64, 80))
    _truncated_jpeg(tmp_path / "im" / "b.jpg")
    header = data.open_dataset(str(tmp_path), split="val", validate="header")
    assert len(header) == 4  # the header check cannot see it ...
    with pytest.raises(data.BadSampleError, match=r"b\.jpg: corrupt image: .*truncated"):
        header[1]  # ... and the index does not silently become "c"
    ds = data.open_dataset(str(tmp_path), split="val")
    assert [ds[i].name for i in range(len(ds))] == ["a", "c", "d"]
    assert ds.num_skipped == 1 and ds.skipped[0].path == str(tmp_path / "im" / "b.jpg")
    assert ds.skipped[0].reason.startswith("corrupt image: image file is truncated")


def test_decompression_bombs_are_skipped_and_named(tmp_path, monkeypatch):
    for stem in ["big", "small"]:
        _write_pair(tmp_path / "im", tmp_path / "gt", stem, size=(8, 8))
    _write_pair(tmp_path / "im", tmp_path / "gt", "big", size=(64, 64))
    _write_pair(tmp_path / "im", tmp_path / "gt", "bigmask", size=(8, 8))
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "gt" / "bigmask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000
    for validate in ("header", "full"):
        ds = data.open_dataset(str(tmp_path), split="val", validate=validate)
        assert [p.name for p in ds.pairs] == ["small"]
        reasons = {Path(s.path).stem: s.reason for s in ds.skipped}
        assert reasons["big"].startswith("image is over Pillow's decompression-bomb limit: Image size")
        assert "(4096 pixels) exceeds limit of 2000 pixels" in reasons["big"]
        assert "Image.MAX_IMAGE_PIXELS = 1000" in reasons["big"]
        assert reasons["bigmask"].startswith(f"mask {tmp_path / 'gt' / 'bigmask.png'} is over Pillow's")


def test_exclude_list_and_no_valid_pair(messy_folder):
    pairs = data.find_pairs(messy_folder / "im", messy_folder / "gt")
    exclude = {str(p.image_path): "known bad" for p in pairs if p.name != "good2"}
    ds = data.SegmentationFolder(pairs, name="t", validate="none", exclude=exclude)
    assert [p.name for p in ds.pairs] == ["good2"] and len(ds.skipped) == 5
    bad = [p for p in pairs if p.name in ("corrupt", "mismatch", "empty")]
    with pytest.raises(data.DatasetError, match="no valid image/mask pair"):
        data.SegmentationFolder(bad, name="bad", validate="full")


def test_grayscale_image_and_rgb_mask(tmp_path):
    _write_pair(tmp_path / "im", tmp_path / "gt", "g", gray=True)
    mask = np.zeros((24, 32, 3), np.uint8)
    mask[2:6, 2:6, 0] = 255  # channel 0 only
    mask[10:12, 10:12, 1] = 255
    Image.fromarray(mask).save(tmp_path / "gt" / "g.png")
    sample = data.SegmentationFolder(
        data.find_pairs(tmp_path / "im", tmp_path / "gt"), name="t", validate="full"
    )[0]
    assert sample.image.shape == (24, 32, 3)
    assert np.array_equal(sample.image[..., 0], sample.image[..., 2])
    assert sample.mask.sum() == 16


# ------------------------------------------------------------------------------------------------
# Registry


def _hqseg_tree(root: Path) -> None:
    for spec in (*data.HQSEG44K_TRAIN, *data.HQSEG_EVAL):
        _write_pair(root / spec.im_dir, root / spec.gt_dir, f"{spec.name.lower()}_0")


def test_registry_matches_hqsam_layout():
    names = [s.name for s in data.HQSEG_EVAL]
    assert names == ["DIS-VD", "COIFT", "HR-SOD", "ThinObject5K-TE"]
    assert dict((s.name, s.gt_dir) for s in data.HQSEG_EVAL)["HR-SOD"].endswith("HRSOD/masks_max255")
    assert len(data.HQSEG44K_TRAIN) == 7
    assert all(data.dataset_family(n) == "hqseg44k" for n in ["hqseg44k", "DIS-VD", "DUTS-TE"])
    assert data.dataset_family("embedded") == "embedded" and data.dataset_family("/some/path") is None


def test_open_named_datasets(tmp_path):
    _hqseg_tree(tmp_path)
    mix = data.open_dataset("hqseg44k", split="train", root=tmp_path)
    assert len(mix) == 7
    assert mix.pairs[0].name == "DIS5K-TR/dis5k-tr_0"  # folder-prefixed names stay unique
    for name in ["DIS-VD", "COIFT", "HR-SOD", "ThinObject5K-TE"]:
        ds = data.open_dataset(name, split="val", root=tmp_path)
        assert len(ds) == 1
    assert "masks_max255" in str(data.open_dataset("HR-SOD", split="val", root=tmp_path).pairs[0].mask_path)
    with pytest.raises(data.DatasetError, match="has no split 'train'"):
        data.open_dataset("DIS-VD", split="train", root=tmp_path)
    with pytest.raises(data.DatasetError, match="needs the root"):
        data.open_dataset("DIS-VD", split="val")


def test_open_user_folder_and_unknown_name(tmp_path):
    _write_pair(tmp_path / "mine" / "im", tmp_path / "mine" / "gt", "a")
    assert len(data.open_dataset(str(tmp_path / "mine"), split="train")) == 1
    _write_pair(tmp_path / "split" / "val" / "im", tmp_path / "split" / "val" / "gt", "b")
    assert data.open_dataset(str(tmp_path / "split"), split="val").pairs[0].name == "b"
    with pytest.raises(data.DatasetError, match="neither a registered dataset name"):
        data.open_dataset("no-such-dataset", split="train")


# ------------------------------------------------------------------------------------------------
# COCO


def test_coco_instances_polygons_rle_and_crowd(tmp_path):
    h, w = 40, 50
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "img1.jpg")
    rle_mask = np.zeros((h, w), np.uint8)
    rle_mask[5:15, 30:45] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 100.0, "bbox": [10, 20, 10, 10],
         "segmentation": [[10, 20, 20, 20, 20, 30, 10, 30]]},
        {"id": 2, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 150.0, "bbox": [30, 5, 15, 10],
         "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 5, "iscrowd": 1, "area": 150.0, "bbox": [0, 0, 5, 5],
         "segmentation": rle},
    ]  # fmt: skip
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "img1.jpg", "height": h, "width": w}],
                "annotations": anns,
                "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}],
            }
        )
    )
    ds = data.CocoInstances(tmp_path, ann_file)
    sample = ds[0]
    assert sample.masks.shape == (2, h, w) and sample.masks.dtype == bool
    reference = COCO(str(ann_file))
    assert np.array_equal(sample.masks[0], reference.annToMask(reference.anns[1]).astype(bool))
    assert np.array_equal(sample.masks[1], rle_mask.astype(bool))
    assert sample.boxes.tolist() == [[10, 20, 20, 30], [30, 5, 45, 15]]
    assert sample.category_ids.tolist() == [3, 5] and sample.annotation_ids.tolist() == [1, 2]
    assert len(data.CocoInstances(tmp_path, ann_file, include_crowd=True)[0].masks) == 3
    assert ds.coco.getImgIds() == [1]
    (tmp_path / "img1.jpg").unlink()
    with pytest.raises(data.DatasetError, match=r"missing.*img1\.jpg"):
        data.CocoInstances(tmp_path, ann_file)


# ------------------------------------------------------------------------------------------------
# Resizing


def test_resize_longest_side_is_sams_transform():
    image = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    out = data.resize_longest_side(image, 1024)
    assert out.shape == (614, 1024, 3)
    assert np.array_equal(out, ResizeLongestSide(1024).apply_image(image))
    mask = np.zeros((60, 100), bool)
    mask[10:30, 20:60] = True
    m = data.resize_mask_longest_side(mask, 1024)
    assert m.shape == (614, 1024) and m.dtype == bool
    assert abs(m.mean() - mask.mean()) < 0.01


def test_resize_stretch_matches_hqsam_interpolate_and_truncation():
    image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = data.resize_stretch(image, 64)
    ref = F.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(),
        size=(64, 64),
        mode="bilinear",
        align_corners=False,
    )[0].permute(1, 2, 0)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, ref.numpy().astype(np.uint8))
    label = np.zeros((30, 50), np.uint8)
    label[:, :25] = 255
    hard = data.resize_mask_stretch(label, 64)
    soft = data.resize_mask_stretch(label, 64, soft=True)
    ref_label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(64, 64), mode="bilinear")[
        0, 0
    ]
    assert np.array_equal(hard, (ref_label > 128).numpy())
    assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert np.array_equal(data.resize_mask_stretch(label > 128, 64), hard)  # bool masks alike


def test_prepare_eval_image_modes():
    image = np.zeros((40, 80, 3), np.uint8)
    mask = np.zeros((40, 80), bool)
    mask[10:20, 10:40] = True
    im, m, size = data.prepare_eval_image(image, mask, mode="stretch", target_length=64)
    assert im.shape == (64, 64, 3) and m.shape == (64, 64) and size == (64, 64)
    im, m, size = data.prepare_eval_image(image, mask, mode="longest_side", target_length=64)
    assert im.shape == (32, 64, 3) and m.shape == (32, 64) and size == (32, 64)
    with pytest.raises(ValueError, match="resize mode"):
        data.prepare_eval_image(image, mask, mode="pad", target_length=64)


# ------------------------------------------------------------------------------------------------
# Augmentation


def test_random_hflip_is_driven_by_the_generator():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    mask = np.array([[1, 0, 0], [1, 0, 0]], bool)
    flipped_im, flipped_mask = data.random_hflip(
        image, mask, generator=np.random.default_rng(0), probability=1.0
    )
    assert np.array_equal(flipped_im, image[:, ::-1]) and np.array_equal(flipped_mask, mask[:, ::-1])
    same_im, _ = data.random_hflip(image, mask, generator=np.random.default_rng(0), probability=0.0)
    assert same_im is image
    draws = [data.random_hflip(image, mask, generator=np.random.default_rng(s))[1][0, 0] for s in range(40)]
    assert 5 < sum(draws) < 35


def test_large_scale_jitter_geometry_padding_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:35, 10:50] = True
    out_im, out_mask, (vh, vw) = data.large_scale_jitter(
        image, mask, generator=np.random.default_rng(3), output_size=64
    )
    assert out_im.shape == (64, 64, 3) and out_im.dtype == np.uint8
    assert out_mask.shape == (64, 64) and out_mask.dtype == np.float32
    assert 0 <= out_mask.min() and out_mask.max() <= 1
    assert (out_im[vh:, :] == 128).all() and (out_im[:, vw:] == 128).all()
    assert (out_mask[vh:, :] == 0).all() and (out_mask[:, vw:] == 0).all()
    again = data.large_scale_jitter(image, mask, generator=np.random.default_rng(3), output_size=64)
    assert np.array_equal(again[0], out_im) and np.array_equal(again[1], out_mask)
    # Scale 1 of a square image: the identity, no padding.
    square = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    sq_mask = np.zeros((64, 64), bool)
    sq_mask[:10] = True
    im1, m1, valid = data.large_scale_jitter(
        square, sq_mask, generator=np.random.default_rng(0), output_size=64, min_scale=1.0, max_scale=1.0
    )
    assert (
        valid == (64, 64) and np.array_equal(im1, square) and np.array_equal(m1, sq_mask.astype(np.float32))
    )
    # Scale 0.5: content in the top-left 32 x 32, the rest padded.
    _, _, valid = data.large_scale_jitter(
        square, sq_mask, generator=np.random.default_rng(0), output_size=64, min_scale=0.5, max_scale=0.5
    )
    assert valid == (32, 32)
    # Scale 2: a 64 x 64 crop out of 128 x 128.
    im2, _, valid = data.large_scale_jitter(
        square, sq_mask, generator=np.random.default_rng(0), output_size=64, min_scale=2.0, max_scale=2.0
    )
    assert valid == (64, 64) and not (im2 == 128).all()
