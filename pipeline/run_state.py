"""Where an interrupted stage keeps its resume state, and how a rerun finds it.

DVC deletes a stage's outs before running it, so resume state cannot live in the outs. It lives
under ``<repo>/.stage_state/<stage>/<fingerprint>/`` (gitignored), where the fingerprint hashes
everything that determines the result: the stage's resolved params, the content hashes of its
inputs and the source code of the package. A rerun with the same inputs resumes; any change
starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["code_fingerprint", "repo_root", "run_fingerprint", "state_dir"]

_PACKAGES = ("stable_sam", "pipeline")


def repo_root() -> Path:
    """``DVC_ROOT`` when DVC runs the stage (queued experiments run in a temp copy), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def code_fingerprint() -> str:
    """sha256 over the package sources (a code change must not resume an old run)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        for path in sorted((here / package).rglob("*.py")):
            digest.update(str(path.relative_to(here)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts plus the code fingerprint."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(code_fingerprint().encode())
    return digest.hexdigest()[:16]


def state_dir(stage: str, fingerprint: str) -> Path:
    return repo_root() / ".stage_state" / stage / fingerprint
