"""Stage ``pretrain`` of ``base/dvc.yaml``: the small base SAM, pretrained once and released.

Like Meta's SAM, the base that the default pipeline's plug-ins attach to is trained outside
that pipeline, on its own data (a generated ``pretrain`` split, disjoint from the embedded
train/val splits), with precise prompts only: SAM's jittered GT boxes, several clicks, single
clicks through the multimask outputs, and correction clicks with the previous mask fed back.
So, like SAM, it is good with precise prompts and brittle with loose ones. The result is
released with ``make release-base`` (fp16 copy + model card in ``base/release/``, sha256 pinned in
params.yaml's ``sam.sha256``); the default ``dvc repro`` verifies and uses that file.
Interrupted runs resume from ``.stage_state`` (model, optimiser, scheduler, step).

With ``--phase tighten --init``, the same module is stage ``tighten``, the base's second phase: it
starts from the pretrained weights and trains on with SAM's tight boxes (``tighten`` params: steps,
rate, box jitter, seed; every other choice is the ``base`` section's), so that the decoder follows
the box. Those two phases made the released base v1 (``base/release/v1/``). With ``--phase extend``
it is stage ``extend``, a round of training on: the last release as committed (fp16, its sha256
pinned as ``extend.init_sha256``; v1 made v2) trained on for longer at a restarted
rate (``extend`` params); its result is the next release.

    python -m pipeline.train_base --data data/base/pretrain --out models/pretrained \\
        --metrics metrics/pretrain.json --plot plots/pretrain.csv
    python -m pipeline.train_base --phase tighten --init models/pretrained --data data/base/pretrain \\
        --out models/tightened --metrics metrics/tighten.json --plot plots/tighten.csv
    python -m pipeline.train_base --phase extend --init base/release/v1 --data data/base/pretrain \\
        --out models/extended --metrics metrics/extend.json --plot plots/extend.csv
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_sam.build import SMALL_SAM_SPECS, build_sam
from stable_sam.checkpoint import atomic_torch_save, file_sha256
from stable_sam.config import PluginConfig, config_to_dict
from stable_sam.data import open_dataset
from stable_sam.modeling import StableSam
from stable_sam.training import (
    AugmentedPromptDataset,
    LoopConfig,
    ShardedBatchSampler,
    TrainingBatch,
    collate_training,
    precise_prompt_sampler,
    sam_training_step,
    train_loop,
)

from .params import BaseTrainConfig, Params, load_params
from .run_state import TRAINING_CODE, resume_or_start, run_fingerprint, state_dir
from .sam_source import write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = [
    "PHASES",
    "TrainBasePaths",
    "main",
    "phase_config",
    "pretraining_dataset",
    "run",
    "training_device",
]

logger = logging.getLogger("pipeline.train_base")


@dataclass(frozen=True)
class TrainBasePaths:
    data: Path  # the pretraining split (HQSeg layout + instances/)
    out: Path  # models/pretrained: sam_<type>.pth
    metrics: Path
    plot: Path
    init: Path | None = None  # tighten, extend: the folder of the sam_<type>.pth to start from
    phase: str = "pretrain"  # one of PHASES


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, floor: float = 0.02):
    """Linear warm-up from 1 % of the rate, then cosine decay to ``floor`` x the rate (torch's own)."""
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=max(1, warmup))
    base = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total - warmup), eta_min=floor * base
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[max(1, warmup)])


def run(params: Params, paths: TrainBasePaths, *, tracker: Any = None, device: str = "cpu") -> dict[str, Any]:
    """Pretrain the small base SAM named by ``sam.type``; write ``<out>/sam_<type>.pth`` and metrics.

    ``device``: where the model trains ("cpu", "cuda", "cuda:1", or "auto": the GPU if torch sees
    one). Not part of the resume fingerprint: a run started on one device resumes on another.
    """
    if params.sam.type not in SMALL_SAM_SPECS:
        raise ValueError(
            f"sam.type={params.sam.type!r}: only the small configurations {sorted(SMALL_SAM_SPECS)} are "
            "pretrained here; official SAMs come from Meta's checkpoints"
        )
    _check_phase(paths)
    return _train(params, paths, tracker=tracker, device=training_device(device))


def training_device(choice: str) -> torch.device:
    """``--device``: "auto" is the GPU if torch sees one, else the CPU; a missing GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as err:
        raise ValueError(f"--device {choice!r}: not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {choice!r}: torch sees no CUDA device here (use cpu or auto)")
    return device


def phase_config(params: Params, phase: str) -> BaseTrainConfig:
    """The ``base`` section, or for a later phase the ``base`` section with that phase's keys."""
    if phase == "pretrain":
        return params.base
    later = {"tighten": params.tighten, "extend": params.extend}[phase]
    return dataclasses.replace(
        params.base,
        steps=later.steps,
        lr=later.lr,
        warmup_steps=later.warmup_steps,
        box_jitter=later.box_jitter,
        seed=later.seed,
    )


@dataclass(frozen=True)
class _Phase:
    """One of the base's phases: its resume-state key and its MLflow run name."""

    key: str  # .stage_state/<key>/ and the fingerprint's first element
    run_name: str


PHASES = {
    "pretrain": _Phase("train_base", "pretrain_base"),
    "tighten": _Phase("tighten", "tighten_base"),
    "extend": _Phase("extend", "extend_base"),
}


def _check_phase(paths: TrainBasePaths) -> None:
    if paths.phase not in PHASES:
        raise ValueError(f"phase {paths.phase!r}: must be one of {sorted(PHASES)}")
    if (paths.phase == "pretrain") != (paths.init is None):
        raise ValueError(
            f"phase {paths.phase!r} with init {paths.init}: pretrain starts from random weights (no "
            "--init), tighten and extend from the checkpoint folder given with --init"
        )


def _init_checkpoint(params: Params, paths: TrainBasePaths) -> tuple[Path | None, str | None]:
    """The checkpoint a later phase starts from and its sha256 (extend: must be the pinned one)."""
    if paths.init is None:
        return None, None
    init = paths.init / f"sam_{params.sam.type}.pth"
    if not init.is_file():
        raise FileNotFoundError(f"{init}: no checkpoint to start phase {paths.phase!r} from")
    sha = file_sha256(init)
    if paths.phase == "extend" and sha != params.extend.init_sha256:
        raise ValueError(
            f"{init}: sha256 {sha} is not extend.init_sha256 {params.extend.init_sha256} (the release "
            "this phase starts from); restore the file or pin the one you mean"
        )
    return init, sha


def pretraining_dataset(cfg: BaseTrainConfig, sam_type: str, data: Path) -> AugmentedPromptDataset:
    """The base's training data: SAM's precise prompts over every instance, LSJ and flips (``cfg``)."""
    return AugmentedPromptDataset(
        open_dataset(str(data), split="train"),
        image_size=SMALL_SAM_SPECS[sam_type].img_size,
        prompt_sampler=precise_prompt_sampler(
            point_counts=cfg.point_counts, box_probability=cfg.box_probability, box_jitter=cfg.box_jitter
        ),
        seed=cfg.seed,
        lsj=True,
        lsj_scale=(cfg.lsj_min_scale, cfg.lsj_max_scale),
        hflip_probability=0.5,
        targets="instances",
    )


def _train(params: Params, paths: TrainBasePaths, *, tracker: Any, device: torch.device) -> dict[str, Any]:
    cfg = phase_config(params, paths.phase)
    init, init_sha256 = _init_checkpoint(params, paths)
    torch.set_num_threads(cfg.threads)
    paths.out.mkdir(parents=True, exist_ok=True)
    dataset = pretraining_dataset(cfg, params.sam.type, paths.data)
    manifest = paths.data / "instances.json"
    phase = PHASES[paths.phase].key
    fingerprint = run_fingerprint(
        phase,
        params.sam.type,
        {k: v for k, v in config_to_dict(cfg).items() if k not in ("log_every", "threads")},
        file_sha256(manifest),
        *(() if init_sha256 is None else (init_sha256,)),
        code=(*TRAINING_CODE, "pipeline/train_base.py"),
    )
    resume_dir = state_dir(phase, fingerprint)
    resume_file = resume_dir / "state.pt"

    def build() -> tuple[StableSam, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        # Module initialisers draw from the global RNG: seed it from params for reproducibility.
        torch.manual_seed(cfg.seed)
        sam, _ = build_sam(params.sam.type, init)  # init None: random weights (pretraining)
        # Built on the CPU, then moved: the same initial weights on every device.
        model = StableSam(sam=sam, sam_type=params.sam.type, plugin_config=PluginConfig(variant="none"))
        model.to(device)
        # The base model IS SAM being trained: every SAM weight is trainable here.
        model.sam.requires_grad_(True)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return model, optimizer, warmup_cosine(optimizer, warmup=cfg.warmup_steps, total=cfg.steps)

    def restore(objects, state: dict[str, Any]) -> None:
        objects[0].sam.load_state_dict(state["sam"])
        objects[1].load_state_dict(state["optimizer"])
        objects[2].load_state_dict(state["scheduler"])

    # An unusable state (truncated by a kill, other code) is moved aside and training starts over.
    (model, optimizer, scheduler), state = resume_or_start(
        resume_file, build, restore, required=("sam", "optimizer", "scheduler", "step", "history")
    )
    start_step, history = 0, []
    if state is not None:
        start_step, history = int(state["step"]), list(state["history"])
        logger.info("resuming %s from step %d (%s)", phase, start_step, resume_file)
    logger.info("training %s on %s", phase, device)

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

    def step_fn(batch: TrainingBatch, step: int) -> dict[str, torch.Tensor]:
        return sam_training_step(
            model,
            batch.to(device),
            correction_clicks=cfg.correction_clicks,
            iou_loss_weight=cfg.iou_loss_weight,
        )

    def save(step: int, history: list[dict[str, Any]]) -> None:
        state = {"sam": model.sam.state_dict(), "optimizer": optimizer.state_dict()}
        state.update(scheduler=scheduler.state_dict(), step=step, history=history)
        atomic_torch_save(state, resume_file)

    started = time.perf_counter()
    loop = LoopConfig(
        total_steps=cfg.steps,
        start_step=start_step,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        images_per_step=cfg.batch_size,
        progress=phase,
    )
    train_loop(
        loader,
        step_fn=step_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        config=loop,
        history=history,
        save=save,
    )
    images_seen = (cfg.steps - start_step) * cfg.batch_size

    checkpoint = paths.out / f"sam_{params.sam.type}.pth"
    atomic_torch_save({k: v.cpu() for k, v in model.sam.state_dict().items()}, checkpoint)
    # Round trip through the same strict loader as an official checkpoint.
    build_sam(params.sam.type, checkpoint)
    elapsed = time.perf_counter() - started
    last = history[-min(len(history), 20) :] if history else []
    metrics = {
        "trained": 1,
        "sam_type": params.sam.type,
        "steps": cfg.steps,
        "parameters": sum(p.numel() for p in model.sam.parameters()),
        "final_loss": sum(r["total"] for r in last) / max(1, len(last)),
        "train_seconds": round(elapsed, 1),  # this invocation's (a resumed run adds up its parts)
        "images": len(dataset),
        "images_per_s": round(images_seen / elapsed, 2) if images_seen else None,
        "resumed_from_step": start_step,
    }
    if init_sha256 is not None:
        metrics["init_sha256"] = init_sha256
    _write_outputs(paths, metrics, history)
    if tracker is not None:
        tracker.log_metrics_series(history, step_key="step")
        tracker.log_dataset(paths.data, context="training")
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
    parser.add_argument("--data", type=Path, required=True, help="pretraining split (base/dvc.yaml: data)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the pretrained checkpoint")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--phase", choices=list(PHASES), default="pretrain", help="which phase (stage)")
    parser.add_argument(
        "--init", type=Path, default=None, help="tighten, extend: the folder of the checkpoint to start from"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: the GPU if torch sees one, else the CPU), cpu, cuda, cuda:N",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = TrainBasePaths(
        data=args.data, out=args.out, metrics=args.metrics, plot=args.plot, init=args.init, phase=args.phase
    )
    from .tracking import stage_run

    with stage_run(PHASES[paths.phase].run_name, params, params_path=Path(args.params)) as tracker:
        metrics = run(params, paths, tracker=tracker, device=args.device)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(paths.metrics, artifact_path="metrics")
    return metrics


if __name__ == "__main__":
    main()
