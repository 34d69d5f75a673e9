"""Stage ``synthesize``: the occlusion-augmented training set (Stable-SAM's robust training).

``python -m pipeline.synthesize --raw data/raw --out data/occluded [--params params.yaml]``

For each training image of ``data.train`` (resolved through the raw-data manifest) and each of
``occlusion.copies`` variants, with probability ``occlusion.probability`` an object of another
random training image is pasted over the image's target object
(:func:`stable_sam.occlusion.synthesize_occlusion`); otherwise the image is kept as it is
(hard-linked, not copied). The output is a dataset folder in the HQSeg layout::

    <out>/im/NAME.jpg  <out>/gt/NAME.png  [<out>/instances/NAME.png]
    <out>/manifest.json   for every output: its source image, the occluder (image and object),
                          the placement, the visible fraction and the dropped objects; totals,
                          skipped files with reasons, the seed, the config and a dataset_id
    <out>/examples.png    a few before/after examples

Every output draws from its own generator seeded by ``(occlusion.seed, image index, copy)``, so
the folder is byte-identical for a seed, and the images can be synthesised in any order:
``synthesize.workers`` > 1 spreads them over a pool of processes (``null``: one per core), whose
folder is byte for byte the single process's (the manifest is assembled in image order). It is
built in a temporary sibling folder and renamed into place when complete. Occluded images are
re-encoded as JPEG (quality 95).

The target object of an image is its GT mask; with instance maps (the embedded dataset) the
other objects are updated too (partially occluded: visible part; fully occluded: dropped) and
the occluder becomes the topmost instance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.params import Params, load_params
from pipeline.raw_data import RAW_MANIFEST_NAME, portable_path, read_raw_manifest
from pipeline.stage_cli import stage_argument_parser
from stable_sam import data as data_lib
from stable_sam.config import OcclusionConfig

__all__ = ["SynthesisError", "SynthesizePaths", "main", "run", "worker_count"]

from .occlusion_set import (
    Merged,
    Source,
    Synthesis,
    SynthesisError,
    atomic_bytes,
    examples_figure,
    outcomes,
    output_name,
    worker_count,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesizePaths:
    """Paths of the synthesize stage (from dvc.yaml)."""

    raw: Path
    out: Path


def _sources(
    params: Params, raw_dir: Path
) -> tuple[list[Source], list[dict[str, str]], list[dict[str, Any]]]:
    """The training images of ``data.train`` (with output names), what was skipped, per-set counts."""
    raw = read_raw_manifest(raw_dir)
    sources: list[Source] = []
    skipped: list[dict[str, str]] = []
    source_info = []
    multi = len(params.data.train) > 1
    for name in params.data.train:
        folder = raw.open_dataset(name, split="train", validate="header")
        skipped.extend(
            {"path": portable_path(Path(s.path), raw_dir), "reason": s.reason, "dataset": name}
            for s in folder.skipped
        )
        source_info.append({"name": name, "split": "train", "pairs": len(folder)})
        sources.extend(Source(name, p, output_name(name, p.name, multi)) for p in folder.pairs)
    names = [s.out_name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("training images with the same output name; give the datasets distinct folder names")
    return sources, skipped, source_info


def _manifest(
    params: Params, cfg: OcclusionConfig, raw_dir: Path, merged: Merged, source_info: list[dict[str, Any]]
) -> dict[str, Any]:
    config = dataclasses.asdict(cfg)  # as applied (train.use_occlusion=false: probability 0, one copy)
    raw_digest = hashlib.sha256((raw_dir / RAW_MANIFEST_NAME).read_bytes()).hexdigest()
    identity = json.dumps(
        {"config": config, "train": list(params.data.train), "raw": raw_digest, "outputs": merged.entries},
        sort_keys=True,
    )
    return {
        "format": 1,
        # Names this exact dataset: config + sources + every output's provenance.
        "dataset_id": hashlib.sha256(identity.encode()).hexdigest()[:16],
        "seed": cfg.seed,
        "config": config,
        "train": list(params.data.train),
        "sources": source_info,
        "raw_manifest_sha256": raw_digest,
        "layout": {"im": ".jpg", "gt": ".png", "instances": ".png" if merged.job.instances else None},
        "totals": {
            "source_images": len(merged.job.sources),
            "outputs": len(merged.entries),
            **merged.totals,
            "skipped": len(merged.skipped),
            "mean_visible_fraction": round(float(np.mean(merged.visible)), 5) if merged.visible else None,
        },
        "skipped": merged.skipped,
        "outputs": merged.entries,
    }


def run(params: Params, paths: SynthesizePaths) -> dict[str, float]:
    """Build the occlusion-augmented training set into ``paths.out`` (written aside, then renamed).

    With ``synthesize.workers`` > 1 the images are synthesised by a pool of processes; the folder
    is byte for byte the one a single process writes (every output has its own generator and
    files, and the manifest is assembled in image order).

    Args:
      params: the full params (sections ``data`` for the training set names, ``occlusion``,
        ``train.use_occlusion`` (false: every image once, unchanged) and ``synthesize`` for the
        number of processes).
      paths: the raw-data folder (with its manifest) and the output folder.

    Returns:
      Flat numeric metrics: counts, mean visible fraction, workers, seconds, MB.

    Raises:
      SynthesisError: an image failed (in whichever process), named in the message.
    """
    start = time.perf_counter()
    cfg = params.occlusion
    if not params.train.use_occlusion:
        # The training set without occlusion (the no_occlusion variant): every image once, as it
        # is. The train stage reads only this folder, so it need not depend on all of data/raw
        # (adding an evaluation set to the fetch must not retrain).
        cfg = dataclasses.replace(cfg, probability=0.0, copies=1)
    workers = worker_count(params.synthesize.workers)
    sources, skipped, source_info = _sources(params, paths.raw)
    with_instances = all(s.pair.instances_path is not None for s in sources)

    out = Path(paths.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if work.exists():  # left by a killed run
        shutil.rmtree(work)
    work.mkdir()  # (not mkdtemp: its 0700 mode would end up on the dataset folder)
    for sub in ("im", "gt", *(("instances",) if with_instances else ())):
        (work / sub).mkdir()
    job = Synthesis(sources, cfg=cfg, raw=paths.raw, work=work, instances=with_instances)
    merged = Merged(job, skipped)
    try:
        drawn = outcomes(job, workers)
        for outcome in tqdm(drawn, total=len(sources), desc="occlusion", unit="img", mininterval=10):
            merged.add(outcome)
        if not merged.entries:
            raise data_lib.DatasetError(f"no usable training image in {params.data.train}")
        manifest = _manifest(params, cfg, paths.raw, merged, source_info)
        atomic_bytes(work / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        examples_figure(work / "examples.png", merged.examples())
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    seconds = time.perf_counter() - start
    totals = merged.totals
    logger.info(
        "occlusion: %d outputs (%d occluded) from %d images, %d worker(s), %.1f s, %.2f MB in %s",
        len(merged.entries), totals["occluded"], len(sources), max(1, workers), seconds, size / 1e6, out,
    )  # fmt: skip
    return {
        "source_images": float(len(sources)),
        "outputs": float(len(merged.entries)),
        "occluded": float(totals["occluded"]),
        "unchanged": float(totals["unchanged"]),
        "placement_failed": float(totals["placement_failed"]),
        "dropped_objects": float(totals["dropped_objects"]),
        "skipped": float(len(merged.skipped)),
        "mean_visible_fraction": float(np.mean(merged.visible)) if merged.visible else 0.0,
        "workers": float(max(1, workers)),
        "seconds": round(seconds, 3),
        "mb": round(size / 1e6, 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_argument_parser("Occlusion synthesis of the training set (stage 'synthesize').")
    parser.add_argument("--raw", type=Path, required=True, help="raw-data folder with manifest.json")
    parser.add_argument("--out", type=Path, required=True, help="output dataset folder, e.g. data/occluded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    from pipeline.tracking import stage_run  # MLflow only when the stage really runs

    with stage_run("synthesize", params, params_path=Path(args.params)) as tracker:
        metrics = run(params, SynthesizePaths(raw=args.raw, out=args.out))
        tracker.log_metrics(metrics)
        tracker.log_dataset(args.out, context="training")
        tracker.log_artifact(args.out / "manifest.json")
        tracker.log_artifact(args.out / "examples.png")


if __name__ == "__main__":
    main()
