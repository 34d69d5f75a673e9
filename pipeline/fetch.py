"""Stage ``fetch``: put the raw data in place and describe it in ``<out>/manifest.json``.

``python -m pipeline.fetch --out data/raw [--params params.yaml] [--set fetch.source=remote]``

``fetch.source`` decides where the data comes from:

- ``embedded`` (the offline default): generate the embedded dataset into
  ``<out>/embedded/{train,val}`` (sizes and seed from the ``embedded`` section).
- ``remote``: download the items of ``fetch.items`` (names or groups of
  ``pipeline/manifest.json``) into the downloads folder (``--downloads``, default
  ``<out>/downloads``), resuming partial files, verifying size and sha256, and extract
  archives safely into ``<downloads>/extracted/<extract_to>``. Checkpoints and extracted data
  stay in the downloads folder (the manifest records their paths and verified sha256s). A file already at its download path is
  verified, not downloaded. An unreachable URL fails the stage with what could not be reached
  and the exact paths to place the files at by hand.

  ``dvc repro`` deletes a stage's outputs before running it, so a downloads folder *outside*
  the output (``--downloads data/downloads``, git-ignored, not a DVC output) keeps partial
  downloads, hand-placed files, the multi-GB checkpoints and the extracted datasets across
  reruns, out of the DVC cache: a rerun of fetch verifies them and downloads nothing.
- ``local``: nothing is downloaded. ``fetch.local_root`` is laid out like the raw folder:
  checkpoints as ``<local_root>/<filename>`` (sha256-verified), datasets as the extracted
  folders ``<local_root>/<extract_to>`` (e.g. ``hqseg44k/DIS5K/DIS-TR/im``; their layout is
  checked). The manifest points at these files where they are.

``embedded`` may also be listed in ``fetch.items`` to generate it next to remote/local data.
Fetched datasets are validated once (``fetch.validate``); bad files (unreadable, undecodable,
over Pillow's decompression-bomb limit, mismatched, empty) and stray files (an image without a
mask or a mask without an image) are recorded in the manifest with their reasons and counted,
and later stages skip them without decoding them again. Only a set with no usable pair left
fails the stage (naming it and its folders).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from pipeline.params import Params, load_params
from pipeline.raw_data import (
    FileItem,
    FileManifest,
    RawDataError,
    load_file_manifest,
    portable_path,
    write_raw_manifest,
)
from pipeline.sources import generate_split
from pipeline.sources.items import FetchError, extract_root, fetch_local, fetch_remote
from pipeline.stage_cli import stage_argument_parser
from stable_sam import data as data_lib

__all__ = ["FetchError", "FetchPaths", "main", "run"]


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchPaths:
    """Paths of the fetch stage (from dvc.yaml).

    Attributes:
      out: the raw-data folder (the DVC output); gets ``manifest.json``.
      downloads: where downloads and resumable ``.part`` files go; None: ``<out>/downloads``.
    """

    out: Path
    downloads: Path | None = None


def _fetch_embedded(params: Params, out: Path, record: dict[str, Any]) -> dict[str, float]:
    cfg = params.embedded
    root = out / "embedded"
    metrics: dict[str, float] = {}
    splits = {}
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        summary = generate_split(
            root / split,
            num_images=count,
            image_size=cfg.image_size,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
            generator_seed=cfg.seed,
            split=split,
        )
        try:
            folder = data_lib.open_dataset("embedded", split=split, root=root, validate=params.fetch.validate)
        except data_lib.DatasetError as err:
            raise FetchError(
                f"the generated embedded {split} split in {root / split} is unusable: {err}"
            ) from err
        splits[split] = {
            **summary.to_dict(),  # no wall-clock values: data/raw stays byte-identical across reruns
            **_set_counts(folder),
            "out_dir": portable_path(root / split, out),
        }
        _record_skipped(record, "embedded", folder, out)
        metrics[f"embedded_{split}_images"] = len(folder)
        metrics[f"embedded_{split}_instances"] = summary.num_instances
        metrics[f"embedded_{split}_seconds"] = round(summary.seconds, 3)
        metrics[f"embedded_{split}_mb"] = round(summary.bytes / 1e6, 3)
    record["datasets"]["embedded"] = {"root": "embedded", "items": ["embedded"], "splits": splits}
    record["seeds"]["embedded"] = cfg.seed
    return metrics


def _set_counts(folder: data_lib.SegmentationFolder) -> dict[str, int]:
    """A set's counts for the manifest: usable pairs, files left out, and the strays among them."""
    return {"valid_pairs": len(folder), "skipped": folder.num_skipped, "unmatched": len(folder.unmatched)}


def _record_skipped(
    record: dict[str, Any], family: str, folder: data_lib.SegmentationFolder, out: Path
) -> None:
    """Add a set's left-out files (bad and stray) to the manifest's skip list of its family.

    (The dataset has logged each of them, and its counts.)
    """
    record["skipped"].setdefault(family, []).extend(
        {"path": portable_path(Path(s.path), out), "reason": s.reason} for s in folder.skipped
    )
    record["unmatched_files"] += len(folder.unmatched)


def _describe_datasets(
    manifest: FileManifest,
    items: Sequence[FileItem],
    base: Path,
    out: Path,
    params: Params,
    record: dict[str, Any],
) -> dict[str, float]:
    """Record each fetched dataset family's root, and validate its named sets."""
    metrics: dict[str, float] = {}
    unusable: list[str] = []
    families = sorted({i.dataset for i in items if i.kind == "archive"})
    for family in families:
        root = base / manifest.dataset_roots.get(family, family)
        entry: dict[str, Any] = {
            # Extracted downloads: relative to the raw folder when beside it; a user's own: absolute.
            "root": portable_path(root, out) if params.fetch.source == "remote" else str(root.resolve()),
            "items": [i.name for i in items if i.dataset == family],
        }
        if family == "coco_val2017":
            images_dir, annotations = data_lib.coco_paths(root)
            if annotations.is_file() and images_dir.is_dir():
                try:
                    coco = data_lib.CocoInstances(images_dir, annotations)
                except data_lib.DatasetError as err:
                    unusable.append(f"  - coco_val2017: {err}")
                else:
                    entry["sets"] = {
                        "coco_val2017": {"images": len(coco), "annotations": len(coco.coco.anns)}
                    }
                    metrics["coco_val2017_images"] = len(coco)
        else:
            entry["sets"] = {}
            for name, spec in data_lib.DATASETS.items():
                if spec.family != family or len(next(iter(spec.splits.values()), ())) != 1:
                    continue  # only single-folder sets: the mix is the sum of its components
                split = next(iter(spec.splits))
                if not all((root / f.im_dir).is_dir() for f in spec.splits[split]):
                    continue
                try:
                    folder = data_lib.open_dataset(
                        name, split=split, root=root, validate=params.fetch.validate
                    )
                except data_lib.DatasetError as err:
                    unusable.append(f"  - {name}: {err}")
                    continue
                entry["sets"][name] = {"split": split, **_set_counts(folder)}
                _record_skipped(record, family, folder, out)
                metrics[f"{name}_pairs"] = len(folder)
        record["datasets"][family] = entry
    if unusable:
        # Single bad or stray files are skipped and recorded; a set with nothing left is a broken
        # download or layout, and every later stage would fail on it.
        raise FetchError("unusable dataset(s), nothing valid is left:\n" + "\n".join(unusable))
    return metrics


def run(
    params: Params,
    paths: FetchPaths,
    *,
    file_manifest: FileManifest | None = None,
    session: requests.Session | None = None,
) -> dict[str, float]:
    """Fetch what ``params.fetch`` asks for into ``paths.out`` and write its manifest.

    Args:
      params: the full params (sections ``fetch`` and ``embedded``).
      paths: the output folder.
      file_manifest: the file manifest (default ``pipeline/manifest.json``; tests pass their
        own, pointing at a local server).
      session: an HTTP session to reuse.

    Returns:
      Flat numeric metrics (counts, seconds, MB).

    Raises:
      FetchError: something could not be fetched or verified (all failures are listed, each
        with how to place the file by hand).
    """
    start = time.perf_counter()
    cfg = params.fetch
    out = Path(paths.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "source": cfg.source,
        "datasets": {},
        "checkpoints": {},
        "items": {},
        "skipped": {},
        "seeds": {},
        "downloaded_bytes": 0,  # for the metrics; removed before writing
        "unmatched_files": 0,  # moved to "counts" before writing
        "params": {"fetch": dataclasses.asdict(cfg), "embedded": dataclasses.asdict(params.embedded)},
    }
    names = list(cfg.items)
    want_embedded = cfg.source == "embedded" or "embedded" in names
    names = [n for n in names if n != "embedded"]
    if cfg.source == "embedded" and names:
        logger.warning(
            "fetch.source=embedded: ignoring fetch.items %s (set fetch.source=remote or local)", names
        )
        names = []
    manifest = file_manifest or load_file_manifest()
    try:
        items = manifest.expand(names)
    except RawDataError as err:
        raise FetchError(str(err)) from err

    metrics: dict[str, float] = {}
    if want_embedded:
        metrics.update(_fetch_embedded(params, out, record))

    download_dir = Path(paths.downloads) if paths.downloads is not None else out / "downloads"
    record["downloads"] = portable_path(download_dir, out)
    if items and cfg.source == "remote":
        fetch_remote(items, params, out, download_dir, session, record)
        metrics.update(_describe_datasets(manifest, items, extract_root(download_dir), out, params, record))
    elif items and cfg.source == "local":
        local_root = fetch_local(items, params, out, download_dir, record)
        metrics.update(_describe_datasets(manifest, items, local_root, out, params, record))
    elif not want_embedded:
        raise FetchError(
            f"fetch.source={cfg.source} with no fetch.items: nothing to fetch. Name items or groups "
            f"({sorted(manifest.groups)}) or use fetch.source=embedded"
        )

    downloaded = record.pop("downloaded_bytes")
    record["counts"] = {
        "checkpoints": len(record["checkpoints"]),
        "datasets": len(record["datasets"]),
        "skipped_files": sum(len(v) for v in record["skipped"].values()),
        "unmatched_files": record.pop("unmatched_files"),
    }
    write_raw_manifest(out, record)
    metrics.update(
        {
            "fetch_seconds": round(time.perf_counter() - start, 3),
            "skipped_files": record["counts"]["skipped_files"],
            "unmatched_files": record["counts"]["unmatched_files"],
            "checkpoints": record["counts"]["checkpoints"],
            "downloaded_mb": round(downloaded / 1e6, 3),
        }
    )
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_argument_parser("Fetch or generate the raw data (stage 'fetch').")
    parser.add_argument("--out", type=Path, required=True, help="raw-data folder, e.g. data/raw")
    parser.add_argument(
        "--downloads",
        type=Path,
        default=None,
        help="downloads folder (default: <out>/downloads), e.g. data/downloads",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    from pipeline.tracking import stage_run  # MLflow only when the stage really runs

    with stage_run("fetch", params, params_path=Path(args.params)) as tracker:
        try:
            metrics = run(params, FetchPaths(out=args.out, downloads=args.downloads))
        except FetchError as err:
            logger.error("%s", err)
            raise SystemExit(1) from err
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / "manifest.json")
        if (args.out / "embedded").is_dir():
            tracker.log_dataset(args.out / "embedded" / "train", context="training")
            tracker.log_dataset(args.out / "embedded" / "val", context="evaluation")


if __name__ == "__main__":
    main()
