"""The frozen encoder's fast path: FastAttention (SDPA) and autocast, opt-in on one instance.

FastAttention in fp32 is segment-anything's ``Attention`` computed another way (to ~1e-5), on
windows, global grids, non-square grids, interpolated relative positions and padded windows;
the swap changes one model, keeps its parameters and ``state_dict`` and is undone exactly; bf16
and fp16 embeddings are float32 and close to fp32 ones; the embedding cache keys them apart; the
pipeline builds every stage's model with ``sam.encoder_precision``.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from conftest import random_stable_sam
from segment_anything.modeling.image_encoder import Attention
from test_evaluate_stage import N_IMAGES, make_project, tiny_params

from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.eval_inputs import model_passes, sam_model
from pipeline.sam_source import read_sam_source
from pipeline.train import worker_model
from stable_sam.build import SMALL_SAM_SPECS
from stable_sam.config import TuningConfig
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import mask_generator
from stable_sam.modeling import FastAttention, StableSam
from stable_sam.modeling.fast_attention import (
    attach_fast_attention,
    detach_fast_attention,
    uses_fast_attention,
)
from stable_sam.predictor import StableSamPredictor

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

ATTENTION_FORWARD = Attention.forward  # the class must never change


def _attention(input_size: tuple[int, int] | None, *, dim: int = 32, heads: int = 4) -> Attention:
    """segment-anything's Attention with random weights, relative positions included (not zero)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attention = Attention(
            dim, num_heads=heads, qkv_bias=True, use_rel_pos=input_size is not None, input_size=input_size
        )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in attention.named_parameters():
            scale = 0.5 if name.startswith("rel_pos") else dim**-0.5 if p.ndim == 2 else 0.1
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return attention.eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _images(model: StableSam, count: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return 255 * torch.rand(count, 3, model.img_size, model.img_size, generator=generator)


@pytest.mark.parametrize(
    ("input_size", "grid"),
    [
        ((4, 4), (4, 4)),  # a window
        ((5, 7), (5, 7)),  # a global attention on a non-square grid
        ((3, 3), (6, 5)),  # relative positions interpolated to another size (get_rel_pos)
        (None, (5, 6)),  # no relative positions
    ],
)
def test_fast_attention_in_fp32_equals_segment_anythings_attention(input_size, grid):
    attention = _attention(input_size)
    fast = FastAttention.from_attention(attention)
    x = torch.randn(3, *grid, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = attention(x)
        got = fast(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fast.use_rel_pos == (input_size is not None)


def test_the_whole_encoder_in_fp32_sdpa_equals_the_explicit_one_with_padded_windows():
    """A 9 x 9 grid: windows of 4 pad to 12 x 12; block 1 attends globally over the 9 x 9 grid."""
    spec = dataclasses.replace(SMALL_SAM_SPECS["tiny"], img_size=72)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = spec.build().image_encoder.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in encoder.blocks:  # SAM initialises relative positions at zero
            block.attn.rel_pos_h.copy_(torch.randn(block.attn.rel_pos_h.shape, generator=generator))
            block.attn.rel_pos_w.copy_(torch.randn(block.attn.rel_pos_w.shape, generator=generator))
    assert [b.window_size for b in encoder.blocks] == [4, 0] and encoder.patch_embed.proj.stride == (8, 8)
    x = torch.randn(2, 3, 72, 72, generator=generator)
    with torch.no_grad():
        expected = encoder(x)
        assert attach_fast_attention(encoder) == 2
        got = encoder(x)
    assert _relative_error(got, expected) < 1e-5


def test_the_swap_is_per_instance_reversible_and_keeps_the_parameters():
    model, vanilla = random_stable_sam("tiny")
    other, _ = random_stable_sam("tiny")  # the same weights, another instance
    images = _images(model)
    parameters = dict(model.sam.named_parameters())
    keys = list(model.sam.state_dict())
    with torch.no_grad():
        expected = model.embed_images(images)

    model.set_encoder_precision("bf16")
    assert model.encoder_precision == "bf16" and uses_fast_attention(model.sam.image_encoder)
    assert "FastAttention" in repr(model) and "encoder_precision='bf16'" in repr(model)
    for sam in (other.sam, vanilla):
        assert all(type(block.attn) is Attention for block in sam.image_encoder.blocks)
    assert "FastAttention" not in repr(other)
    assert Attention.forward is ATTENTION_FORWARD
    # The same tensors under the same names: no copy, and SAM checkpoints still load strictly.
    assert list(model.sam.state_dict()) == keys
    assert all(p is parameters[name] for name, p in model.sam.named_parameters())
    model.sam.image_encoder.load_state_dict(vanilla.image_encoder.state_dict(), strict=True)
    assert all(not p.requires_grad for p in model.sam.image_encoder.parameters())

    model.set_encoder_precision("fp32")
    assert all(type(block.attn) is Attention for block in model.sam.image_encoder.blocks)
    assert all(p is parameters[name] for name, p in model.sam.named_parameters())
    with torch.no_grad():
        assert torch.equal(model.embed_images(images), expected)
        assert torch.equal(other.embed_images(images), expected)
    assert detach_fast_attention(model.sam.image_encoder) == 0  # nothing left to restore


def test_a_fast_path_model_pickles_and_deep_copies_with_its_fast_attention():
    model, _ = random_stable_sam("tiny")
    model.set_encoder_precision("bf16")
    images = _images(model)
    with torch.no_grad():
        expected = model.embed_images(images)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert clone.encoder_precision == "bf16" and uses_fast_attention(clone.sam.image_encoder)
        with torch.no_grad():
            assert torch.equal(clone.embed_images(images), expected)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fast_path_embeddings_are_float32_and_close_to_fp32(precision):
    model, _ = random_stable_sam("small")
    images = _images(model)
    with torch.no_grad():
        reference = model.embed_images(images)
        model.set_encoder_precision(precision)
        fast = model.embed_images(images)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    error = _relative_error(fast, reference)
    assert 1e-5 < error < 0.03, error  # lower precision for real (autocast ran), and close


def test_the_embedding_cache_never_serves_one_precision_to_the_other():
    model, _ = random_stable_sam("tiny")
    cache = EmbeddingCache()
    predictor = StableSamPredictor(model, cache=cache)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    assert model.encoder_id() == f"tiny:{model.encoder_fingerprint()}"  # fp32 keys as before

    predictor.set_image(image)
    fp32 = predictor.features.clone()
    model.set_encoder_precision("bf16")
    assert model.encoder_id() == f"tiny:{model.encoder_fingerprint()}:bf16-sdpa"
    predictor.set_image(image)
    bf16 = predictor.features.clone()
    assert (cache.hits, cache.misses) == (0, 2) and not torch.equal(bf16, fp32)

    model.set_encoder_precision("fp32")
    predictor.set_image(image)
    assert cache.hits == 1 and torch.equal(predictor.features, fp32)
    model.set_encoder_precision("bf16")
    predictor.set_image(image)
    assert cache.hits == 2 and torch.equal(predictor.features, bf16)
    assert len(cache) == 2


def test_segment_anythings_mask_generator_runs_the_fast_path_too():
    """Its predictor encodes through StableSam.embed_images: the same embedding as ours."""
    model, _ = random_stable_sam("tiny")
    model.set_encoder_precision("bf16")
    image = np.random.default_rng(1).integers(0, 256, size=(40, 64, 3), dtype=np.uint8)
    generator = mask_generator(model)
    generator.predictor.set_image(image)
    predictor = StableSamPredictor(model)
    predictor.set_image(image)
    assert torch.equal(generator.predictor.features, predictor.features)


def test_the_fast_path_is_refused_for_a_tuned_encoder_and_unknown_precisions():
    lora, _ = random_stable_sam("tiny", tuning=TuningConfig(encoder="lora"))
    with pytest.raises(ValueError, match=r"tuning\.encoder='lora' trains through it"):
        lora.set_encoder_precision("bf16")
    assert lora.encoder_precision == "fp32"
    model, _ = random_stable_sam("tiny")
    with pytest.raises(ValueError, match="must be one of \\['fp32', 'bf16', 'fp16'\\], got 'fp8'"):
        model.set_encoder_precision("fp8")
    assert not uses_fast_attention(model.sam.image_encoder)


def test_every_stage_model_gets_sam_encoder_precision(tmp_path):
    project = make_project(tmp_path / "project")
    source = read_sam_source(project["base"])
    params = tiny_params()
    params.sam = dataclasses.replace(params.sam, encoder_precision="bf16")

    models = [
        sam_model(source, device="cpu", encoder_precision="bf16"),
        worker_model(params, source.checkpoint, source.sam_type),  # the train stage's
        *(
            p.model
            for p in model_passes(project["base"], project["plugin"], device="cpu", encoder_precision="bf16")[
                0
            ]
        ),
    ]
    for model in models:
        assert model.encoder_precision == "bf16" and uses_fast_attention(model.sam.image_encoder)

    # The embed stage keys its entries by it: an fp32 and a bf16 cache share no entry.
    names = {}
    for precision in ("fp32", "bf16"):
        params.sam = dataclasses.replace(params.sam, encoder_precision=precision)
        out = tmp_path / precision
        embed(params, EmbedPaths(project["base"], project["raw"], out, tmp_path / f"{precision}.json"))
        names[precision] = {p.name for p in out.rglob("*.pt")}
    assert len(names["fp32"]) == len(names["bf16"]) == N_IMAGES
    assert names["fp32"].isdisjoint(names["bf16"])
