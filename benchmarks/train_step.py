"""Training throughput on a device: the base SAM's pretraining step and Stable-SAM's plug-in step.

    python -m benchmarks.train_step [--device cpu|cuda] [--batch-sizes 8 32] [--steps 20]
        [--images 64] [--loader-workers 0] [--threads 1] [--kinds base plugin]
        [--encoder-dim D --encoder-depth N]

Both steps as the pipeline runs them, on a freshly generated split of the embedded generator
(``--images`` scenes of 128 px, split ``bench``: no scene of the committed splits), through the
same dataset, sampler and collate as ``pipeline.train_base`` and ``pipeline.train``:

1. **base** (``base/dvc.yaml``'s pretrain/tighten/extend): the released small architecture with
   every weight trainable, SAM's precise prompts over all instances of each image,
   ``sam_training_step`` (encoder with gradients, one decoder call per image, one correction
   click), AdamW.
2. **plug-in** (the default ``train`` stage): the frozen small SAM with params.yaml's plug-ins,
   the robust prompt mixture, ``supervised_step`` (frozen encoder under no_grad, HQ-SAM's
   point-sampled loss), AdamW over the plug-in's parameters only.

For each batch size: 2 warm-up steps, then ``--steps`` timed steps (data loading included, CUDA
synchronised after each step); prints images/s, ms per step and, on CUDA, the peak memory. Random
weights: throughput does not depend on them. ``--encoder-dim`` / ``--encoder-depth`` price a bigger
base (a wider or deeper encoder, the same decoder) before anyone pretrains one. Also checks that
every loss is finite and that the plug-in step leaves every SAM weight untouched. Prompts,
augmentation and plug-ins are params.yaml's (``base``, ``train``, ``data``, ``plugin``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.params import Params, load_params
from pipeline.train_base import pretraining_dataset
from stable_sam.build import SMALL_SAM_SPECS, SmallSamSpec, build_stable_sam
from stable_sam.config import PluginConfig
from stable_sam.data import open_dataset
from stable_sam.modeling import StableSam
from stable_sam.training import (
    AugmentedPromptDataset,
    ShardedBatchSampler,
    TrainingBatch,
    collate_training,
    robust_prompt_sampler,
    sam_training_step,
    supervised_step,
)

SAM_TYPE = "small"


def _split(root: Path, num_images: int) -> Path:
    from pipeline.sources import generate_split

    generate_split(root / "bench", num_images=num_images, image_size=128, generator_seed=0, split="bench")
    return root / "bench"


def _loader(dataset, *, batch: int, steps: int, workers: int) -> torch.utils.data.DataLoader:
    sampler = ShardedBatchSampler(
        dataset_size=len(dataset), local_batch=batch, num_replicas=1, rank=0, seed=0, total_steps=steps
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_training, num_workers=workers
    )


def _timed(
    loader, step: Callable[[TrainingBatch, int], torch.Tensor], device: torch.device, warmup: int
) -> tuple[float, list[float]]:
    """Seconds of the steps after ``warmup`` (loading included) and every step's loss."""
    losses, started = [], None
    for index, batch in enumerate(loader):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        losses.append(float(step(batch.to(device), index)))  # float(): synchronises the device
    return time.perf_counter() - started, losses


def _base_step(device: torch.device, seed: int, spec: SmallSamSpec):
    torch.manual_seed(seed)
    plain = PluginConfig(variant="none")
    model = StableSam(sam=spec.build(), sam_type=f"{SAM_TYPE}-variant", plugin_config=plain).to(device)
    model.sam.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: TrainingBatch, index: int) -> torch.Tensor:
        terms = sam_training_step(model, batch, correction_clicks=1)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        return terms["total"].detach()

    return model, step


def _plugin_step(device: torch.device, seed: int, params: Params):
    torch.manual_seed(seed)
    model = build_stable_sam(sam_type=SAM_TYPE, plugin_config=params.plugin, device=device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    def step(batch: TrainingBatch, index: int) -> torch.Tensor:
        out = supervised_step(
            model, model, batch, seed=seed, step=index, num_points=params.train.num_points_loss
        )
        optimizer.zero_grad(set_to_none=True)
        out.losses["total"].backward()
        optimizer.step()
        return out.losses["total"].detach()

    return model, step


def _base_spec(dim: int | None, depth: int | None) -> SmallSamSpec:
    """The released small architecture, or a wider / deeper encoder (global attention in every other block)."""
    spec = SMALL_SAM_SPECS[SAM_TYPE]
    if dim is None and depth is None:
        return spec
    depth = depth or spec.encoder_depth
    dim = dim or spec.encoder_dim
    spec = dataclasses.replace(
        spec,
        encoder_dim=dim,
        encoder_depth=depth,
        encoder_heads=max(1, dim // 32),
        global_attn_indexes=tuple(range(1, depth, 2)),
    )
    print(
        f"base step on a {dim}-d x {depth}-block encoder ({sum(p.numel() for p in spec.build().parameters()):,} parameters)"
    )
    return spec


def _dataset(
    data: Path, kind: str, params: Params, mask_input_size: tuple[int, int]
) -> AugmentedPromptDataset:
    """The stage's own training data: the base's (``pipeline.train_base``) or the plug-in's (``train``)."""
    if kind == "base":
        return pretraining_dataset(params.base, SAM_TYPE, data)
    return AugmentedPromptDataset(
        open_dataset(str(data), split="train"),
        image_size=SMALL_SAM_SPECS[SAM_TYPE].img_size,
        prompt_sampler=robust_prompt_sampler(params.train.prompts, mask_input_size=mask_input_size),
        seed=params.train.seed,
        lsj=params.train.lsj,
        lsj_scale=(params.data.lsj_min_scale, params.data.lsj_max_scale),
        hflip_probability=params.data.hflip_probability,
    )


def measure(
    kind: str,
    data: Path,
    *,
    device: torch.device,
    batch: int,
    steps: int,
    workers: int,
    spec: SmallSamSpec = SMALL_SAM_SPECS[SAM_TYPE],
) -> dict:
    """Throughput of one step kind ("base" or "plugin") at one batch size (``spec``: the base's SAM)."""
    params = load_params()  # params.yaml: the plug-ins, prompt mixtures and augmentation the stages use
    if kind == "base":
        model, step = _base_step(device, seed=0, spec=spec)
    else:
        model, step = _plugin_step(device, seed=0, params=params)
    frozen = None  # the plug-in step: SAM's own (frozen) weights, which must not move
    if kind == "plugin":
        frozen = {k: p.detach().clone() for k, p in model.sam.named_parameters() if not p.requires_grad}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 2
    loader = _loader(
        _dataset(data, kind, params, model.mask_input_size),
        batch=batch,
        steps=warmup + steps,
        workers=workers,
    )
    seconds, losses = _timed(loader, step, device, warmup)
    if not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"{kind} step at batch {batch}: a loss is not finite: {losses}")
    if frozen is not None:
        moved = [k for k, p in model.sam.named_parameters() if k in frozen and not torch.equal(p, frozen[k])]
        if moved:
            raise RuntimeError(f"the plug-in step changed SAM weights: {moved[:5]}")
    return {
        "kind": kind,
        "batch": batch,
        "images_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--images", type=int, default=64, help="scenes generated for the benchmark")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--encoder-dim", type=int, default=None, help="base step: another encoder width")
    parser.add_argument("--encoder-depth", type=int, default=None, help="base step: another encoder depth")
    parser.add_argument("--kinds", nargs="+", choices=("base", "plugin"), default=["base", "plugin"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = _base_spec(args.encoder_dim, args.encoder_depth)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.loader_workers} loaders"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = _split(Path(tmp), args.images)
        for kind in args.kinds:
            for batch in args.batch_sizes:
                r = measure(
                    kind,
                    data,
                    device=device,
                    batch=batch,
                    steps=args.steps,
                    workers=args.loader_workers,
                    spec=spec,
                )
                memory = "" if r["peak_mb"] is None else f", peak {r['peak_mb']:.0f} MB"
                print(
                    f"{kind:>6} step, batch {batch:3d}: {r['images_per_s']:8.1f} img/s, "
                    f"{r['ms_per_step']:7.1f} ms/step{memory} (loss {r['first_loss']:.3f} -> {r['last_loss']:.3f})"
                )
                results.append(r)
    return results


if __name__ == "__main__":
    main()
