"""Training data and steps: augmentation + prompt drawing per sample, and the decoder loss.

Everything random here is a pure function of explicit seeds: sample ``i`` of epoch ``e`` draws its
flip, jitter and prompt from ``np.random.default_rng([seed, e, i])`` and step ``s`` of rank ``r``
samples its loss points from ``torch.Generator`` seeded with ``(seed, s, r)``. So a run resumed at
step ``s`` sees exactly the batches and loss points of an uninterrupted run: the RNG state *is*
the step counter. :class:`ShardedBatchSampler` shards the same way across any number of workers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .config import PromptMixConfig
from .data import Sample, large_scale_jitter
from .losses import mask_loss, per_mask_losses
from .modeling.stable_sam import PromptTensors, StableSam
from .prompts import Prompt, box_from_mask, draw_training_prompt, oracle_point, random_points

__all__ = [
    "AugmentedPromptDataset",
    "PromptSampler",
    "ShardedBatchSampler",
    "StepOutput",
    "TrainingBatch",
    "TrainingSample",
    "collate_training",
    "correction_round",
    "iou_head_targets",
    "jittered_box",
    "precise_prompt_sampler",
    "robust_prompt_sampler",
    "sam_training_step",
    "seeded_generator",
    "supervised_step",
]

logger = logging.getLogger(__name__)

PromptSampler = Callable[[Sequence[np.ndarray], np.random.Generator], list[Prompt]]
"""(visible target masks, each H x W bool in the model frame; generator) -> one prompt per mask.

One prompt *kind* is drawn per call, so the prompts of one image share their structure and are
decoded in one call."""

_MIN_TARGET_PIXELS = 4


def seeded_generator(*keys: int) -> np.random.Generator:
    """A numpy generator that is a pure function of integer keys (seed, epoch, index, ...)."""
    return np.random.default_rng([int(k) for k in keys])


def robust_prompt_sampler(mix: PromptMixConfig, *, mask_input_size: tuple[int, int]) -> PromptSampler:
    """Stable-SAM's robust training mixture: GT box, noisy box, 1/3/5/10 points, coarse mask."""
    weights = {
        "gt_box": mix.gt_box,
        "noisy_box": mix.noisy_box,
        "points": mix.points,
        "coarse_mask": mix.coarse_mask,
    }

    def sample(masks: Sequence[np.ndarray], generator: np.random.Generator) -> list[Prompt]:
        if len(masks) != 1:
            raise ValueError(f"the robust mixture draws one prompt for one target, got {len(masks)} targets")
        prompt = draw_training_prompt(
            masks[0],
            generator=generator,
            weights=weights,
            point_counts=mix.point_counts,
            mask_input_size=mask_input_size,
            noise_scale=mix.noise_scale,
            min_iou=mix.min_box_iou,
            coarse_values=mix.coarse_mask_values,
        )
        return [prompt]

    return sample


def jittered_box(mask: np.ndarray, *, generator: np.random.Generator, jitter: float) -> np.ndarray:
    """SAM's training box: the tight box with each coordinate moved by N(0, jitter x side).

    SAM adds noise of std 10 % of the box side (at most 20 px at 1024) to its training boxes; the
    shift here is clipped at 2 std and to the image. ``jitter=0`` gives the tight box.
    """
    box = box_from_mask(mask).astype(np.float64)
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2)
    shift = np.clip(generator.normal(0.0, jitter, 4), -2 * jitter, 2 * jitter) * side if jitter > 0 else 0.0
    h, w = mask.shape
    x0, y0, x1, y1 = np.clip(box + shift, 0, [w - 1, h - 1, w - 1, h - 1])
    return np.array([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], dtype=np.float32)


def precise_prompt_sampler(
    *, point_counts: Sequence[int], box_probability: float, box_jitter: float = 0.0
) -> PromptSampler:
    """Precise prompts only, as SAM is trained: GT boxes with SAM's small jitter, or k positive clicks.

    A single click is ambiguous: :func:`sam_training_step` supervises it through SAM's three
    multimask outputs (the best one takes the loss), as SAM does, so mask token 0 only ever
    learns from unambiguous prompts.
    """
    if not 0.0 <= box_probability <= 1.0:
        raise ValueError(f"box_probability must lie in [0, 1], got {box_probability}")
    if not point_counts or min(point_counts) < 1:
        raise ValueError(f"point_counts must be positive integers, got {list(point_counts)}")
    if box_jitter < 0:
        raise ValueError(f"box_jitter must be >= 0, got {box_jitter}")

    def sample(masks: Sequence[np.ndarray], generator: np.random.Generator) -> list[Prompt]:
        if generator.random() < box_probability:
            return [
                Prompt(kind="gt_box", box=jittered_box(m, generator=generator, jitter=box_jitter))
                for m in masks
            ]
        k = int(generator.choice(point_counts))
        return [
            Prompt(
                kind=f"point_{k}",
                point_coords=random_points(m, k, generator=generator, replace=True),
                point_labels=np.ones(k, np.int64),
            )
            for m in masks
        ]

    return sample


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


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Deterministic, resumable sharding: batch ``s`` of rank ``r`` is a pure function of (seed, s, r).

    Batches are lists of ``(epoch, index)`` keys, so the dataset's per-sample randomness does not
    depend on which process loads the sample or when.

    Each epoch is a seeded permutation of the dataset, cut into global batches of
    ``num_replicas * local_batch`` (the last incomplete one dropped, as HQ-SAM's drop_last);
    rank ``r`` takes the ``r``-th slice of each global batch. Starting at ``start_step`` skips the
    finished steps without loading them (``DistributedSampler`` can only skip by iterating).

    Args:
      dataset_size: number of samples.
      local_batch: samples per rank and step.
      num_replicas, rank: the worker group.
      seed: base seed.
      total_steps: steps to produce (may span several epochs).
      start_step: first step to produce (resume).
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        local_batch: int,
        num_replicas: int,
        rank: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
    ) -> None:
        if local_batch < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sharding: local_batch={local_batch}, rank={rank} of {num_replicas}")
        self.steps_per_epoch = dataset_size // (local_batch * num_replicas)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"dataset of {dataset_size} samples is smaller than one global batch "
                f"({num_replicas} workers x {local_batch})"
            )
        self.dataset_size = dataset_size
        self.local_batch = local_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = seeded_generator(self.seed, epoch).permutation(self.dataset_size)
        global_batch = self.local_batch * self.num_replicas
        start = within * global_batch + self.rank * self.local_batch
        return [(epoch, int(i)) for i in order[start : start + self.local_batch]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def _loss_generator(seed: int, step: int, rank: int) -> torch.Generator:
    key = int(seeded_generator(seed, step, rank).integers(2**62))
    return torch.Generator(device="cpu").manual_seed(key)


@dataclass
class StepOutput:
    """What :func:`supervised_step` computed.

    Attributes:
      losses: {"bce", "dice", "total"} scalar tensors (with grad).
      low_res_logits: B x 1 x h x w.
      iou_predictions: B x 1 (SAM's IoU head).
      routing: B x 2 routing weights, or None without plug-ins.
    """

    losses: dict[str, Tensor]
    low_res_logits: Tensor
    iou_predictions: Tensor
    routing: Tensor | None


def supervised_step(
    model: torch.nn.Module,
    core: StableSam,
    batch: TrainingBatch,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    encoder_batch_size: int | None = None,
) -> StepOutput:
    """Forward + HQ-SAM's point-sampled BCE/dice loss (mask token 0 vs the soft targets).

    Args:
      model: what to call for the forward (the DDP wrapper, or ``core`` itself).
      core: the unwrapped :class:`StableSam` (for the encoder and the model frame).
      batch: a :class:`TrainingBatch` already on the model's device.
      seed, step, rank: derive the loss point sampling generator.
      encoder_batch_size: images per frozen-encoder pass (None: all at once); bounds the
        encoder's activation memory on small GPUs.

    Returns:
      A :class:`StepOutput`.
    """
    device = batch.images.device
    # The training forward is StableSam.forward (through DDP when wrapped): Sam.forward runs
    # under no_grad and repeats one embedding per prompt.
    prompts = [PromptTensors.stack(p, device) for p in batch.prompts]
    if core.encoder_is_frozen:
        with torch.no_grad():
            images = batch.images.float()
            chunk = encoder_batch_size or len(images)
            embeddings = torch.cat([core.embed_images(part) for part in images.split(chunk)])
        out = model(prompts, image_embeddings=embeddings)
    else:
        out = model(prompts, images=batch.images.float())
    losses = mask_loss(
        out.low_res_logits,
        batch.targets,
        num_points=num_points,
        oversample_ratio=oversample_ratio,
        importance_sample_ratio=importance_sample_ratio,
        generator=_loss_generator(seed, step, rank),
    )
    return StepOutput(losses, out.low_res_logits, out.iou_predictions, out.routing)


def correction_round(
    prompts: Sequence[Sequence[Prompt]], low_res_logits: Tensor, targets: Tensor, *, image_size: int
) -> list[list[Prompt]]:
    """SAM-style interactive training: add the RITM oracle click on each error, feed the mask back.

    Args:
      prompts: per image, the prompts of the previous round (model frame).
      low_res_logits: T x 1 x h x w logits of the previous round, in the same (flattened) order.
      targets: T x 1 x S x S soft targets.
      image_size: S.

    Returns:
      New prompts: previous points/box plus one click (positive on a miss, negative on a false
      positive; on a perfect prediction a positive click at the target's most interior pixel,
      so that every prompt keeps the same structure) and the previous logits as mask input.
    """
    logits = low_res_logits.detach()
    upsampled = F.interpolate(logits, (image_size, image_size), mode="bilinear", align_corners=False)
    predictions = (upsampled[:, 0] > 0).cpu().numpy()
    truths = (targets[:, 0] > 0.5).cpu().numpy()
    flat = iter(zip(predictions, truths, logits[:, 0].cpu().numpy()))
    out = []
    for image_prompts in prompts:
        new = []
        for prompt in image_prompts:
            pred, gt, low_res = next(flat)
            point, label = oracle_point(gt, None if (gt == pred).all() else pred)
            coords = (
                point[None]
                if prompt.point_coords is None
                else np.concatenate([prompt.point_coords, point[None]])
            )
            labels = (
                np.array([label])
                if prompt.point_labels is None
                else np.concatenate([prompt.point_labels, [label]])
            )
            new.append(
                Prompt(
                    kind=f"{prompt.kind}+click",
                    point_coords=coords,
                    point_labels=labels,
                    box=prompt.box,
                    mask_input=low_res,
                )
            )
        out.append(new)
    return out


def iou_head_targets(low_res_logits: Tensor, targets: Tensor) -> Tensor:
    """The IoU of each binarised prediction with its target, for training SAM's IoU head.

    low_res_logits: T x M x h x w (M outputs per target); targets: T x 1 x H x W. Returns T x M.
    """
    pred = (
        F.interpolate(low_res_logits.detach(), targets.shape[-2:], mode="bilinear", align_corners=False) > 0
    )
    truth = targets > 0.5
    intersection = (pred & truth).flatten(2).sum(2).float()
    union = (pred | truth).flatten(2).sum(2).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def _is_single_click(prompt: Prompt) -> bool:
    return (
        prompt.box is None
        and prompt.mask_input is None
        and prompt.point_coords is not None
        and len(prompt.point_coords) == 1
    )


def sam_training_step(
    model: StableSam,
    batch: TrainingBatch,
    *,
    correction_clicks: int = 1,
    iou_loss_weight: float = 1.0,
) -> dict[str, Tensor]:
    """One step of training SAM itself (all of its weights), the way SAM was trained.

    Each image's precise prompts are decoded (all its targets in one decoder call), then
    ``correction_clicks`` interactive rounds each add the RITM oracle click on the remaining error
    and feed the previous logits back as the mask input (SAM's iterative training, shortened).
    Every round is supervised with dense BCE + dice per target: an ambiguous single click through
    SAM's three multimask outputs, of which only the best takes the loss (SAM's rule), every other
    prompt through mask token 0. The IoU head regresses the IoU of each of its predictions (MSE).
    The encoder runs with gradients, once per batch.

    Args:
      model: a :class:`StableSam` without plug-ins whose SAM parameters were unfrozen.
      batch: on the model's device.

    Returns:
      Loss terms averaged over rounds: {"bce", "dice", "iou_mse", "total"}.
    """
    device = batch.images.device
    embeddings = model.sam.image_encoder(model.sam.preprocess(batch.images.float()))
    prompts = [list(p) for p in batch.prompts]
    rounds = 1 + max(0, correction_clicks)
    sums: dict[str, Tensor] = {}
    for round_index in range(rounds):
        terms, chosen, offset = [], [], 0
        for i, image_prompts in enumerate(prompts):
            targets = batch.targets[offset : offset + len(image_prompts)]
            offset += len(image_prompts)
            out = model.decode(
                embeddings[i : i + 1],
                PromptTensors.stack(image_prompts, device),
                multimask_output=_is_single_click(image_prompts[0]),
            )
            per_output = per_mask_losses(out.low_res_logits, targets)  # P x M each
            best = (per_output["bce"] + per_output["dice"]).argmin(dim=1, keepdim=True)
            iou_mse = F.mse_loss(
                out.iou_predictions, iou_head_targets(out.low_res_logits, targets), reduction="none"
            ).mean(dim=1)
            terms.append(
                {
                    "bce": per_output["bce"].gather(1, best)[:, 0],
                    "dice": per_output["dice"].gather(1, best)[:, 0],
                    "iou_mse": iou_mse,
                }
            )
            chosen.append(
                out.low_res_logits.gather(
                    1, best[..., None, None].expand(-1, 1, *out.low_res_logits.shape[-2:])
                )
            )
        round_terms = {k: torch.cat([t[k] for t in terms]).mean() for k in ("bce", "dice", "iou_mse")}
        round_terms["total"] = (
            round_terms["bce"] + round_terms["dice"] + iou_loss_weight * round_terms["iou_mse"]
        )
        for key, value in round_terms.items():
            sums[key] = sums.get(key, 0.0) + value / rounds
        if round_index + 1 < rounds:
            prompts = correction_round(
                prompts, torch.cat(chosen), batch.targets, image_size=batch.images.shape[-1]
            )
    return sums
