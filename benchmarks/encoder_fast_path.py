"""The frozen image encoder's fast path against segment-anything's fp32 encoder, timed in one run.

    python -m benchmarks.encoder_fast_path [--image-size 1024] [--repeats 5] [--precision bf16]
        [--images 4] [--threads N] [--device cpu]

1. Speed (the goal's model): a SAM of vit_b's shape (embed_dim 768, depth 12, 12 heads, global
   attention in blocks 2, 5, 8, 11, windows of 14, patch 16; at 1024 px exactly
   ``build_sam_vit_b``) built from segment-anything's classes at ``--image-size``, with random
   weights: segment-anything's initialisation, relative positions drawn N(0, 0.1^2) (SAM starts
   them at zero, which would leave the bias path idle). ``StableSam.embed_images`` in fp32
   (segment-anything's own attention, no autocast) and on the fast path
   (``encoder_precision``: FastAttention + autocast), alternating on the SAME model, under
   ``torch.inference_mode``, one warm-up each, median of ``--repeats``. Then the embedding's
   relative error and the masks of the same decoder (fp32, no plug-ins) from both embeddings:
   five prompts per image (GT box, noisy box, the RITM first click, 1 and 3 random clicks) on
   ``--images`` images of the embedded validation split, binarised at 0 at the original
   resolution; IoU fast vs fp32, mean and min over the prompts. A control does the same with
   white noise of the fast path's error norm added to the fp32 embedding: random weights give
   near-noise masks that flip pixels under small perturbations of any kind, and the control
   shows how much of the IoU gap is that.
2. The same errors and IoU on the project's released small base (``--base``, trained weights,
   128 px input) and its own images: random weights give near-noise masks whose IoU says little
   about real use. Its encoder is too small for its timing to matter (shown anyway).

Timings are wall times of this machine (torch's default threads unless ``--threads``); on CUDA
each timed call is synchronised.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stable_sam.build import SMALL_SAM_SPECS, SmallSamSpec, build_stable_sam
from stable_sam.config import PluginConfig
from stable_sam.evaluation import PreparedImage
from stable_sam.metrics import mask_iou
from stable_sam.modeling import PromptTensors, StableSam
from stable_sam.prompts import sample_prompt

from ._common import default_images

BASE = Path("base/release/sam_small.pth")
PROMPT_KINDS = ("gt_box", "noisy_box", "oracle_point", "point_1", "point_3")


def vit_b_shaped(image_size: int) -> SmallSamSpec:
    """vit_b's encoder and decoder (segment-anything's ``_build_sam`` settings) at another input size."""
    return SmallSamSpec(
        img_size=image_size,
        patch_size=16,
        encoder_dim=768,
        encoder_depth=12,
        encoder_heads=12,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        prompt_dim=256,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        mask_in_chans=16,
        iou_head_hidden_dim=256,
    )


def random_model(spec: SmallSamSpec, *, seed: int = 0) -> StableSam:
    """SAM of ``spec`` with segment-anything's random initialisation, non-zero relative positions."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = spec.build()
        with torch.no_grad():
            for block in sam.image_encoder.blocks:
                block.attn.rel_pos_h.normal_(0.0, 0.1)
                block.attn.rel_pos_w.normal_(0.0, 0.1)
    return StableSam(sam=sam.eval(), sam_type="random", plugin_config=PluginConfig(variant="none"))


@dataclass
class Comparison:
    """fp32 vs fast path on one model: seconds per encoder call, errors, mask agreement."""

    reference_s: float
    fast_s: float
    relative_error: float
    ious: list[float]
    noise_ious: list[float]  # the same-size white-noise control

    @property
    def ratio(self) -> float:
        return self.reference_s / self.fast_s


def _input(image: PreparedImage, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(image.input_image).permute(2, 0, 1)[None].float().to(device)


def _timed_embedding(model: StableSam, batch: torch.Tensor, precision: str) -> tuple[torch.Tensor, float]:
    model.set_encoder_precision(precision)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    started = time.perf_counter()
    embeddings = model.embed_images(batch)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
    return embeddings, time.perf_counter() - started


def _masks(
    model: StableSam, embedding: torch.Tensor, image: PreparedImage, prompts: PromptTensors
) -> np.ndarray:
    """P x H x W bool masks of mask token 0 at the image's original resolution."""
    out = model.decode(embedding, prompts, multimask_output=False)
    logits = model.sam.postprocess_masks(out.low_res_logits, image.input_size, image.original_size)
    return (logits[:, 0] > 0).cpu().numpy()


def _mask_ious(
    model: StableSam, images: list[PreparedImage], reference: torch.Tensor, other: torch.Tensor
) -> list[float]:
    """IoU of the masks decoded from ``other`` against those from ``reference``, per prompt."""
    ious = []
    generator = np.random.default_rng(0)  # the same prompts for every call
    for i, image in enumerate(images):
        for kind in PROMPT_KINDS:  # one prompt per decoder call: boxes and clicks differ in structure
            prompt = sample_prompt(
                kind, image.frame_mask, generator=generator, mask_input_size=model.mask_input_size
            )
            tensors = PromptTensors.stack([prompt], model.device)
            expected = _masks(model, reference[i : i + 1], image, tensors)[0]
            got = _masks(model, other[i : i + 1], image, tensors)[0]
            iou = mask_iou(expected, got)
            ious.append(1.0 if np.isnan(iou) else iou)  # both empty: the same mask
    return ious


def compare(model: StableSam, images: list[PreparedImage], *, precision: str, repeats: int) -> Comparison:
    """Embed each image both ways (the first pair is the warm-up), time both ways alternately on
    the first image, then compare embeddings and masks. One image per call: ViT attention maps
    of several 1024 px images at once would not fit a small machine in fp32."""
    inputs = [_input(image, model.device) for image in images]
    paths = ("fp32", precision)
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        embedded = [{name: _timed_embedding(model, x, name)[0] for name in paths} for x in inputs]
        for i in range(repeats):
            for name in paths if i % 2 else paths[::-1]:
                times[name].append(_timed_embedding(model, inputs[0], name)[1])
        model.set_encoder_precision("fp32")
        reference = torch.cat([e["fp32"] for e in embedded])
        fast = torch.cat([e[precision] for e in embedded])
        difference = fast - reference
        # The control: white noise with the fast path's error norm, to tell the decoder's own
        # sensitivity (high for random weights) from the fast path's particular error.
        generator = torch.Generator(device=reference.device).manual_seed(0)
        noise = torch.randn(reference.shape, generator=generator, device=reference.device)
        noisy = reference + noise * (difference.norm() / noise.norm())
        return Comparison(
            reference_s=statistics.median(times["fp32"]),
            fast_s=statistics.median(times[precision]),
            relative_error=float(difference.norm() / reference.norm()),
            ious=_mask_ious(model, images, reference, fast),
            noise_ious=_mask_ious(model, images, reference, noisy),
        )


def _report(label: str, result: Comparison, precision: str) -> None:
    print(
        f"{label}: encoder fp32 {result.reference_s:8.3f} s/image, {precision} fast path "
        f"{result.fast_s:8.3f} s/image: ratio fast/fp32 {1 / result.ratio:.3f} (speed-up {result.ratio:.2f}x)"
    )
    print(
        f"{label}: embedding relative error {result.relative_error:.2e}; mask IoU fast vs fp32 over "
        f"{len(result.ious)} prompts: mean {np.mean(result.ious):.4f}, min {np.min(result.ious):.4f} "
        f"(control, fp32 + white noise of the same norm: mean {np.mean(result.noise_ious):.4f}, "
        f"min {np.min(result.noise_ious):.4f})"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=1024, help="input size (vit_b: 1024)")
    parser.add_argument("--shape", choices=("vit_b", "tiny"), default="vit_b", help="tiny: a smoke test")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path (median)")
    parser.add_argument("--images", type=int, default=4, help="images compared (5 prompts each)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--base", type=Path, default=BASE, help="the trained small base for part 2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = vit_b_shaped(args.image_size) if args.shape == "vit_b" else SMALL_SAM_SPECS["tiny"]
    spec = dataclasses.replace(spec, img_size=args.image_size)
    model = random_model(spec).to(args.device)
    images, data_desc = default_images(args.image_size, limit=args.images)
    grid = args.image_size // spec.patch_size
    print(
        f"torch {torch.__version__}, {args.device} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads; fast path: {args.precision} autocast + SDPA attention"
    )
    print(
        f"model: {args.shape}-shaped SAM, random weights: embed_dim {spec.encoder_dim}, depth {spec.encoder_depth}, "
        f"heads {spec.encoder_heads}, global attention at {list(spec.global_attn_indexes)}, window "
        f"{spec.window_size}, patch {spec.patch_size}; image size {args.image_size} ({grid} x {grid} tokens); "
        f"{len(images)} images ({data_desc}); timed: median of {args.repeats} alternating calls on one image"
    )
    result = compare(model, images, precision=args.precision, repeats=args.repeats)
    _report(f"{args.shape} random", result, args.precision)
    results = {
        "ratio": result.ratio,
        "reference_s": result.reference_s,
        "fast_s": result.fast_s,
        "relative_error": result.relative_error,
        "iou_mean": float(np.mean(result.ious)),
        "iou_min": float(np.min(result.ious)),
        "noise_iou_mean": float(np.mean(result.noise_ious)),
    }
    if not args.base.is_file():
        print(f"small trained base: {args.base} not found, part 2 skipped")
        return results
    small = build_stable_sam(
        sam_type="small",
        sam_checkpoint=args.base,
        plugin_config=PluginConfig(variant="none"),
        device=args.device,
    ).eval()
    small_images, _ = default_images(small.img_size, limit=args.images)
    print(f"model: the released small base {args.base} (trained, {small.img_size} px), the same images")
    trained = compare(small, small_images, precision=args.precision, repeats=args.repeats)
    _report("small trained", trained, args.precision)
    results.update(
        small_relative_error=trained.relative_error,
        small_iou_mean=float(np.mean(trained.ious)),
        small_iou_min=float(np.min(trained.ious)),
    )
    return results


if __name__ == "__main__":
    main()
