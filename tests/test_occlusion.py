"""Occlusion synthesis as pure array functions."""

from __future__ import annotations

import numpy as np
import pytest

from stable_sam.boxes import box_from_mask
from stable_sam.config import OcclusionConfig
from stable_sam.occlusion import synthesize_occlusion


def mask_box(mask):
    return tuple(int(v) for v in box_from_mask(mask))


def _scene(size: int = 64):
    """A grey image with a red target on the left half and a small blue object on the right."""
    image = np.full((size, size, 3), 100, np.uint8)
    target = np.zeros((size, size), bool)
    target[:, : size // 2] = True
    small = np.zeros((size, size), bool)
    small[30:35, 40:45] = True
    image[target] = (200, 0, 0)
    image[small] = (0, 0, 200)
    return image, [target, small]


def _occluder(h: int = 20, w: int = 12):
    """A green L-shaped object (asymmetric, so a flip is visible) in a larger image."""
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[5 : 5 + h, 5 : 5 + 4] = True
    mask[5 + h - 4 : 5 + h, 5 : 5 + w] = True
    image[mask] = (0, 255, 0)
    return image, mask


def test_paste_updates_masks_and_pixels_consistently():
    image, masks = _scene()
    occ_image, occ_mask = _occluder()
    config = OcclusionConfig(occluder_min_scale=0.3, occluder_max_scale=0.6)
    for seed in range(20):
        result = synthesize_occlusion(
            image, masks, occ_image, occ_mask, target=0, generator=np.random.default_rng(seed), config=config
        )
        assert result is not None
        pasted = result.occluder_mask
        assert pasted.shape == (64, 64) and pasted.any()
        # Occluder pixels copied where its mask is set (green, edges blended with the occluder
        # image's own black by the resize); everything else untouched.
        assert (result.image[pasted][:, [0, 2]] == 0).all() and (result.image[pasted][:, 1] > 100).all()
        assert np.array_equal(result.image[~pasted], image[~pasted])
        # Centre inside the occludee's box; scale within the configured range.
        x0, y0, x1, y1 = mask_box(masks[0])
        p = result.placement
        assert x0 <= p.centre_x <= x1 + 1 and y0 <= p.centre_y <= y1 + 1
        assert 0.3 <= p.scale <= 0.6
        assert abs(max(p.width, p.height) - p.scale * 64) <= 1
        # Masks: visible parts only; the target partly occluded.
        target = result.masks[result.target]
        assert np.array_equal(target, masks[0] & ~pasted)
        assert 0.1 <= result.visible_fraction < 1.0
        assert result.visible_fraction == pytest.approx(target.sum() / masks[0].sum())
        for i, m in zip(result.kept, result.masks):
            assert np.array_equal(m, masks[i] & ~pasted)


def test_fully_occluded_objects_are_dropped_and_the_target_never_is():
    image, masks = _scene()
    occ_image = np.full((30, 30, 3), 9, np.uint8)
    occ_mask = np.ones((30, 30), bool)  # a solid square
    config = OcclusionConfig(occluder_min_scale=0.9, occluder_max_scale=0.9, min_visible_fraction=0.1)
    dropped_seen = 0
    for seed in range(30):
        result = synthesize_occlusion(
            image, masks, occ_image, occ_mask, target=0, generator=np.random.default_rng(seed), config=config
        )
        assert result is not None and 0 in result.kept
        small_left = (masks[1] & ~result.occluder_mask).sum()
        if small_left < 0.1 * masks[1].sum():
            assert result.dropped == [1] and len(result.masks) == 1
            dropped_seen += 1
        else:
            assert result.dropped == [] and result.kept == [0, 1]
    assert dropped_seen > 0


def test_flip_and_exact_copy_at_scale_one():
    size = 80
    image = np.zeros((size, size, 3), np.uint8)
    target = np.zeros((size, size), bool)
    target[30:50, 30:50] = True  # box long side 20 = the occluder's long side: scale 1 is no resize
    occ_image, occ_mask = _occluder(h=20, w=12)
    config = OcclusionConfig(occluder_min_scale=1.0, occluder_max_scale=1.0, min_visible_fraction=0.0)
    flips = set()
    for seed in range(12):
        result = synthesize_occlusion(
            image,
            [target],
            occ_image,
            occ_mask,
            target=0,
            generator=np.random.default_rng(seed),
            config=config,
        )
        assert result is not None
        x0, y0, x1, y1 = mask_box(result.occluder_mask)
        crop = result.occluder_mask[y0 : y1 + 1, x0 : x1 + 1]
        ox0, oy0, ox1, oy1 = mask_box(occ_mask)
        reference = occ_mask[oy0 : oy1 + 1, ox0 : ox1 + 1]
        expected = reference[:, ::-1] if result.placement.flip else reference
        assert np.array_equal(crop, expected)
        flips.add(result.placement.flip)
    assert flips == {True, False}


def test_same_generator_seed_same_result():
    image, masks = _scene()
    occ_image, occ_mask = _occluder()
    config = OcclusionConfig()
    a = synthesize_occlusion(
        image, masks, occ_image, occ_mask, target=0, generator=np.random.default_rng(5), config=config
    )
    b = synthesize_occlusion(
        image, masks, occ_image, occ_mask, target=0, generator=np.random.default_rng(5), config=config
    )
    assert np.array_equal(a.image, b.image) and a.placement == b.placement


def test_paste_is_clipped_at_the_image_border():
    image = np.zeros((32, 32, 3), np.uint8)
    target = np.zeros((32, 32), bool)
    target[:6, :6] = True  # in the corner
    occ_image = np.full((50, 50, 3), 255, np.uint8)
    occ_mask = np.ones((50, 50), bool)
    config = OcclusionConfig(occluder_min_scale=0.8, occluder_max_scale=0.8, min_visible_fraction=0.05)
    result = synthesize_occlusion(
        image, [target], occ_image, occ_mask, target=0, generator=np.random.default_rng(0), config=config
    )
    assert result is not None and result.occluder_mask.shape == (32, 32)
    assert result.occluder_mask[:5, :5].any()


def test_impossible_cases_return_none():
    image, masks = _scene()
    occ_image, occ_mask = _occluder()
    rng = np.random.default_rng(0)
    empty = [np.zeros_like(masks[0]), masks[1]]
    assert (
        synthesize_occlusion(
            image, empty, occ_image, occ_mask, target=0, generator=rng, config=OcclusionConfig()
        )
        is None
    )
    no_occluder = np.zeros_like(occ_mask)
    assert (
        synthesize_occlusion(
            image, masks, occ_image, no_occluder, target=0, generator=rng, config=OcclusionConfig()
        )
        is None
    )
    # Any occlusion leaves < 100 % visible: with min_visible_fraction = 1 no placement is valid.
    strict = OcclusionConfig(min_visible_fraction=1.0, max_tries=5)
    assert (
        synthesize_occlusion(image, masks, occ_image, occ_mask, target=0, generator=rng, config=strict)
        is None
    )


def test_bad_inputs_are_clear_errors():
    image, masks = _scene()
    occ_image, occ_mask = _occluder()
    rng = np.random.default_rng(0)
    with pytest.raises(IndexError, match="target 5"):
        synthesize_occlusion(
            image, masks, occ_image, occ_mask, target=5, generator=rng, config=OcclusionConfig()
        )
    with pytest.raises(ValueError, match="mask 1 has shape"):
        synthesize_occlusion(
            image,
            [masks[0], masks[1][:10]],
            occ_image,
            occ_mask,
            target=0,
            generator=rng,
            config=OcclusionConfig(),
        )
