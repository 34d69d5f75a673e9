"""The one training loop: pretraining the base SAM and fine-tuning the plug-ins both run it.

What differs between the two is passed in: the step function (SAM's multimask step or the
plug-in's supervised step), how a step's loss terms become the logged row (the plug-in's
workers average theirs with an all-reduce), and where checkpoints go (a resumable state file,
or a Ray Train report). The loop itself owns the order of operations, which a resumed run must
repeat exactly: step ``s`` runs ``step_fn(batch, s)``, backward, ``optimizer.step()``, then
``scheduler.step()``; the row of step ``s`` is logged as step ``s + 1`` (steps done).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .dataset import TrainingBatch

__all__ = ["LoopConfig", "train_loop"]

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainingBatch, int], dict[str, Tensor]]
"""(batch, step) -> loss terms; ``"total"`` is the one that is back-propagated."""


@dataclass(frozen=True)
class LoopConfig:
    """Counts of one run of :func:`train_loop` (steps are 0-based; logs count steps done).

    Attributes:
      total_steps: the run's length (a resumed run ends at the same step).
      start_step: the first step to run (the resumed state's step, else 0).
      checkpoint_every: ``save(step + 1, history)`` after every this many steps.
      checkpoint_last: also save after the last step (Ray Train: the result is the last report).
      log_every: a log line every this many steps, and after the last.
      images_per_step: images one step consumes (all workers) for the throughput column.
      progress: a tqdm bar with this description (None: no bar, e.g. on Ray workers).
      verbose: whether this process logs (rank 0 only under DDP).
    """

    total_steps: int
    start_step: int = 0
    checkpoint_every: int = 100
    checkpoint_last: bool = False
    log_every: int = 100
    images_per_step: int = 1
    progress: str | None = None
    verbose: bool = True


def _as_floats(terms: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


def train_loop(
    loader: Iterable[TrainingBatch],
    *,
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    config: LoopConfig,
    history: list[dict[str, Any]],
    save: Callable[[int, list[dict[str, Any]]], None],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    row_fn: Callable[[dict[str, Tensor]], dict[str, float]] = _as_floats,
    step_hook: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run steps ``config.start_step .. total_steps - 1`` over ``loader``; returns the history.

    Args:
      loader: yields one batch per step (a sampler that starts at ``start_step``).
      step_fn: the forward pass and loss of one step.
      optimizer: steps after every backward.
      config: counts (see :class:`LoopConfig`).
      history: the rows of the steps before ``start_step`` (a resumed run's); appended to.
      save: writes a checkpoint of the state after ``step`` steps (called with the history).
      scheduler: stepped after the optimiser; its rate before the step is logged as ``lr``.
      row_fn: the logged numbers of a step's (detached) loss terms.
      step_hook: called with the step before it runs (tests inject faults through it).

    Raises:
      RuntimeError: the loader ran out before ``total_steps``.
    """
    total = config.total_steps
    bar = None
    if config.progress is not None:
        bar = tqdm(
            total=total, initial=config.start_step, desc=config.progress, unit="step", mininterval=10.0
        )
    started, seen, step = time.perf_counter(), 0, config.start_step - 1
    for step, batch in enumerate(loader, start=config.start_step):
        if step_hook is not None:
            step_hook(step)
        lr = scheduler.get_last_lr()[0] if scheduler is not None else None
        terms = step_fn(batch, step)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        seen += config.images_per_step
        row: dict[str, Any] = {"step": step + 1, **({"lr": lr} if lr is not None else {})}
        row.update(row_fn({k: v.detach() for k, v in terms.items()}))
        row["images_per_s"] = seen / (time.perf_counter() - started)
        history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("total", "loss")}, refresh=False)
        if config.verbose and ((step + 1) % config.log_every == 0 or step + 1 == total):
            shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "images_per_s"))
            logger.info("step %d/%d %s %.1f img/s", step + 1, total, shown, row["images_per_s"])
        last = step + 1 == total
        due = (step + 1) % config.checkpoint_every == 0
        if (due and not last) or (last and config.checkpoint_last):
            save(step + 1, history)
    if bar is not None:
        bar.close()
    if step + 1 < total and config.start_step < total:
        raise RuntimeError(f"training stopped at step {step + 1} of {total}: the loader ran out")
    return history
