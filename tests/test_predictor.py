"""StableSamPredictor: equivalence with segment-anything's SamPredictor, the embedding cache, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import perturb_plugins, random_stable_sam
from segment_anything import SamPredictor

from stable_sam import StableSamPredictor
from stable_sam.embedding_cache import EmbeddingCache


def _image(h=48, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


PROMPTS = {
    "box": dict(box=np.array([5.0, 4.0, 40.0, 30.0])),
    "points": dict(point_coords=np.array([[20.0, 15.0], [8.0, 40.0]]), point_labels=np.array([1, 0])),
    "box+point": dict(
        box=np.array([2.0, 2.0, 50.0, 44.0]),
        point_coords=np.array([[25.0, 20.0]]),
        point_labels=np.array([1]),
    ),
}


def _assert_same_prediction(sam_predictor, stable_predictor, prompt, multimask, exact):
    expected = sam_predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    got = stable_predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    masks_expected = sam_predictor.predict(**prompt, multimask_output=multimask)[0]
    masks_got = stable_predictor.predict(**prompt, multimask_output=multimask)[0]
    diff = float(np.abs(expected[2] - got[2]).max())
    if exact:
        assert diff == 0.0
    else:
        assert diff < 1e-4, diff
    np.testing.assert_array_equal(masks_got, masks_expected)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
    return diff


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_equals_sam_predictor_at_init_and_with_alpha1_zero(prompt, multimask):
    model, vanilla = random_stable_sam("tiny")
    image = _image()
    sam_predictor = SamPredictor(vanilla)
    sam_predictor.set_image(image)
    predictor = StableSamPredictor(model)
    predictor.set_image(image)
    _assert_same_prediction(sam_predictor, predictor, prompt, multimask, exact=False)
    perturb_plugins(model)
    moved = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)[2]
    assert (
        np.abs(
            moved - sam_predictor.predict(**prompt, multimask_output=multimask, return_logits=True)[2]
        ).max()
        > 1e-4
    )
    with model.forced_alpha1(0.0):
        _assert_same_prediction(sam_predictor, predictor, prompt, multimask, exact=True)


@pytest.mark.slow
def test_equals_sam_predictor_on_vit_b_shaped_sam():
    """vit_b architecture with random weights: two 1024² encoder passes (~30 s on 2 CPU cores)."""
    model, vanilla = random_stable_sam("vit_b")
    image = _image(120, 160)
    sam_predictor = SamPredictor(vanilla)
    sam_predictor.set_image(image)
    predictor = StableSamPredictor(model)
    predictor.set_image(image)
    prompt = dict(
        box=np.array([10.0, 20.0, 100.0, 110.0]),
        point_coords=np.array([[50.0, 60.0]]),
        point_labels=np.array([1]),
    )
    init_diff = _assert_same_prediction(sam_predictor, predictor, prompt, multimask=False, exact=False)
    perturb_plugins(model, scale=0.05)
    with model.forced_alpha1(0.0):
        # Same inputs, but BLAS may pick another kernel for the re-materialised k/v: ~1e-6.
        forced_diff = _assert_same_prediction(sam_predictor, predictor, prompt, multimask=False, exact=False)
    print(f"vit_b max |Δ low-res logits|: at init {init_diff:.3g}, α1=0 after perturbation {forced_diff:.3g}")


def test_routing_of_last_call_is_exposed():
    model, _ = random_stable_sam("tiny")
    perturb_plugins(model)
    predictor = StableSamPredictor(model)
    predictor.set_image(_image())
    predictor.predict(box=np.array([5.0, 4.0, 40.0, 30.0]), multimask_output=False)
    assert isinstance(predictor.routing, np.ndarray) and predictor.routing.shape == (1, 2)
    np.testing.assert_allclose(predictor.routing.sum(-1), np.ones(1), rtol=1e-6)
    assert isinstance(predictor.offsets, np.ndarray)
    assert predictor.offsets.shape == (1, 1, 8, 8, 2)
    with model.plugins_disabled():
        predictor.predict(box=np.array([5.0, 4.0, 40.0, 30.0]))
    assert predictor.routing is None


class _EncoderCallCounter:
    def __init__(self, encoder):
        self.calls = 0
        encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def test_second_set_image_of_the_same_image_is_a_lookup():
    model, _ = random_stable_sam("tiny")
    counter = _EncoderCallCounter(model.sam.image_encoder)
    predictor = StableSamPredictor(model)
    image = _image()
    predictor.set_image(image)
    first = predictor.get_image_embedding().clone()
    predictor.set_image(_image(seed=1))
    predictor.set_image(image)
    assert counter.calls == 2
    assert torch.equal(predictor.get_image_embedding(), first)
    assert predictor.cache.hits == 1 and predictor.cache.misses == 2
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")  # same pixels as RGB
    assert counter.calls == 2


def test_disk_cache_survives_a_new_predictor_and_is_keyed_by_weights(tmp_path):
    model, _ = random_stable_sam("tiny")
    image = _image()
    StableSamPredictor(model, cache=EmbeddingCache(tmp_path)).set_image(image)
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    counter = _EncoderCallCounter(model.sam.image_encoder)
    fresh = StableSamPredictor(model, cache=EmbeddingCache(tmp_path))
    fresh.set_image(image)
    assert counter.calls == 0
    # another SAM (other weights) must not read that entry
    other, _ = random_stable_sam("tiny", seed=5)
    other_counter = _EncoderCallCounter(other.sam.image_encoder)
    StableSamPredictor(other, cache=EmbeddingCache(tmp_path)).set_image(image)
    assert other_counter.calls == 1
    assert len(list(tmp_path.rglob("*.pt"))) == 2


def test_damaged_disk_entry_is_recomputed(tmp_path):
    model, _ = random_stable_sam("tiny")
    StableSamPredictor(model, cache=EmbeddingCache(tmp_path)).set_image(_image())
    (entry,) = tmp_path.rglob("*.pt")
    entry.write_bytes(b"broken")
    counter = _EncoderCallCounter(model.sam.image_encoder)
    StableSamPredictor(model, cache=EmbeddingCache(tmp_path)).set_image(_image())
    assert counter.calls == 1


def test_tuned_encoder_bypasses_the_cache():
    from stable_sam.config import PluginConfig, TuningConfig

    model, _ = random_stable_sam(
        "tiny", plugin_config=PluginConfig(variant="none"), tuning=TuningConfig(encoder="lora")
    )
    counter = _EncoderCallCounter(model.sam.image_encoder)
    predictor = StableSamPredictor(model)
    predictor.set_image(_image())
    predictor.set_image(_image())
    assert counter.calls == 2 and len(predictor.cache) == 0


@pytest.mark.parametrize(
    "image, match",
    [
        (_image().astype(np.float32), "uint8"),
        (_image()[..., :2], "H x W x 3"),
        (_image()[..., 0], "H x W x 3"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images_are_clear_errors(image, match):
    model, _ = random_stable_sam("tiny")
    with pytest.raises((ValueError, TypeError), match=match):
        StableSamPredictor(model).set_image(image)


@pytest.mark.parametrize(
    "prompt, match",
    [
        (
            dict(box=np.array([100.0, 4.0, 400.0, 30.0])),
            r"box \[100.0, 4.0, 400.0, 30.0\] does not overlap the 60x48 image \(W x H\)",
        ),
        (dict(box=np.array([-50.0, 4.0, 0.0, 30.0])), "does not overlap"),
        (dict(box=np.array([5.0, np.nan, 40.0, 30.0])), "finite"),
        (dict(box=np.array([40.0, 4.0, 5.0, 30.0])), "x1 < x0"),
        (dict(box=np.array([1.0, 2.0, 3.0])), r"box must be \(4,\)"),
        (dict(point_coords=np.array([[10.0, 10.0]])), "need point_labels"),
        (
            dict(point_coords=np.array([[10.0, 10.0], [5.0, 5.0]]), point_labels=np.array([1])),
            "one label per point",
        ),
        (dict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([2])), "0 or 1"),
        (dict(point_coords=np.array([[100.0, 10.0]]), point_labels=np.array([1])), "point .* outside"),
        (dict(mask_input=np.zeros((1, 8, 8))), "mask_input must have shape"),
    ],
)
def test_bad_prompts_are_clear_errors(prompt, match):
    model, _ = random_stable_sam("tiny")
    predictor = StableSamPredictor(model)
    predictor.set_image(_image())
    with pytest.raises(ValueError, match=match):
        predictor.predict(**prompt)


def test_a_box_partly_outside_is_clipped_to_the_image(caplog):
    model, _ = random_stable_sam("tiny")
    predictor = StableSamPredictor(model)
    predictor.set_image(_image())
    with caplog.at_level("WARNING"):
        loose = predictor.predict(box=np.array([-5.0, 4.0, 400.0, 30.0]), return_logits=True)
    assert (
        "box [-5.0, 4.0, 400.0, 30.0] reaches outside the 60x48 image (W x H); clipped to [0.0, 4.0, 60.0, 30.0]"
        in caplog.text
    )
    tight = predictor.predict(box=np.array([0.0, 4.0, 60.0, 30.0]), return_logits=True)
    for a, b in zip(loose, tight):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "damage",
    ["channels", "grid", "batch", "dtype", "input_size", "original_size"],
)
def test_a_disk_entry_of_the_wrong_form_is_a_miss_recomputed_and_overwritten(tmp_path, caplog, damage):
    model, _ = random_stable_sam("tiny")
    image = _image()
    first = StableSamPredictor(model, cache=EmbeddingCache(tmp_path))
    first.set_image(image)
    expected = first.get_image_embedding().cpu().clone()
    (entry,) = tmp_path.rglob("*.pt")
    payload = torch.load(entry, weights_only=True)
    emb = payload["embedding"]
    payload["embedding"] = {
        "channels": emb[:, : emb.shape[1] // 2],
        "grid": emb[..., :-1, :-1],
        "batch": emb.expand(2, -1, -1, -1).clone(),
        "dtype": emb.double(),
    }.get(damage, emb)
    if damage == "input_size":
        payload["input_size"] = [5, 7]
    if damage == "original_size":
        payload["original_size"] = [48, 61]
    torch.save(payload, entry)
    counter = _EncoderCallCounter(model.sam.image_encoder)
    cache = EmbeddingCache(tmp_path)
    predictor = StableSamPredictor(model, cache=cache)
    with caplog.at_level("WARNING"):
        predictor.set_image(image)
        predictor.predict(box=np.array([5.0, 4.0, 40.0, 30.0]))
    assert counter.calls == 1 and cache.misses == 1 and cache.hits == 0
    assert f"ignoring embedding cache entry {entry}: " in caplog.text and "recomputing it" in caplog.text
    assert torch.equal(predictor.get_image_embedding().cpu(), expected)
    # The recomputed entry overwrote the bad one: a fresh reader hits it.
    again = StableSamPredictor(model, cache=EmbeddingCache(tmp_path))
    again.set_image(image)
    assert counter.calls == 1 and again.cache.hits == 1


def test_predict_before_set_image_is_a_clear_error():
    model, _ = random_stable_sam("tiny")
    with pytest.raises(RuntimeError, match="set_image"):
        StableSamPredictor(model).predict(box=np.array([1.0, 1.0, 5.0, 5.0]))
