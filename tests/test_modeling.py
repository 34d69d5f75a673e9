"""The plug-ins: shapes, identity at initialisation, bounds, variants, parameter budget."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import perturb_plugins, random_stable_sam

from stable_sam import build_stable_sam
from stable_sam.config import PluginConfig, TuningConfig
from stable_sam.modeling import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    FixedRouting,
    PluggedTokenToImageAttention,
    PromptTensors,
    SpatialAttentionPlugin,
)
from stable_sam.modeling.deformable_sampling import reference_grid


def _features(b=2, c=16, h=6, w=7, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_dsp_is_identity_at_init():
    x = _features()
    out = DeformableSamplingPlugin(embedding_dim=16)(x)
    torch.testing.assert_close(out.features, x, rtol=0, atol=1e-5)
    assert out.offsets.shape == (2, 1, 6, 7, 2)
    assert torch.count_nonzero(out.offsets) == 0


def test_dsp_zero_offset_sampling_is_exact_for_every_padding_mode():
    x = _features()
    for mode in ("border", "zeros", "reflection"):
        dsp = DeformableSamplingPlugin(embedding_dim=16, padding_mode=mode)
        torch.testing.assert_close(dsp(x).features, x, rtol=0, atol=1e-5)


def test_dsp_integer_offset_shifts_features_by_whole_pixels():
    x = _features(b=1, c=4, h=5, w=5)
    dsp = DeformableSamplingPlugin(embedding_dim=4, offset_bound=None)
    with torch.no_grad():
        dsp.trunk.offset_net[-1].bias.copy_(torch.tensor([1.0, 0.0]))  # Δp = (+1, 0): sample one to the right
    out = dsp(x).features
    torch.testing.assert_close(out[..., :, :-1], x[..., :, 1:], rtol=0, atol=1e-5)
    # border padding replicates the last column instead of reading zeros
    torch.testing.assert_close(out[..., :, -1], x[..., :, -1], rtol=0, atol=1e-5)


def test_dsp_offsets_are_bounded():
    dsp = DeformableSamplingPlugin(embedding_dim=8, offset_bound=2.0)
    with torch.no_grad():
        dsp.trunk.offset_net[-1].bias.fill_(100.0)
    offsets = dsp(_features(c=8)).offsets
    assert offsets.abs().max() <= 2.0
    assert offsets.abs().max() > 1.99


def test_dsp_offset_groups_sample_channel_groups_independently():
    dsp = DeformableSamplingPlugin(embedding_dim=8, offset_groups=2, offset_bound=None)
    x = _features(b=1, c=8, h=5, w=5)
    with torch.no_grad():
        dsp.trunk.offset_net[-1].bias.copy_(
            torch.tensor([1.0, 0.0, 0.0, 0.0])
        )  # group 0 moves, group 1 stays
    out = dsp(x)
    assert out.offsets.shape == (1, 2, 5, 5, 2)
    torch.testing.assert_close(out.features[:, 4:], x[:, 4:], rtol=0, atol=1e-5)
    assert not torch.allclose(out.features[:, :4], x[:, :4])


def test_reference_grid_is_pixel_centres():
    grid = reference_grid(2, 3)
    assert grid.shape == (2, 3, 2)
    assert grid[0, 0].tolist() == [0.5, 0.5] and grid[1, 2].tolist() == [2.5, 1.5]


def test_spatial_attention_and_modulated_dsp_start_as_identity():
    x = _features()
    torch.testing.assert_close(SpatialAttentionPlugin(embedding_dim=16)(x).features, x, rtol=0, atol=1e-6)
    modulated = DeformableSamplingPlugin(embedding_dim=16, amplitude="conv1x1_modulated")
    torch.testing.assert_close(modulated(x).features, x, rtol=0, atol=1e-5)


def test_routing_variants():
    token = torch.randn(3, 16)
    drp = DynamicRoutingPlugin(embedding_dim=16)
    torch.testing.assert_close(drp(token), torch.full((3, 2), 0.5))
    perturbed = DynamicRoutingPlugin(embedding_dim=16, init="default")
    alpha = perturbed(token)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    sigmoid = DynamicRoutingPlugin(embedding_dim=16, normalization="sigmoid", init="default")
    assert not torch.allclose(sigmoid(token).sum(-1), torch.ones(3))
    fixed = FixedRouting(alpha1=0.3)(token)
    torch.testing.assert_close(fixed, torch.tensor([[0.3, 0.7]] * 3))
    with pytest.raises(ValueError, match="fixed_alpha1"):
        FixedRouting(alpha1=1.5)


@pytest.mark.parametrize("sam_type", ["vit_b", "vit_l", "vit_h"])
def test_trainable_parameter_budget_is_0_08m_for_every_official_decoder(sam_type):
    # meta device: no memory, only shapes.
    with torch.device("meta"):
        model = build_stable_sam(sam_type=sam_type)
    assert model.num_trainable_parameters() == 81_828  # method spec section 4
    names = model.trainable_parameter_names()
    assert all(".cross_attn_token_to_image." in n and (".sampler." in n or ".router." in n) for n in names)
    assert all("layers.1." in n for n in names)


def test_parameter_budget_of_variants():
    with torch.device("meta"):
        no_drp = build_stable_sam(sam_type="vit_b", plugin_config=PluginConfig(routing="fixed"))
        hidden16 = build_stable_sam(sam_type="vit_b", plugin_config=PluginConfig(drp_hidden=16))
        two_sites = build_stable_sam(
            sam_type="vit_b", plugin_config=PluginConfig(placements=["block2", "final"])
        )
    assert no_drp.num_trainable_parameters() == 73_474
    assert hidden16.num_trainable_parameters() == 77_652
    assert two_sites.num_trainable_parameters() == 2 * 81_828


def test_only_the_chosen_submodule_is_replaced_and_repr_shows_it(tiny_model):
    model, vanilla = tiny_model
    layers = model.sam.mask_decoder.transformer.layers
    assert isinstance(layers[1].cross_attn_token_to_image, PluggedTokenToImageAttention)
    assert not isinstance(layers[0].cross_attn_token_to_image, PluggedTokenToImageAttention)
    assert "DeformableSamplingPlugin" in repr(model)
    assert "Plugged" not in repr(vanilla)
    # the original attention object is kept (frozen), not copied
    assert all(not p.requires_grad for p in layers[1].cross_attn_token_to_image.attention.parameters())


def test_detach_restores_plain_sam_and_other_instances_are_untouched(tiny_model):
    model, vanilla = tiny_model
    other, _ = random_stable_sam("tiny", seed=3, plugin_config=PluginConfig(variant="none"))
    assert not other.sites
    sam = model.detach_plugins()
    assert set(sam.state_dict()) == set(vanilla.state_dict())


def _decode(model, prompts, embedding):
    with torch.no_grad():
        return model.decode(embedding, prompts, multimask_output=False)


def _tiny_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(1, 32, 8, 8, generator=g)
    prompts = PromptTensors(
        point_coords=torch.tensor([[[20.0, 30.0], [40.0, 12.0]]]),
        point_labels=torch.tensor([[1, 0]]),
        boxes=torch.tensor([[5.0, 6.0, 50.0, 44.0]]),
    )
    return embedding, prompts


@pytest.mark.parametrize(
    "config",
    [
        PluginConfig(),
        PluginConfig(resample_pe=True),
        PluginConfig(offset_groups=2, padding_mode="zeros"),
        PluginConfig(drp_token="iou"),
        PluginConfig(drp_token="mean_output", routing_norm="sigmoid"),
        PluginConfig(placements=["block1", "block2", "final"]),
        PluginConfig(variant="spatial_attention"),
        PluginConfig(routing="fixed", fixed_alpha1=0.7),
        PluginConfig(replace="keys"),
        PluginConfig(amplitude="conv1x1_modulated", offset_bias=False),
    ],
    ids=lambda c: (
        ",".join(f"{k}={v}" for k, v in c.__dict__.items() if getattr(PluginConfig(), k) != v) or "default"
    ),
)
def test_every_variant_equals_sam_at_init_and_with_alpha1_zero(config):
    model, _ = random_stable_sam("tiny", plugin_config=config)
    embedding, prompts = _tiny_inputs(model)
    reference = _decode(
        random_stable_sam("tiny", plugin_config=PluginConfig(variant="none"))[0], prompts, embedding
    ).low_res_logits
    torch.testing.assert_close(
        _decode(model, prompts, embedding).low_res_logits, reference, rtol=0, atol=1e-5
    )
    perturb_plugins(model)
    moved = _decode(model, prompts, embedding).low_res_logits
    assert (moved - reference).abs().max() > 5e-5, "perturbed plug-ins must change the output"
    with model.forced_alpha1(0.0):
        forced = _decode(model, prompts, embedding).low_res_logits
    if config.replace == "keys" or config.resample_pe:
        torch.testing.assert_close(forced, reference, rtol=0, atol=1e-5)
    else:
        assert torch.equal(forced, reference), "α1 = 0 must reproduce SAM bit for bit"
    with model.plugins_disabled():
        assert torch.equal(_decode(model, prompts, embedding).low_res_logits, reference)


def test_routing_and_offsets_are_reported_per_prompt(tiny_model):
    model, _ = tiny_model
    perturb_plugins(model)
    embedding, _ = _tiny_inputs(model)
    prompts = PromptTensors(boxes=torch.tensor([[5.0, 6.0, 50.0, 44.0], [1.0, 1.0, 20.0, 20.0]]))
    out = _decode(model, prompts, embedding)
    assert out.routing.shape == (2, 2)
    torch.testing.assert_close(out.routing.sum(-1), torch.ones(2))
    assert not torch.allclose(out.routing[0], out.routing[1]), "α depends on the prompt"
    assert out.offsets.shape == (2, 1, 8, 8, 2)
    with model.forced_alpha1(0.25):
        forced = _decode(model, prompts, embedding)
    torch.testing.assert_close(forced.routing, torch.tensor([[0.25, 0.75]] * 2))


def test_batched_forward_matches_per_image_decode(tiny_model):
    model, _ = tiny_model
    perturb_plugins(model)
    g = torch.Generator().manual_seed(4)
    embeddings = torch.randn(3, 32, 8, 8, generator=g)
    prompts = [
        PromptTensors(boxes=torch.tensor([[2.0, 3.0, 40.0, 50.0]])),
        PromptTensors(point_coords=torch.tensor([[[10.0, 10.0]]]), point_labels=torch.tensor([[1]])),
        PromptTensors(mask_inputs=torch.randn(1, 1, 32, 32, generator=g)),
    ]
    with torch.no_grad():
        batched = model(prompts, image_embeddings=embeddings)
        singles = [
            model.decode(embeddings[i : i + 1], p, multimask_output=False) for i, p in enumerate(prompts)
        ]
    torch.testing.assert_close(batched.low_res_logits, torch.cat([s.low_res_logits for s in singles]))
    assert batched.routing.shape == (3, 2)


def test_model_pickles_and_deepcopies_with_its_plugins(tiny_model):
    model, _ = tiny_model
    perturb_plugins(model)
    embedding, prompts = _tiny_inputs(model)
    expected = _decode(model, prompts, embedding).low_res_logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(_decode(clone, prompts, embedding).low_res_logits, expected)
        reader = clone.sam.mask_decoder.transformer.layers[1].cross_attn_token_to_image.token_reader
        assert reader.decoder is clone.sam.mask_decoder


def test_tuning_variants_make_the_right_parts_trainable():
    lora, _ = random_stable_sam(
        "tiny",
        plugin_config=PluginConfig(variant="none"),
        tuning=TuningConfig(encoder="lora", decoder="prediction_head"),
    )
    names = lora.trainable_parameter_names()
    assert any("lora_a" in n for n in names) and any("output_hypernetworks_mlps" in n for n in names)
    assert not any("transformer" in n for n in names)
    assert not lora.encoder_is_frozen
    adapter, _ = random_stable_sam(
        "tiny", plugin_config=PluginConfig(variant="none"), tuning=TuningConfig(encoder="adapter")
    )
    assert all(".mlp.down." in n or ".mlp.up." in n for n in adapter.trainable_parameter_names())
    full, _ = random_stable_sam("tiny", tuning=TuningConfig(decoder="full"))
    assert any("sampler" in n for n in full.trainable_parameter_names())
    assert any("transformer.layers.0.self_attn" in n for n in full.trainable_parameter_names())


def test_encoder_adapters_start_as_identity():
    plain, _ = random_stable_sam("tiny", plugin_config=PluginConfig(variant="none"))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    reference = plain.embed_images(images)
    for encoder in ("lora", "adapter"):
        tuned, _ = random_stable_sam(
            "tiny", plugin_config=PluginConfig(variant="none"), tuning=TuningConfig(encoder=encoder)
        )
        torch.testing.assert_close(tuned.embed_images(images), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (PluginConfig(variant="deformable"), "plugin.variant"),
        (PluginConfig(placements=["block3"]), r"plugin\.placements = \['block3'\]"),
        (PluginConfig(placements=[]), r"plugin\.placements = \[\]: need at least one placement"),
        (PluginConfig(padding_mode="wrap"), "padding_mode"),
        (PluginConfig(drp_token="cls"), "drp_token"),
        (PluginConfig(offset_groups=3), "offset_groups"),
        (PluginConfig(offset_bound=0.0), "offset_bound"),
        (PluginConfig(offset_kernel=4), "odd"),
        (PluginConfig(routing="learned"), "plugin.routing"),
    ],
)
def test_bad_plugin_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        random_stable_sam("tiny", plugin_config=bad)


def test_unknown_sam_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown SAM type 'vit_x'.*vit_b"):
        build_stable_sam(sam_type="vit_x")
