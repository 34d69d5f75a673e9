"""Where an interrupted stage keeps its resume state, and how a rerun finds it.

DVC deletes a stage's outs before running it, so resume state cannot live in the outs. It lives
under ``<repo>/.stage_state/<stage>/<fingerprint>/`` (gitignored), or in Ray's storage under a run
named by the fingerprint, which hashes everything that determines the result: the stage's
resolved params, the content hashes of its inputs and the source code that computes it (the
training code, not every file of the repo: an edit to the evaluation code must not make an
interrupted training start over). A rerun with the same inputs resumes; any change starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TRAINING_CODE", "code_fingerprint", "repo_root", "run_fingerprint", "state_dir"]

_ROOT = Path(__file__).resolve().parent.parent
# The code a training result depends on (modules, or packages = every .py below them).
TRAINING_CODE = (
    "stable_sam/modeling",
    "stable_sam/build.py",
    "stable_sam/checkpoint.py",
    "stable_sam/config.py",
    "stable_sam/data.py",
    "stable_sam/losses.py",
    "stable_sam/prompts.py",
    "stable_sam/training.py",
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
