"""Which SAM checkpoint the pipeline runs on: the pointer written by the ``base`` stage.

``models/base/sam.json`` names the SAM type, the checkpoint file and its sha256, whether it is an
official checkpoint (fetched or given by the user) or the project's released small base
(``base/release/``, pretrained by ``base/dvc.yaml``). Every later stage resolves its SAM through it, so DVC sees one dependency
(``models/base``) whatever the source, and a changed checkpoint changes that dependency's hash.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from stable_sam.atomic_write import write_text_atomic

__all__ = ["SamSource", "json_text", "read_sam_source", "write_json_atomic", "write_sam_source"]

POINTER_NAME = "sam.json"


@dataclass(frozen=True)
class SamSource:
    """A SAM checkpoint the pipeline uses.

    Attributes:
      sam_type: "vit_b", "vit_l", "vit_h", "small" or "tiny".
      checkpoint: absolute path of the state-dict file.
      sha256: its sha256 (verified when the pointer was written).
      origin: "released" (the project's pinned base), "official" (fetched/verified) or "user"
        (sam.checkpoint without a pinned sha256).
    """

    sam_type: str
    checkpoint: str
    sha256: str
    origin: str


def json_text(content: dict) -> str:
    """The pipeline's JSON layout: indented, sorted keys, a final newline."""
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | Path, content: dict) -> None:
    """JSON to a temporary file in the same folder, then rename (mode 0o666 minus the umask)."""
    write_text_atomic(path, json_text(content))


def write_sam_source(base_dir: str | Path, source: SamSource, *, root: str | Path | None = None) -> Path:
    """Write the pointer. A checkpoint inside ``base_dir``, or inside ``root`` (the checkout: the
    released base), is stored relative to ``base_dir``, so the pointer is the same in every clone."""
    base_dir = Path(base_dir)
    content = asdict(source)
    checkpoint = Path(source.checkpoint).resolve()
    inside = [Path(base_dir).resolve(), *([Path(root).resolve()] if root is not None else [])]
    if any(checkpoint.is_relative_to(folder) for folder in inside):
        content["checkpoint"] = os.path.relpath(checkpoint, base_dir.resolve())
    write_json_atomic(base_dir / POINTER_NAME, content)
    return base_dir / POINTER_NAME


def read_sam_source(base_dir: str | Path) -> SamSource:
    """Read ``<base_dir>/sam.json``; errors say which stage produces it."""
    pointer = Path(base_dir) / POINTER_NAME
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} not found: run the base stage first (dvc repro base)")
    content = json.loads(pointer.read_text())
    checkpoint = Path(content["checkpoint"])
    if not checkpoint.is_absolute():
        checkpoint = (Path(base_dir).resolve() / checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{pointer} names the SAM checkpoint {checkpoint}, which does not exist")
    return SamSource(
        sam_type=content["sam_type"],
        checkpoint=str(checkpoint),
        sha256=content["sha256"],
        origin=content["origin"],
    )
