"""Gradient flow: an optimiser step moves the plug-ins and nothing of SAM."""

from __future__ import annotations

import pytest
import torch
from conftest import random_stable_sam

from stable_sam.config import PluginConfig, TuningConfig
from stable_sam.losses import mask_loss
from stable_sam.modeling import PromptTensors


def _batch(generator):
    images = torch.rand(2, 3, 64, 64, generator=generator) * 255
    targets = torch.zeros(2, 1, 64, 64)
    targets[0, :, 10:40, 12:50] = 1.0
    targets[1, :, 30:60, 5:20] = 1.0
    prompts = [
        PromptTensors(boxes=torch.tensor([[12.0, 10.0, 49.0, 39.0]])),
        PromptTensors(point_coords=torch.tensor([[[10.0, 45.0]]]), point_labels=torch.tensor([[1]])),
    ]
    return images, targets, prompts


def _step(model, generator):
    images, targets, prompts = _batch(generator)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        embeddings = model.embed_images(images) if model.encoder_is_frozen else None
    out = model(prompts, image_embeddings=embeddings, images=None if embeddings is not None else images)
    loss = mask_loss(out.low_res_logits, targets, num_points=256, generator=generator)["total"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_optimizer_step_moves_only_the_plugins():
    """Three steps: the zero-initialised last layers make the layers before them gradient-free at
    step 0 (offsets 0 ⇒ x_def = x_p ⇒ ∂L/∂α = 0), like LoRA's B = 0; by step 2 every plug-in
    parameter has a non-zero gradient and has moved, and no SAM parameter ever has one."""
    model, _ = random_stable_sam("tiny")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    plugin_before = model.trainable_state_dict()
    for _ in range(3):
        _step(model, torch.Generator().manual_seed(0))
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert param.grad is None, f"SAM parameter {name} received a gradient"
            assert torch.equal(param, frozen_before[name]), f"SAM parameter {name} changed"
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, f"plug-in parameter {name} got a zero gradient"
            assert not torch.equal(param, plugin_before[name]), f"plug-in parameter {name} did not move"


def test_trainable_parameters_are_exactly_the_plugins():
    model, _ = random_stable_sam("tiny")
    plugin_params = set()
    for module_name, module in model.named_modules():
        if any(module is site.sampler or module is site.router for site in model.sites.values()):
            plugin_params |= {f"{module_name}.{name}" for name, _ in module.named_parameters()}
    assert set(model.trainable_parameter_names()) == plugin_params
    # DSP: amplitude, depthwise conv, LayerNorm2d, offset conv; DRP: Linear, LayerNorm, Linear (w + b each)
    assert len(plugin_params) == 14


@pytest.mark.parametrize(
    "plugin, tuning",
    [
        (PluginConfig(routing="fixed"), TuningConfig()),
        (PluginConfig(variant="spatial_attention"), TuningConfig()),
        (PluginConfig(placements=["block1", "block2", "final"], resample_pe=True), TuningConfig()),
        (PluginConfig(), TuningConfig(decoder="full")),
        (PluginConfig(variant="none"), TuningConfig(encoder="lora", decoder="prediction_head")),
        (PluginConfig(variant="none"), TuningConfig(encoder="adapter", decoder="prediction_head")),
    ],
)
def test_every_variant_trains_its_own_parameters_only(plugin, tuning):
    model, _ = random_stable_sam("tiny", plugin_config=plugin, tuning=tuning)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_before and model.num_trainable_parameters() > 0
    for _ in range(3):
        _step(model, torch.Generator().manual_seed(1))
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_plugin_training_lowers_the_loss_on_a_fixed_batch():
    model, _ = random_stable_sam("tiny")
    losses = [_step(model, torch.Generator().manual_seed(3)).item() for _ in range(40)]
    assert losses[-1] < losses[0] - 0.01, losses
