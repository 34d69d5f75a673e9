"""The training set: samples with augmentation and a drawn prompt, and their collation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data import Sample, large_scale_jitter
from ..prompts import Prompt
from .prompt_sampling import PromptSampler, seeded_generator

__all__ = ["AugmentedPromptDataset", "TrainingBatch", "TrainingSample", "collate_training"]


logger = logging.getLogger(__name__)


_MIN_TARGET_PIXELS = 4


@dataclass
class TrainingSample:
    """One augmented training image with its P >= 1 targets, in the model's input frame (S x S).

    Attributes:
      name: source sample name.
      image: 3 x S x S uint8 RGB (padded with 128 like HQ-SAM's LSJ; rounded after resizing).
      targets: P x S x S float32 soft targets in [0, 1].
      prompts: P prompts, one per target, drawn from the visible (> 0.5) targets.
    """

    name: str
    image: Tensor
    targets: Tensor
    prompts: list[Prompt]


class AugmentedPromptDataset(Dataset):
    """Flip + large-scale jitter + prompts per sample, deterministic in (seed, epoch, index).

    Args:
      source: a dataset of :class:`stable_sam.data.Sample` (image, mask, optional instances).
      image_size: S, the model's input size.
      prompt_sampler: draws the prompts from the augmented target masks.
      seed: base seed (from params).
      lsj: apply large-scale jitter (else resize the long side to S and pad, no crop).
      lsj_scale: (min, max) LSJ scale range. hflip_probability: flip probability.
      targets: "gt" (the sample's GT mask: HQSeg's one object per image) or "instances" (every
        object of the instance map with at least ``min_instance_pixels``, at most
        ``max_targets`` of them: SAM-style training supervises many masks per encoder pass).
    """

    def __init__(
        self,
        source: Dataset,
        *,
        image_size: int,
        prompt_sampler: PromptSampler,
        seed: int,
        lsj: bool = True,
        lsj_scale: tuple[float, float] = (0.1, 2.0),
        hflip_probability: float = 0.5,
        targets: str = "gt",
        max_targets: int = 8,
        min_instance_pixels: int = 16,
        max_tries: int = 10,
    ) -> None:
        if targets not in ("gt", "instances"):
            raise ValueError(f"targets must be 'gt' or 'instances', got {targets!r}")
        self.source = source
        self.image_size = image_size
        self.prompt_sampler = prompt_sampler
        self.seed = seed
        self.lsj = lsj
        self.lsj_scale = lsj_scale
        self.hflip_probability = hflip_probability
        self.targets = targets
        self.max_targets = max_targets
        self.min_instance_pixels = min_instance_pixels
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.source)

    def _target_masks(self, sample: Sample) -> list[np.ndarray]:
        if self.targets == "gt" or sample.instances is None:
            return [sample.mask]
        masks = [sample.instances == k for k in np.unique(sample.instances) if k > 0]
        masks = [m for m in masks if m.sum() >= self.min_instance_pixels]
        return masks or [sample.mask]

    def _jitter(self, image, masks, generator, scale):
        """The same flip-free LSJ draw for the image and every mask (a copied generator state)."""
        out_masks = []
        for mask in masks:
            state = copy.deepcopy(generator)
            out_image, out_mask, _ = large_scale_jitter(
                image,
                mask,
                generator=state,
                output_size=self.image_size,
                min_scale=scale[0],
                max_scale=scale[1],
            )
            out_masks.append(out_mask)
        generator.bit_generator.state = state.bit_generator.state
        return out_image, out_masks

    def __getitem__(self, key: int | tuple[int, int]) -> TrainingSample:
        """``key``: an index (epoch 0) or an ``(epoch, index)`` pair from :class:`ShardedBatchSampler`.

        A sample whose every target vanishes in the model frame, even without jitter (an object
        below a pixel once a large image is resized), is not trained on: a prompt drawn from an
        empty mask would be the whole frame with an empty target. The next sample is used in its
        place (deterministically) and a warning names it.
        """
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for offset in range(len(self.source)):
            item = self._augmented(epoch, (index + offset) % len(self.source))
            if item is not None:
                return item
        raise ValueError("every target of every training sample vanishes in the model frame")

    def _augmented(self, epoch: int, index: int) -> TrainingSample | None:
        sample: Sample = self.source[index]
        generator = seeded_generator(self.seed, epoch, index)
        masks = self._target_masks(sample)
        if generator.random() < self.hflip_probability:
            image = np.ascontiguousarray(sample.image[:, ::-1])
            masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
        else:
            image = sample.image
        scale = self.lsj_scale if self.lsj else (1.0, 1.0)
        for _ in range(self.max_tries):
            out_image, out_masks = self._jitter(image, masks, generator, scale)
            # A crop can cut objects away (HQ-SAM trains on such empty targets): redraw it.
            if max((m > 0.5).sum() for m in out_masks) >= _MIN_TARGET_PIXELS:
                break
        else:
            out_image, out_masks = self._jitter(image, masks, generator, (1.0, 1.0))
        kept = [m for m in out_masks if (m > 0.5).sum() >= _MIN_TARGET_PIXELS] or [max(out_masks, key=np.sum)]
        kept = kept[: self.max_targets]
        if not kept[0].any():
            logger.warning(
                "%s: every target vanishes in the %d px model frame; sample skipped",
                sample.name,
                self.image_size,
            )
            return None
        # A target thinner than half a pixel after resizing is soft everywhere: prompt its peak.
        visible = [(m > 0.5) if (m > 0.5).any() else (m >= m.max()) for m in kept]
        prompts = self.prompt_sampler(visible, generator)
        return TrainingSample(
            name=sample.name,
            # uint8 across the DataLoader: 4x less shared memory per batch than float32 (1024 px
            # batches of 4 workers per GPU would not fit Docker's default /dev/shm).
            image=torch.from_numpy(np.clip(np.rint(out_image), 0, 255).astype(np.uint8)).permute(2, 0, 1),
            targets=torch.from_numpy(np.stack(kept)),
            prompts=prompts,
        )


@dataclass
class TrainingBatch:
    """A collated batch.

    Attributes:
      names: B sample names.
      images: B x 3 x S x S uint8 (made float on the model's device).
      targets: T x 1 x S x S, all targets of all images in image order (T = sum of P_i).
      prompts: B lists of P_i prompts.
    """

    names: list[str]
    images: Tensor
    targets: Tensor
    prompts: list[list[Prompt]]

    def to(self, device: torch.device) -> TrainingBatch:
        return TrainingBatch(self.names, self.images.to(device), self.targets.to(device), self.prompts)

    @property
    def num_targets(self) -> int:
        return self.targets.shape[0]


def collate_training(samples: Sequence[TrainingSample]) -> TrainingBatch:
    return TrainingBatch(
        names=[s.name for s in samples],
        images=torch.stack([s.image for s in samples]),
        targets=torch.cat([s.targets for s in samples])[:, None],
        prompts=[s.prompts for s in samples],
    )
