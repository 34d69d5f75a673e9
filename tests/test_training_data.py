"""The training dataset's augmentation edge cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from stable_sam.data import Sample
from stable_sam.training import AugmentedPromptDataset, precise_prompt_sampler


class _Source:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_a_target_that_vanishes_in_the_model_frame_is_skipped_not_prompted_with_the_full_frame(caplog):
    image = np.zeros((512, 512, 3), np.uint8)
    speck = np.zeros((512, 512), bool)
    speck[100, 101] = True  # one pixel at 512 px: nothing left at 64 px
    square = np.zeros((512, 512), bool)
    square[100:300, 100:300] = True
    dataset = AugmentedPromptDataset(
        _Source([Sample("speck", image, speck, None), Sample("square", image, square, None)]),
        image_size=64,
        prompt_sampler=precise_prompt_sampler(point_counts=[1], box_probability=1.0),
        seed=0,
        lsj_scale=(0.1, 0.2),
    )
    with caplog.at_level(logging.WARNING, logger="stable_sam.training"):
        item = dataset[0]
    assert "speck: every target vanishes in the 64 px model frame; sample skipped" in caplog.text
    assert item.name == "square" and float(item.targets.max()) > 0.5
    box = item.prompts[0].box
    assert (box[2] - box[0]) < 63 or (box[3] - box[1]) < 63  # not the whole frame


def test_images_cross_the_dataloader_as_uint8():
    image = np.full((96, 80, 3), 200, np.uint8)
    mask = np.zeros((96, 80), bool)
    mask[20:60, 10:50] = True
    dataset = AugmentedPromptDataset(
        _Source([Sample("a", image, mask, None)]),
        image_size=64,
        prompt_sampler=precise_prompt_sampler(point_counts=[3], box_probability=0.0),
        seed=0,
    )
    item = dataset[0]
    assert item.image.dtype == torch.uint8 and item.image.shape == (3, 64, 64)
    assert int(item.image.max()) == 200 and int(item.image.min()) == 128  # the image, the LSJ padding


def test_the_encoder_in_chunks_gives_the_step_of_the_whole_batch():
    """train.encoder_batch_size bounds memory only: the loss and gradients are the same."""
    from conftest import random_stable_sam

    from stable_sam.config import PromptMixConfig
    from stable_sam.training import collate_training, robust_prompt_sampler, supervised_step

    model, _ = random_stable_sam("tiny")
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 12:50] = True
    dataset = AugmentedPromptDataset(
        _Source([Sample(f"s{i}", image, mask, None) for i in range(3)]),
        image_size=64,
        prompt_sampler=robust_prompt_sampler(PromptMixConfig(), mask_input_size=model.mask_input_size),
        seed=0,
    )
    batch = collate_training([dataset[i] for i in range(3)])
    losses, grads = [], []
    for chunk in (None, 1):
        model.zero_grad()
        out = supervised_step(model, model, batch, seed=0, step=0, num_points=64, encoder_batch_size=chunk)
        out.losses["total"].backward()
        losses.append(float(out.losses["total"]))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
