"""Stage ``train``: Stable-SAM fine-tuning on Ray Train (the robust training strategy).

The same entry point runs under ``dvc repro`` (a local Ray instance, CPU workers with gloo by
default) and under ``ray job submit`` on a cluster (``RAY_ADDRESS`` is set there, so Ray connects
to it). Each worker builds Stable-SAM on the frozen SAM named by ``models/base/sam.json``, wraps
the module in DDP with every frozen tensor excluded (so only the plug-in's gradients are
all-reduced), draws its shard of every global batch (:class:`ShardedBatchSampler`), and trains
with the mixed prompts, LSJ, the occlusion-synthesised data, BCE + dice and Adam.

Every ``train.checkpoint_every`` steps rank 0 reports a checkpoint (plug-in weights, optimiser,
step, loss history) to Ray. Ray restarts failed workers from it (``ray.max_failures``), and a
killed or restarted job resumes from it too: the Ray run is named after a fingerprint of
everything that determines the result, in a persistent storage folder, so a rerun with the same
inputs finds the run's checkpoints. Since all randomness is a function of (seed, step), a resumed
run reproduces the uninterrupted run's weights exactly (same number of workers).

    python -m pipeline.train --base models/base --occluded data/occluded \\
        --out models/stable_sam --metrics metrics/train.json --plot plots/train.csv
"""

from __future__ import annotations

import csv
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stable_sam.build import SamWeights, build_stable_sam
from stable_sam.checkpoint import save_plugin_checkpoint
from stable_sam.config import config_from_dict, config_to_dict
from stable_sam.data import SegmentationFolder, open_dataset
from stable_sam.modeling import StableSam
from stable_sam.training import (
    AugmentedPromptDataset,
    LoopConfig,
    ShardedBatchSampler,
    TrainingBatch,
    collate_training,
    robust_prompt_sampler,
    supervised_step,
    train_loop,
)

from .cluster_checks import check_every_node, storage_location
from .params import Params, load_params
from .ray_runtime import check_resources, init_ray, is_loopback_ray
from .run_state import (
    STATE_FILE,
    TRAINING_CODE,
    restore_training_state,
    run_fingerprint,
    set_aside_unusable_ray_run,
)
from .sam_source import SamSource, read_sam_source, write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = [
    "TrainPaths",
    "main",
    "restore_training_state",
    "run",
    "set_aside_unusable_ray_run",
    "train_loop_per_worker",
    "worker_model",
]

logger = logging.getLogger("pipeline.train")


@dataclass(frozen=True)
class TrainPaths:
    base: Path  # models/base (sam.json)
    occluded: Path  # data/occluded: the training set (synthesize stage)
    out: Path  # models/stable_sam
    metrics: Path  # metrics/train.json
    plot: Path  # plots/train.csv


def worker_model(
    params: Params, weights: SamWeights | str | Path, sam_type: str, device: torch.device | str = "cpu"
) -> StableSam:
    """The model a worker trains, on ``device``: the base SAM (``weights``: read once by the driver,
    or a file), frozen, with the plug-ins (and tuning) of ``params``.

    The frozen encoder runs as ``sam.encoder_precision`` says (its fast path, or fp32; "auto" is
    decided for ``device``, the worker's own, so a GPU worker is not judged by the driver's CPU).
    """
    return build_stable_sam(
        sam_type=sam_type,
        sam_checkpoint=weights,
        plugin_config=params.plugin,
        tuning=params.tuning,
        device=device,
        encoder_precision=params.sam.encoder_precision,
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (it gets the weights and the pair list from Ray's object store)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from torch.nn.parallel import DistributedDataParallel

    params: Params = config_from_dict(Params, config["params"], where="train_loop_config")
    cfg = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    source = SamSource(**config["sam"])
    # Read and hashed once by the driver, shipped through Ray's object store: no worker re-reads
    # the checkpoint or the dataset's file headers, and none needs the driver's paths for them.
    weights: SamWeights = ray.get(config["sam_weights"])
    pairs, dataset_name = ray.get(config["dataset"])

    # Module initialisers (the DRP's first layer) draw from the global RNG: seed it.
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = worker_model(params, weights, source.sam_type, device)
    model.train()
    # Only the trainable tensors take part in DDP: the frozen SAM is neither broadcast nor reduced.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [
        n for n, _ in model.named_buffers()
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_step, history = restore_training_state(
                Path(directory), model, optimizer, run_dir=config["ray_run_dir"]
            )
        if rank == 0:
            logger.info("resuming from the checkpoint of step %d", start_step)

    dataset = AugmentedPromptDataset(
        SegmentationFolder(pairs, name=dataset_name, validate="none"),  # validated by the driver
        image_size=model.img_size,
        prompt_sampler=robust_prompt_sampler(cfg.prompts, mask_input_size=model.mask_input_size),
        seed=cfg.seed,
        lsj=cfg.lsj,
        lsj_scale=(params.data.lsj_min_scale, params.data.lsj_max_scale),
        hflip_probability=params.data.hflip_probability,
    )
    sampler = ShardedBatchSampler(
        dataset_size=len(dataset),
        local_batch=config["local_batch"],
        num_replicas=world,
        rank=rank,
        seed=cfg.seed,
        total_steps=config["total_steps"],
        start_step=start_step,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_training, num_workers=cfg.loader_workers
    )
    total = config["total_steps"]

    def step_fn(batch: TrainingBatch, step: int) -> dict[str, torch.Tensor]:
        out = supervised_step(
            wrapped,
            model,
            batch.to(device),
            seed=cfg.seed,
            step=step,
            rank=rank,
            num_points=cfg.num_points_loss,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
            encoder_batch_size=cfg.encoder_batch_size,
        )
        nan = torch.tensor(float("nan"), device=device)
        return {**out.losses, "alpha1": out.routing[:, 0].mean() if out.routing is not None else nan}

    def row_fn(terms: dict[str, torch.Tensor]) -> dict[str, float]:
        # Global means for the log (the gradients were already averaged by DDP).
        logged = torch.stack([terms["bce"], terms["dice"], terms["total"], terms["alpha1"]])
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        bce, dice, loss, alpha1 = (float(v) for v in logged)
        return {"loss": loss, "bce": bce, "dice": dice, "alpha1": alpha1}

    def save(step: int, history: list[dict[str, Any]]) -> None:
        # Every worker reports (Ray Train requires it); rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                state = {
                    "trainable": model.trainable_state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "history": history,
                    # All randomness derives from (seed, step): the step is the RNG state.
                    "rng": {
                        "seed": cfg.seed,
                        "derivation": "numpy default_rng([seed, epoch, index]) per sample",
                    },
                }
                torch.save(state, Path(directory) / STATE_FILE)
                report_checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(dict(history[-1]), checkpoint=report_checkpoint)

    loop = LoopConfig(
        total_steps=total,
        start_step=start_step,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_last=True,
        log_every=cfg.log_every,
        images_per_step=config["local_batch"] * world,
        verbose=rank == 0,
    )
    train_loop(
        loader,
        step_fn=step_fn,
        optimizer=optimizer,
        config=loop,
        history=history,
        save=save,
        row_fn=row_fn,
        step_hook=config.get("step_hook"),
    )


def _folder_digest(path: Path) -> str:
    """A cheap content identity for the run fingerprint: the dataset's own manifest, else file stats."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        return manifest.read_text()
    return str(sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()))


def run(
    params: Params, paths: TrainPaths, *, tracker: Any = None, step_hook: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the plug-in with Ray Train; write the plug-in checkpoint, metrics and the curve.

    ``step_hook`` (picklable) is called on every worker before each step: tests inject a worker
    crash through it; it could as well profile.
    """
    source = read_sam_source(paths.base)
    # The training set as the synthesize stage wrote it (occluded, or unchanged with
    # train.use_occlusion false), opened once, here: the workers get its pair list.
    data_dir = paths.occluded
    training_set = open_dataset(str(data_dir.resolve()), split="train")
    cfg, scaling = params.train, params.ray
    if cfg.batch_size % scaling.num_workers:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} must be divisible by ray.num_workers={scaling.num_workers}"
        )
    local_batch = cfg.batch_size // scaling.num_workers
    size = len(training_set)
    steps_per_epoch = size // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {size} images, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    fingerprint = run_fingerprint(
        "train",
        config_to_dict(params.plugin),
        config_to_dict(params.tuning),
        config_to_dict(cfg),
        # What training reads of `data` (not the evaluation sets: adding one must not retrain).
        {
            k: getattr(params.data, k)
            for k in ("train", "lsj_min_scale", "lsj_max_scale", "hflip_probability")
        },
        scaling.num_workers,
        source.sha256,
        params.sam.encoder_precision,  # bf16 embeddings train other weights than fp32 ones
        _folder_digest(data_dir),
        code=(*TRAINING_CODE, "pipeline/train.py"),
    )
    storage = storage_location(scaling.storage_path)
    run_name = f"stable-sam-train-{fingerprint}"
    run_dir = f"{str(storage).rstrip('/')}/{run_name}"
    logger.info(
        "training %s on %s (%d images, %d steps of %d = %d workers x %d), Ray run %s in %s",
        source.sam_type, data_dir, size, total_steps, cfg.batch_size, scaling.num_workers, local_batch, run_name, storage,
    )  # fmt: skip

    # Before the first `import ray`: a private Ray must be told to stay on loopback (ray_runtime).
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        init_ray(scaling.address, log_to_driver=True)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_resources(
        num_workers=scaling.num_workers, cpus_per_worker=scaling.cpus_per_worker, use_gpu=scaling.use_gpu
    )
    check_every_node(
        storage=storage,
        files=[str(p) for pair in training_set.pairs for p in (pair.image_path, pair.mask_path)],
        use_gpu=scaling.use_gpu,
    )
    weights = SamWeights.read(source.checkpoint)
    if weights.sha256 != source.sha256:
        raise RuntimeError(
            f"{source.checkpoint} changed since the base stage hashed it ({source.sha256}, now "
            f"{weights.sha256}): rerun the base stage"
        )
    import ray

    shipped = {
        "sam_weights": ray.put(weights),
        "dataset": ray.put((training_set.pairs, training_set.name)),
    }
    if isinstance(storage, Path):  # a URI's run folder cannot be moved aside: the workers name it
        set_aside_unusable_ray_run(storage / run_name)
    # A single-machine Ray (ours, or the tests'): torch's rendezvous store and gloo on loopback too.
    torch_config = None
    if is_loopback_ray() and not scaling.use_gpu:
        from .ray_loopback import LoopbackTorchConfig

        torch_config = LoopbackTorchConfig()
    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=torch_config,
        train_loop_config={
            "params": config_to_dict(params),
            "sam": asdict(source),
            **shipped,
            "local_batch": local_batch,
            "total_steps": total_steps,
            "threads": max(1, int(scaling.cpus_per_worker)),
            "ray_run_dir": run_dir,
            "step_hook": step_hook,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    elapsed = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"Ray run {run_name} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    history = state["history"]

    del shipped  # the object store may drop the weights now
    model = worker_model(params, weights, source.sam_type)
    model.load_trainable_state_dict(state["trainable"], source=f"Ray run {run_name}")
    plugin_path = paths.out / "plugin.pt"
    save_plugin_checkpoint(
        model,
        plugin_path,
        extra={
            "steps": int(state["step"]),
            "dataset": str(data_dir),
            "ray_run": run_name,
            "workers": scaling.num_workers,
            "batch_size": cfg.batch_size,
        },
    )
    tail = history[-min(len(history), 20) :]
    metrics = {
        "steps": int(state["step"]),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "final_alpha1": sum(r["alpha1"] for r in tail) / len(tail),
        "trainable_parameters": model.num_trainable_parameters(),
        "fit_seconds": round(elapsed, 1),
        "images_per_s": round(history[-1]["images_per_s"], 2),
        "workers": scaling.num_workers,
    }
    # Wall times go to MLflow only: DVC's files hold what a rerun reproduces (git stays clean).
    write_json_atomic(
        paths.metrics, {k: v for k, v in metrics.items() if k not in ("fit_seconds", "images_per_s")}
    )
    _write_curve(paths.plot, history)
    if tracker is not None:
        tracker.log_metrics_series(history, step_key="step")
        tracker.log_dataset(data_dir, context="training")
        tracker.set_tags({"ray.run_name": run_name, "ray.storage_path": str(storage)})
    return metrics


def _write_curve(path: Path, history: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        fields = ["step", "loss", "bce", "dice", "alpha1"]  # (throughput: MLflow's curve)
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser(__doc__.split("\n")[0])
    for name, help_text in [
        ("--base", "base model folder (base stage output)"),
        (
            "--occluded",
            "the training set (synthesize output: occluded, or unchanged with train.use_occlusion=false)",
        ),
        ("--out", "where plugin.pt goes"),
        ("--metrics", "metrics JSON"),
        ("--plot", "training curve CSV"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = TrainPaths(args.base, args.occluded, args.out, args.metrics, args.plot)
    from .tracking import stage_run

    with stage_run("train", params, params_path=Path(args.params)) as tracker:
        metrics = run(params, paths, tracker=tracker)
        tracker.log_metrics(metrics)
        tracker.log_artifact(paths.metrics, artifact_path="metrics")
        tracker.log_figure(paths.plot) if paths.plot.suffix == ".png" else tracker.log_artifact(
            paths.plot, "plots"
        )
        source = read_sam_source(paths.base)
        tracker.register_checkpoint(
            paths.out / "plugin.pt",
            tags={"sam_type": source.sam_type, "sam_checkpoint_sha256": source.sha256},
        )
    return metrics


if __name__ == "__main__":
    main()
