"""Stage ``train_base``: the SAM the plug-ins attach to.

- ``sam.type`` official (vit_b/l/h): nothing is trained; the official checkpoint (``sam.checkpoint``
  or the one the fetch stage verified) is hashed and named in ``models/base/sam.json``.
- ``sam.type`` small/tiny with ``sam.checkpoint`` set: that checkpoint is used as is.
- ``sam.type`` small/tiny without a checkpoint (the embedded default): a small SAM is trained
  from scratch on the embedded training split the way SAM was trained, with precise prompts
  only (tight boxes, several clicks, correction clicks), so that, like SAM, it is good with
  precise prompts and brittle with loose ones. Interrupted runs resume from ``.stage_state``.

    python -m pipeline.train_base --raw data/raw --out models/base \\
        --metrics metrics/train_base.json --plot plots/train_base.csv
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stable_sam.build import OFFICIAL_SAM_TYPES, SMALL_SAM_SPECS, build_sam, file_sha256
from stable_sam.checkpoint import atomic_torch_save
from stable_sam.config import Params, PluginConfig, config_to_dict
from stable_sam.modeling import StableSam
from stable_sam.training import (
    AugmentedPromptDataset,
    ShardedBatchSampler,
    collate_training,
    precise_prompt_sampler,
    sam_training_step,
)

from .params import load_params, stage_argument_parser
from .raw_data import read_raw_manifest
from .run_state import TRAINING_CODE, resume_or_start, run_fingerprint, state_dir
from .sam_source import SamSource, write_json_atomic, write_sam_source

__all__ = ["TrainBasePaths", "main", "run"]

logger = logging.getLogger("pipeline.train_base")


@dataclass(frozen=True)
class TrainBasePaths:
    raw: Path
    out: Path
    metrics: Path
    plot: Path


def _learning_rate(step: int, *, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _official_source(params: Params, paths: TrainBasePaths) -> SamSource:
    if params.sam.checkpoint:
        path = Path(params.sam.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"sam.checkpoint: {path} does not exist")
        # The builder rejects a checkpoint of another type with a message naming both.
        build_sam(params.sam.type, path)
        return SamSource(params.sam.type, str(path), file_sha256(path), "user")
    path, sha = read_raw_manifest(paths.raw).require_checkpoint(params.sam.type)
    return SamSource(params.sam.type, str(Path(path).resolve()), sha, "official")


def run(params: Params, paths: TrainBasePaths, *, tracker: Any = None) -> dict[str, Any]:
    """Resolve or train the base SAM; write ``<out>/sam.json`` (+ the trained checkpoint)."""
    paths.out.mkdir(parents=True, exist_ok=True)
    sam_type = params.sam.type
    if sam_type in OFFICIAL_SAM_TYPES or params.sam.checkpoint:
        source = _official_source(params, paths)
        write_sam_source(paths.out, source)
        metrics = {"trained": 0, "sam_type": sam_type, "origin": source.origin}
        _write_outputs(paths, metrics, history=[])
        logger.info(
            "using the %s SAM checkpoint %s (sha256 %s): nothing to train",
            sam_type,
            source.checkpoint,
            source.sha256,
        )
        return metrics
    if sam_type not in SMALL_SAM_SPECS:
        raise ValueError(f"sam.type={sam_type!r} is neither official nor a small configuration")
    return _train(params, paths, tracker=tracker)


def _train(params: Params, paths: TrainBasePaths, *, tracker: Any) -> dict[str, Any]:
    cfg = params.base
    raw = read_raw_manifest(paths.raw)
    dataset_name = params.data.train[0]
    source = raw.open_dataset(dataset_name, split="train")
    spec = SMALL_SAM_SPECS[params.sam.type]
    dataset = AugmentedPromptDataset(
        source,
        image_size=spec.img_size,
        prompt_sampler=precise_prompt_sampler(
            point_counts=cfg.point_counts, box_probability=cfg.box_probability
        ),
        seed=cfg.seed,
        lsj=True,
        lsj_scale=(cfg.lsj_min_scale, cfg.lsj_max_scale),
        hflip_probability=params.data.hflip_probability,
        targets="instances",
    )
    fingerprint = run_fingerprint(
        "train_base",
        params.sam.type,
        config_to_dict(cfg),
        params.data.train,
        file_sha256(paths.raw / "manifest.json"),
        code=(*TRAINING_CODE, "pipeline/train_base.py"),
    )
    resume_dir = state_dir("train_base", fingerprint)
    resume_file = resume_dir / "state.pt"

    def build() -> tuple[StableSam, torch.optim.Optimizer]:
        # Module initialisers draw from the global RNG: seed it from params for reproducibility.
        torch.manual_seed(cfg.seed)
        sam, _ = build_sam(params.sam.type)
        model = StableSam(sam=sam, sam_type=params.sam.type, plugin_config=PluginConfig(variant="none"))
        # The base model IS SAM being trained: every SAM weight is trainable here.
        model.sam.requires_grad_(True)
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def restore(objects: tuple[StableSam, torch.optim.Optimizer], state: dict[str, Any]) -> None:
        objects[0].sam.load_state_dict(state["sam"])
        objects[1].load_state_dict(state["optimizer"])

    # An unusable state (truncated by a kill, other code) is moved aside and training starts over.
    (model, optimizer), state = resume_or_start(
        resume_file, build, restore, required=("sam", "optimizer", "step", "history")
    )
    start_step, history = 0, []
    if state is not None:
        start_step, history = int(state["step"]), list(state["history"])
        logger.info("resuming train_base from step %d (%s)", start_step, resume_file)

    sampler = ShardedBatchSampler(
        dataset_size=len(dataset),
        local_batch=cfg.batch_size,
        num_replicas=1,
        rank=0,
        seed=cfg.seed,
        total_steps=cfg.steps,
        start_step=start_step,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_training)
    started = time.perf_counter()
    images_seen = 0
    progress = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train_base",
        unit="step",
        mininterval=10.0,
        dynamic_ncols=True,
    )
    step = start_step
    for step, batch in enumerate(loader, start=start_step):
        lr = _learning_rate(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        terms = sam_training_step(
            model, batch, correction_clicks=cfg.correction_clicks, iou_loss_weight=cfg.iou_loss_weight
        )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        images_seen += len(batch.names)
        terms = {k: v.detach() for k, v in terms.items()}
        row = {"step": step + 1, "lr": lr, **{k: float(v) for k, v in terms.items()}}
        row["images_per_s"] = images_seen / (time.perf_counter() - started)
        history.append(row)
        progress.update(1)
        progress.set_postfix(
            loss=f"{row['total']:.3f}",
            iou_mse=f"{row['iou_mse']:.3f}",
            img_s=f"{row['images_per_s']:.1f}",
            refresh=False,
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info(
                "step %d/%d loss %.4f (bce %.4f dice %.4f iou %.4f) lr %.2e %.1f img/s",
                step + 1, cfg.steps, row["total"], row["bce"], row["dice"], row["iou_mse"], lr, row["images_per_s"],
            )  # fmt: skip
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            atomic_torch_save(
                {
                    "sam": model.sam.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                    "history": history,
                },
                resume_file,
            )
    progress.close()
    if step + 1 < cfg.steps and start_step < cfg.steps:
        raise RuntimeError(f"train_base stopped at step {step + 1} of {cfg.steps}")

    checkpoint = paths.out / f"sam_{params.sam.type}.pth"
    atomic_torch_save(model.sam.state_dict(), checkpoint)
    # Round trip through the same strict loader as an official checkpoint.
    _, sha = build_sam(params.sam.type, checkpoint)
    write_sam_source(paths.out, SamSource(params.sam.type, str(checkpoint), sha, "trained"))
    elapsed = time.perf_counter() - started
    last = history[-min(len(history), 20) :] if history else []
    metrics = {
        "trained": 1,
        "sam_type": params.sam.type,
        "steps": cfg.steps,
        "parameters": sum(p.numel() for p in model.sam.parameters()),
        "final_loss": sum(r["total"] for r in last) / max(1, len(last)),
        "train_seconds": round(elapsed, 1),
        "images_per_s": round(images_seen / elapsed, 2) if images_seen else None,
        "resumed_from_step": start_step,
    }
    _write_outputs(paths, metrics, history)
    if tracker is not None:
        tracker.log_metrics_series(history, step_key="step")
        tracker.log_dataset(raw.dataset_root(dataset_name), name=f"{dataset_name}-train", context="training")
        tracker.log_artifact(checkpoint, artifact_path="base_model")
    if resume_file.is_file():
        resume_file.unlink()
    return metrics


def _write_outputs(paths: TrainBasePaths, metrics: dict[str, Any], history: list[dict[str, float]]) -> None:
    write_json_atomic(paths.metrics, metrics)
    paths.plot.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.plot.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        fields = ["step", "total", "bce", "dice", "iou_mse", "lr", "images_per_s"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(paths.plot)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="raw data folder (fetch stage output)")
    parser.add_argument("--out", type=Path, required=True, help="base model folder (sam.json + checkpoint)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = TrainBasePaths(raw=args.raw, out=args.out, metrics=args.metrics, plot=args.plot)
    from .tracking import stage_run

    with stage_run("train_base", params, params_path=Path(args.params)) as tracker:
        metrics = run(params, paths, tracker=tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(paths.metrics, artifact_path="metrics")
    return metrics


if __name__ == "__main__":
    main()
