"""stable_sam.evaluation: draws, α1 = 0 vs SAM, the read-only cache, COCO noisy boxes, summaries."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import perturb_plugins, random_stable_sam

from stable_sam.boxes import box_from_mask, box_iou
from stable_sam.data import CocoSample, Sample
from stable_sam.embedding_cache import EmbeddingCache, ReadOnlyEmbeddingCache
from stable_sam.evaluation import (
    DetectionsError,
    coco_box_detections,
    coco_gt_subset,
    coco_noisy_box_detections,
    coco_noisy_boxes,
    decode_prompts,
    embed_images,
    eval_prompts,
    evaluate_prompts,
    per_image_rows,
    prepare_coco_image,
    prepare_image,
    read_coco_detections,
    summarize,
)
from stable_sam.evaluation.coco_detections import _frame_boxes
from stable_sam.metrics import coco_mask_ap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blob_image(seed: int, size: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured image with two rectangles and an ellipse; returns (image, instance masks)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for k in range(3):
        y0, x0 = rng.integers(4, size // 2, size=2)
        h, w = rng.integers(10, size // 2, size=2)
        if k == 2:
            cy, cx = y0 + h / 2, x0 + w / 2
            mask = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        else:
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        image[mask] = rng.integers(100, 255, size=3, dtype=np.uint8)
        for previous in masks:
            previous &= ~mask
        masks.append(mask)
    return image, [m for m in masks if m.sum() > 10]


@pytest.fixture(scope="module")
def model():
    m, _ = random_stable_sam("tiny", seed=3)
    perturb_plugins(m, seed=4)
    return m.eval()


@pytest.fixture(scope="module")
def images(model):
    out = []
    for i in range(3):
        image, masks = _blob_image(i)
        out.append(
            prepare_image(
                Sample(f"im{i}", image, masks[0]), index=i, resize="stretch", image_size=model.img_size
            )
        )
    return out


def test_draw_ids_pick_the_evaluation_draws(images, model):
    all_draws = eval_prompts(images[0], "point_3", draws=5, seed=7, mask_input_size=model.mask_input_size)
    picked = eval_prompts(
        images[0], "point_3", draws=2, seed=7, mask_input_size=model.mask_input_size, draw_ids=[3, 1]
    )
    np.testing.assert_array_equal(picked[0].point_coords, all_draws[3].point_coords)
    np.testing.assert_array_equal(picked[1].point_coords, all_draws[1].point_coords)
    assert not np.array_equal(all_draws[0].point_coords, all_draws[1].point_coords)
    # Deterministic kinds give one prompt whatever the draws.
    assert len(eval_prompts(images[0], "gt_box", draws=5, seed=7, mask_input_size=model.mask_input_size)) == 1
    with pytest.raises(ValueError, match="distinct"):
        eval_prompts(images[0], "point_1", draws=2, seed=0, mask_input_size=(16, 16), draw_ids=[1, 1])


def test_forced_alpha1_zero_gives_exactly_sams_records(images, model):
    embeddings = embed_images(model, images, progress=False)
    settings = {
        "sam": model.plugins_disabled,
        "alpha0": lambda: model.forced_alpha1(0.0),
        "stable_sam": contextlib.nullcontext,
    }
    records = evaluate_prompts(
        model,
        images,
        embeddings,
        kinds=["noisy_box", "point_1"],
        draws=3,
        seed=0,
        settings=settings,
        progress=False,
    )

    def by(setting):
        return [
            (r["image"], r["kind"], r["draw"], r.get("iou"), r.get("biou"), r.get("st"))
            for r in records
            if r["setting"] == setting
        ]

    assert by("alpha0") == by("sam")
    assert by("stable_sam") != by("sam")  # the perturbed plug-in does change predictions
    # and the masks themselves, not just their scores, are identical
    prompts = eval_prompts(images[1], "point_1", draws=3, seed=0, mask_input_size=model.mask_input_size)
    with model.plugins_disabled():
        sam = decode_prompts(model, embeddings[1], prompts, image=images[1])
    with model.forced_alpha1(0.0):
        zero = decode_prompts(model, embeddings[1], prompts, image=images[1])
    np.testing.assert_array_equal(sam.masks, zero.masks)
    assert sam.alpha1 is None and sam.offsets is None
    assert np.allclose(zero.alpha1, 0.0) and zero.offsets is not None


def test_records_carry_draw_ids_and_stability(images, model):
    embeddings = embed_images(model, images, progress=False)
    records = evaluate_prompts(
        model,
        images,
        embeddings,
        kinds=["point_1", "gt_box"],
        draws=2,
        draw_ids=[4, 2],
        seed=0,
        settings={"s": contextlib.nullcontext},
        progress=False,
    )
    draws = {r["draw"] for r in records if r["kind"] == "point_1"}
    assert draws == {4, 2, -1}
    assert {r["draw"] for r in records if r["kind"] == "gt_box"} == {4}
    st = [r["st"] for r in records if r["draw"] == -1]
    assert len(st) == len(images) and all(0.0 <= v <= 1.0 for v in st)


def test_image_with_vanished_gt_is_skipped(model, images):
    image, masks = _blob_image(0)
    empty = prepare_image(
        Sample("tiny", image, masks[0]), index=9, resize="stretch", image_size=model.img_size
    )
    empty.frame_mask[:] = False
    embeddings = embed_images(model, [images[0], empty], progress=False)
    records = evaluate_prompts(
        model,
        [images[0], empty],
        embeddings,
        kinds=["gt_box"],
        draws=1,
        seed=0,
        settings={"s": contextlib.nullcontext},
        progress=False,
    )
    assert {r["image"] for r in records} == {"im0"}


def test_read_only_cache_never_writes(tmp_path, images, model):
    folder = tmp_path / "cache"
    writer = EmbeddingCache(folder, max_memory_items=0)
    embed_images(model, images[:2], cache=writer, progress=False)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*.pt"))
    assert len(before) == 2
    reader = ReadOnlyEmbeddingCache(folder)
    out = embed_images(model, images, cache=reader, progress=False)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.pt")) == before
    assert (reader.hits, reader.computed) == (2, 1)
    # a second lookup of the computed image is a memory hit
    embed_images(model, images[2:], cache=reader, progress=False)
    assert reader.computed == 1
    torch.testing.assert_close(out[0], embed_images(model, images[:1], progress=False)[0])


def test_cached_embedding_stores_one_image_not_the_batch(tmp_path, images, model):
    cache = EmbeddingCache(tmp_path, max_memory_items=0)
    out = embed_images(model, images, cache=cache, batch_size=3, progress=False)
    assert out[1].untyped_storage().nbytes() == out[1].numel() * out[1].element_size()
    sizes = {p.stat().st_size for p in tmp_path.rglob("*.pt")}
    assert max(sizes) < 2 * out[0].numel() * 4 + 4096


def _coco_sample(seed: int, image_id: int) -> CocoSample:
    image, masks = _blob_image(seed)
    return CocoSample(
        image_id=image_id,
        file_name=f"{image_id}.jpg",
        image=image,
        masks=np.stack(masks),
        boxes=np.stack([box_from_mask(m) for m in masks]),
        category_ids=np.arange(1, len(masks) + 1),
        annotation_ids=np.arange(10 * image_id, 10 * image_id + len(masks)),
    )


def test_coco_noisy_boxes_lie_in_the_iou_window(model):
    coco = prepare_coco_image(_coco_sample(5, 1), index=0, resize="stretch", image_size=model.img_size)
    prompts, kept, _ = coco_noisy_boxes(coco, seed=0)
    assert kept == list(range(len(coco.frame_masks)))
    for prompt, j in zip(prompts, kept):
        assert 0.5 <= box_iou(prompt.box, box_from_mask(coco.frame_masks[j])) <= 0.6
    again, _, _ = coco_noisy_boxes(coco, seed=0)
    assert all(np.array_equal(a.box, b.box) for a, b in zip(prompts, again))
    other, _, _ = coco_noisy_boxes(coco, seed=1)
    assert any(not np.array_equal(a.box, b.box) for a, b in zip(prompts, other))


def test_coco_detections_feed_coco_mask_ap(model):
    samples = [_coco_sample(s, s + 1) for s in range(3)]
    cocos = [
        prepare_coco_image(s, index=i, resize="stretch", image_size=model.img_size)
        for i, s in enumerate(samples)
    ]
    embeddings = embed_images(model, [c.image for c in cocos], progress=False)
    results = coco_noisy_box_detections(
        model,
        cocos,
        embeddings,
        settings={"sam": model.plugins_disabled, "stable_sam": contextlib.nullcontext},
        seed=0,
        progress=False,
    )
    instances = sum(len(s.masks) for s in samples)
    for result in results.values():
        assert result.prompted == instances and result.skipped == 0
        assert len(result.detections) == instances
        assert {d["image_id"] for d in result.detections} == {1, 2, 3}
    gt = {
        "images": [{"id": s.image_id, "height": 64, "width": 64, "file_name": s.file_name} for s in samples]
        + [{"id": 99, "height": 64, "width": 64, "file_name": "other.jpg"}],
        "annotations": [
            {"image_id": s.image_id, "category_id": int(c), "segmentation": _rle(m), "bbox": [0, 0, 1, 1]}
            for s in samples
            for m, c in zip(s.masks, s.category_ids)
        ],
        "categories": [{"id": k, "name": str(k)} for k in range(1, 4)],
    }
    subset = coco_gt_subset(gt, [1, 2, 3])
    assert [img["id"] for img in subset["images"]] == [1, 2, 3]
    ap = coco_mask_ap(subset, results["sam"].detections)
    assert 0.0 <= ap["map"] <= ap["map50"] <= 1.0
    # Perfect masks with the same scores give AP 1: the detections are scored against the right GT.
    perfect = [
        {**d, "segmentation": _rle(samples[d["image_id"] - 1].masks[int(d["category_id"]) - 1])}
        for d in results["sam"].detections
    ]
    assert coco_mask_ap(subset, perfect)["map"] == pytest.approx(1.0)


def _rle(mask: np.ndarray) -> dict:
    from stable_sam.metrics import encode_mask

    return encode_mask(mask)


# ------------------------------------------------------------------------------------------------
# COCO with detector boxes (a COCO results file)

_DETECTION = {"image_id": 1, "category_id": 2, "bbox": [4.0, 6.0, 20.0, 10.0], "score": 0.9}


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[{", "not JSON"),
        (json.dumps({"annotations": []}), "a COCO results file is a JSON list of detections, got a dict"),
        (json.dumps([3]), "detection 0 is not an object with image_id, category_id, bbox, score (got int 3)"),
        (
            json.dumps([_DETECTION, {"image_id": 1, "bbox": [0, 0, 1, 1]}]),
            "detection 1 lacks category_id, score (a detection has image_id, category_id, bbox, score)",
        ),
        (
            json.dumps([{**_DETECTION, "image_id": 7}]),
            "detection 0 image_id 7 is not an image of the annotations",
        ),
        (json.dumps([{**_DETECTION, "bbox": [0, 0, 4]}]), "detection 0 bbox [0, 0, 4] is not 4 numbers"),
        (
            json.dumps([{**_DETECTION, "bbox": [0, "1", 4, 4]}]),
            "detection 0 bbox [0, '1', 4, 4] is not 4 numbers [x, y, width, height]",
        ),
        (json.dumps([{**_DETECTION, "bbox": [0, 0, -4, 4]}]), "has a negative width or height"),
        (json.dumps([{**_DETECTION, "score": None}]), "detection 0 score None is not a number"),
        (
            json.dumps([{**_DETECTION, "category_id": 9}]),
            "detection 0 category_id 9 is not a category of the annotations",
        ),
    ],
)
def test_a_bad_detections_file_is_an_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "detections.json"
    path.write_text(content)
    with pytest.raises(DetectionsError) as caught:
        read_coco_detections(path, image_ids=[1, 2], category_ids=[1, 2])
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)
    with pytest.raises(DetectionsError, match=r"^detections file not found: .*missing\.json$"):
        read_coco_detections(tmp_path / "missing.json", image_ids=[1], category_ids=[1])


def test_detections_by_image_with_a_score_floor_and_images_not_evaluated(tmp_path):
    path = tmp_path / "detections.json"
    entries = [_DETECTION, {**_DETECTION, "score": 0.1}, {**_DETECTION, "image_id": 2}]
    path.write_text(json.dumps(entries))
    read = read_coco_detections(path, image_ids=[1, 2], category_ids=[2], evaluated=[1], min_score=0.5)
    assert (read.total, read.below_min_score, read.outside, read.kept) == (3, 1, 1, 1)
    np.testing.assert_array_equal(read.boxes[1], [[4.0, 6.0, 24.0, 16.0]])  # xywh -> xyxy
    assert read.scores[1].tolist() == [0.9] and read.category_ids[1].tolist() == [2]
    everything = read_coco_detections(path, image_ids=[1, 2], category_ids=[2])
    assert everything.kept == 3 and sorted(everything.boxes) == [1, 2]


def test_detector_boxes_are_scaled_into_the_model_frame_like_sampredictor():
    sample = _coco_sample(5, 1)
    sample.image = np.zeros((32, 64, 3), np.uint8)  # a wide image: the two resizes differ
    sample.masks = np.zeros((1, 32, 64), bool)
    sample.masks[0, 4:20, 8:40] = True
    box = np.array([[8.0, 4.0, 40.0, 20.0]])
    stretched = prepare_coco_image(sample, index=0, resize="stretch", image_size=64)
    np.testing.assert_allclose(_frame_boxes(box, stretched), [[8.0, 8.0, 40.0, 40.0]])
    longest = prepare_coco_image(sample, index=0, resize="longest_side", image_size=64)
    np.testing.assert_allclose(_frame_boxes(box, longest), box)  # 64 x 32 is already the frame


def test_detector_boxes_give_masks_scored_by_the_detection(tmp_path, model):
    samples = [_coco_sample(s, s + 1) for s in range(2)]
    cocos = [
        prepare_coco_image(s, index=i, resize="stretch", image_size=model.img_size)
        for i, s in enumerate(samples)
    ]
    embeddings = embed_images(model, [c.image for c in cocos], progress=False)
    # The GT boxes as detections, category 7 and score 0.5 each, plus one on an image not evaluated.
    entries = [
        {
            "image_id": s.image_id,
            "category_id": 7,
            "bbox": [float(v) for v in mask_utils_bbox(m)],
            "score": 0.5,
        }
        for s in samples
        for m in s.masks
    ]
    path = tmp_path / "detections.json"
    path.write_text(json.dumps([*entries, {**entries[0], "image_id": 3}]))
    detections = read_coco_detections(path, image_ids=[1, 2, 3], category_ids=[7], evaluated=[1, 2])
    settings = {"sam": model.plugins_disabled, "stable_sam": contextlib.nullcontext}
    scored = coco_box_detections(model, cocos, embeddings, detections, settings=settings, progress=False)
    plain = coco_box_detections(
        model, cocos, embeddings, detections, settings=settings, score="detection", progress=False
    )
    for name in settings:
        assert scored[name].prompted == len(entries) == len(scored[name].detections)
        assert {d["category_id"] for d in scored[name].detections} == {7}
        assert [d["segmentation"] for d in scored[name].detections] == [
            d["segmentation"] for d in plain[name].detections
        ]
        assert {d["score"] for d in plain[name].detections} == {0.5}
        assert all(0 <= d["score"] <= 0.5 for d in scored[name].detections)  # x predicted IoU
    with pytest.raises(ValueError, match="score must be one of"):
        coco_box_detections(model, cocos, embeddings, detections, settings=settings, score="iou")


def mask_utils_bbox(mask: np.ndarray) -> list[float]:
    """The COCO bbox [x, y, w, h] of a mask, as pycocotools computes it for annotations."""
    from pycocotools import mask as mask_utils

    return mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()


def _record(dataset, image, setting, iou, alpha1=None, draw=0):
    return {
        "dataset": dataset,
        "image": image,
        "kind": "point_1",
        "setting": setting,
        "draw": draw,
        "iou": iou,
        "biou": iou,
        "alpha1": alpha1,
        "predicted_iou": 0.5,
    }


def test_summarize_macro_averages_datasets_alpha1_included():
    records = [_record("a", "x", "m", 1.0, alpha1=0.2)] + [
        _record("b", f"y{i}", "m", 0.0, alpha1=0.8) for i in range(3)
    ]
    figures = summarize(records)["m"]["point_1"]
    assert figures["miou"] == pytest.approx(50.0)  # (100 + 0) / 2, not 25
    assert figures["alpha1"] == pytest.approx(0.5)  # (0.2 + 0.8) / 2, not 0.65
    assert figures["n"] == 4


def test_per_image_rows_pair_the_settings():
    records = [
        _record("d", "x", "sam", 0.2, draw=0),
        _record("d", "x", "sam", 0.4, draw=1),
        _record("d", "x", "stable_sam", 0.7, alpha1=0.6, draw=0),
        _record("d", "x", "stable_sam", 0.9, alpha1=0.4, draw=1),
        {"dataset": "d", "image": "x", "kind": "point_1", "setting": "sam", "draw": -1, "st": 0.5},
    ]
    (row,) = per_image_rows(records)
    assert row["draws"] == 2
    assert row["iou_sam"] == pytest.approx(0.3) and row["iou_stable_sam"] == pytest.approx(0.8)
    assert row["delta_iou"] == pytest.approx(0.5)
    assert row["st_sam"] == 0.5 and math.isnan(row["st_stable_sam"])
    assert row["alpha1"] == pytest.approx(0.5)
