"""Where an interrupted stage keeps its resume state, and how a rerun finds it.

DVC deletes a stage's outs before running it, so resume state cannot live in the outs. It lives
under ``<repo>/.stage_state/<stage>/<fingerprint>/`` (gitignored), or in Ray's storage under a run
named by the fingerprint, which hashes everything that determines the result: the stage's
resolved params, the content hashes of its inputs and the source code that computes it (the
training code, not every file of the repo: an edit to the evaluation code must not make an
interrupted training start over). A rerun with the same inputs resumes; any change starts afresh.

A state that cannot be used (a truncated file, a kill during a copy, a file of other code) must
not fail every rerun: :func:`resume_or_start` moves it aside to ``<name>.corrupt-<timestamp>``,
says so naming both paths, and the stage starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "STATE_FILE",
    "TRAINING_CODE",
    "TRAIN_STATE_KEYS",
    "ResumeStateError",
    "code_fingerprint",
    "move_aside",
    "read_state_file",
    "repo_root",
    "restore_training_state",
    "resume_or_start",
    "run_fingerprint",
    "set_aside_unusable_ray_run",
    "state_dir",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ROOT = Path(__file__).resolve().parent.parent
# The code a training result depends on (modules, or packages = every .py below them).
TRAINING_CODE = (
    "stable_sam/modeling",
    "stable_sam/build.py",
    "stable_sam/checkpoint.py",
    "stable_sam/config.py",
    "stable_sam/boxes.py",
    "stable_sam/data",
    "stable_sam/losses.py",
    "stable_sam/prompts.py",
    "stable_sam/training",
)


def repo_root() -> Path:
    """``DVC_ROOT`` when DVC runs the stage (queued experiments run in a temp copy), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def code_fingerprint(sources: Sequence[str]) -> str:
    """sha256 over the given source files/packages (relative to the repo root)."""
    digest = hashlib.sha256()
    for source in sources:
        path = _ROOT / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"fingerprinted source {source} not found under {_ROOT}")
        for file in files:
            digest.update(str(file.relative_to(_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def run_fingerprint(*parts: Any, code: Sequence[str]) -> str:
    """A short stable hash of JSON-serialisable parts plus the fingerprint of ``code``."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(code_fingerprint(code).encode())
    return digest.hexdigest()[:16]


def state_dir(stage: str, fingerprint: str) -> Path:
    return repo_root() / ".stage_state" / stage / fingerprint


class ResumeStateError(RuntimeError):
    """A resume state that cannot be loaded; the message names it and what to do."""


def read_state_file(path: Path, *, required: Sequence[str] = ()) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a resume state that must be a dict with ``required`` keys.

    Raises:
      ResumeStateError: naming the file, whatever the cause (truncated, not a torch file,
        missing keys); the original error is chained.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt files raise a variety of types
        raise ResumeStateError(f"cannot read the resume state {path} ({type(err).__name__}: {err})") from err
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ResumeStateError(f"the resume state {path} lacks {missing}: it was written by other code")
    return state


def move_aside(path: Path) -> Path:
    """Rename a file or folder to ``<name>.corrupt-<timestamp>`` beside it; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():  # never replace what an earlier move set aside
        aside, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    os.replace(path, aside)
    return aside


def resume_or_start(
    path: Path,
    build: Callable[[], T],
    restore: Callable[[T, dict[str, Any]], None],
    *,
    required: Sequence[str],
) -> tuple[T, dict[str, Any] | None]:
    """Fresh objects from ``build()``, restored from the state file ``path`` when there is one.

    Args:
      path: the state file (``.stage_state/<stage>/<fingerprint>/state.pt``).
      build: makes the objects a run starts from (model, optimiser), seeded, so that calling it
        again gives the same start.
      restore: loads a state into them (``load_state_dict``...).
      required: the keys the state must have.

    Returns:
      (objects, state), with state None when there was none or it could not be used: a state
      that does not load or that ``restore`` rejects (other shapes, other optimiser) is moved
      aside with a warning naming it, and the objects are built again (``restore`` may have
      changed them before it failed).
    """
    objects = build()
    if not path.is_file():
        return objects, None
    try:
        state = read_state_file(path, required=required)
        try:
            restore(objects, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # load_state_dict's errors
            raise ResumeStateError(
                f"the resume state {path} does not fit this run ({type(err).__name__}: {err})"
            ) from err
    except ResumeStateError as err:
        aside = move_aside(path)
        logger.warning("%s; moved it to %s and starting over", err, aside)
        return build(), None
    return objects, state


# The train stage's Ray checkpoints: what one holds, loading it, setting aside a run that cannot resume
STATE_FILE = "state.pt"
TRAIN_STATE_KEYS = ("trainable", "optimizer", "step", "history")


def restore_training_state(
    checkpoint_dir: Path, model: Any, optimizer: torch.optim.Optimizer, *, run_dir: str
) -> tuple[int, list[dict[str, float]]]:
    """Load a Ray checkpoint's state into the model and optimiser; returns (step, history).

    Raises:
      ResumeStateError: naming the checkpoint and the Ray run folder to remove when the state
        does not load or does not fit (Ray hands the same checkpoint to every restart).
    """
    state_file = checkpoint_dir / STATE_FILE
    try:
        state = read_state_file(state_file, required=TRAIN_STATE_KEYS)
        model.load_trainable_state_dict(state["trainable"], source=str(state_file))
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["history"])
    except (ResumeStateError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ResumeStateError(
            f"cannot resume from the Ray checkpoint {checkpoint_dir}: {err}. Every rerun resumes from "
            f"it: remove (or move aside) the Ray run folder {run_dir} to train from the start"
        ) from err


def set_aside_unusable_ray_run(run_dir: Path) -> Path | None:
    """Move the Ray run folder aside when Ray could not resume from it; returns where it went.

    Ray resumes a run from the latest checkpoint of its snapshot and gives that checkpoint to
    every worker restart, so an unreadable snapshot or state file would fail every rerun. Checked
    on the driver before ``fit``: the snapshot through Ray's ``Result.from_path``, the latest
    checkpoint's state file with :func:`read_state_file`. A folder without a snapshot (killed
    before its first checkpoint) holds nothing to resume and is left to Ray.
    """
    if not run_dir.exists():
        return None
    from ray.train import Result

    try:
        result = Result.from_path(run_dir)
    except RuntimeError:  # no folder or no checkpoint snapshot in it: Ray starts afresh
        return None
    except Exception as err:  # the snapshot does not parse (Ray's own error types)
        reason = f"its checkpoint snapshot cannot be read ({type(err).__name__}: {err})"
    else:
        if result.checkpoint is None:
            return None
        try:
            with result.checkpoint.as_directory() as directory:
                read_state_file(Path(directory) / STATE_FILE, required=TRAIN_STATE_KEYS)
            return None
        except ResumeStateError as err:
            reason = str(err)
    aside = move_aside(run_dir)
    logger.warning(
        "Ray run %s cannot be resumed: %s; moved it to %s and training from the start", run_dir, reason, aside
    )
    return aside
