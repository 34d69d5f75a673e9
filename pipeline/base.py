"""Stage ``base``: verify the SAM checkpoint the plug-ins attach to and name it in ``models/base``.

Nothing is trained here: like an official SAM checkpoint, the project's small base is released
(pretrained by ``base/dvc.yaml``, committed in ``base/release/``, its sha256 pinned in params).

- ``sam.checkpoint`` set: that file, loaded strictly into the ``sam.type`` architecture; with
  ``sam.sha256`` pinned (the released base's), a file with another hash is refused.
- ``sam.type`` official (vit_b/l/h) without a checkpoint: the one the fetch stage verified.

    python -m pipeline.base --raw data/raw --out models/base
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stable_sam.build import OFFICIAL_SAM_TYPES, build_sam

from .params import Params, load_params
from .raw_data import read_raw_manifest
from .run_state import repo_root
from .sam_source import SamSource, write_sam_source
from .stage_cli import stage_argument_parser

__all__ = ["BaseCheckpointError", "BasePaths", "main", "resolve_base", "run"]

logger = logging.getLogger("pipeline.base")


class BaseCheckpointError(ValueError):
    """The configured base checkpoint is missing or is not the pinned file."""


@dataclass(frozen=True)
class BasePaths:
    raw: Path  # data/raw (the fetched official checkpoints, if any)
    out: Path  # models/base: sam.json


def resolve_base(params: Params, raw: Path) -> SamSource:
    """The checkpoint to use, verified: pinned hash, strict load into ``sam.type``."""
    sam = params.sam
    if sam.checkpoint:
        path = Path(sam.checkpoint).expanduser()
        path = (path if path.is_absolute() else repo_root() / path).resolve()
        if not path.is_file():
            raise BaseCheckpointError(f"sam.checkpoint: {path} does not exist")
        # Strict load (a checkpoint of another type is refused, naming both); it hashes the file
        # once, for the pin check too (an official checkpoint is 1.2-2.4 GB).
        _, sha = build_sam(sam.type, path)
        if sam.sha256 and sha != sam.sha256.lower():
            raise BaseCheckpointError(
                f"sam.checkpoint {path} has sha256 {sha}, but sam.sha256 pins {sam.sha256}: "
                "not the released file (re-checkout it, or pin the new file's hash on purpose)"
            )
        return SamSource(sam.type, str(path), sha, "released" if sam.sha256 else "user")
    if sam.type not in OFFICIAL_SAM_TYPES:
        raise BaseCheckpointError(
            f"sam.type={sam.type!r} needs sam.checkpoint: small SAMs are pretrained by base/dvc.yaml "
            "and released in base/release/ (see README, 'The released base')"
        )
    path, sha = read_raw_manifest(raw).require_checkpoint(sam.type)
    return SamSource(sam.type, str(Path(path).resolve()), sha, "official")


def run(params: Params, paths: BasePaths) -> SamSource:
    source = resolve_base(params, paths.raw)
    paths.out.mkdir(parents=True, exist_ok=True)
    write_sam_source(paths.out, source, root=repo_root())
    logger.info(
        "using the %s SAM checkpoint %s (sha256 %s, %s)",
        source.sam_type,
        source.checkpoint,
        source.sha256,
        source.origin,
    )
    return source


def main(argv: Sequence[str] | None = None) -> SamSource:
    parser = stage_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="raw data folder (fetch stage output)")
    parser.add_argument("--out", type=Path, required=True, help="base model folder (sam.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    from .tracking import stage_run

    with stage_run("base", params, params_path=Path(args.params)) as tracker:
        source = run(params, BasePaths(raw=args.raw, out=args.out))
        tracker.set_tags(
            {"sam.type": source.sam_type, "sam.origin": source.origin, "sam.sha256": source.sha256}
        )
    return source


if __name__ == "__main__":
    main()
