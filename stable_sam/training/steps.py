"""Training step functions: one supervised step, correction clicks, SAM's multimask step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import mask_loss, per_mask_losses
from ..modeling.stable_sam import PromptTensors, StableSam
from ..prompts import Prompt, oracle_point
from .dataset import TrainingBatch
from .prompt_sampling import seeded_generator

__all__ = ["StepOutput", "correction_round", "iou_head_targets", "sam_training_step", "supervised_step"]


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
