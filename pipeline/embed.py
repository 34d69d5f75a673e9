"""Stage ``embed``: the image-embedding cache every evaluation and sweep reads.

    python -m pipeline.embed --base models/base --raw data/raw --out data/embeddings \\
        --metrics metrics/embed.json

SAM's image encoder is frozen, so its output for an evaluation image never changes: this stage
runs it once per image of every evaluation set (``data.val``, brought to the model frame with
``data.eval_resize``; COCO-format sets too) and writes the embeddings in
:class:`stable_sam.embedding_cache.EmbeddingCache`'s disk format, keyed by image content,
preprocessing, SAM type and SAM checkpoint sha256. The ``evaluate`` stage and every ``ablate``
sweep point read this folder (read-only) and run the decoder only. Variants whose encoder is
tuned (LoRA, adapters) cannot use it and embed their images themselves (their evaluation says so).

This module also defines what "the evaluation sets" are (:func:`hq_sets`, :func:`coco_sets`),
so the embedding, the evaluation and the sweeps always agree on the images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_sam import data as data_lib
from stable_sam.build import OFFICIAL_SAM_TYPES, build_stable_sam
from stable_sam.config import PluginConfig
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import CocoImage, PreparedImage, embed_images, prepare_coco_image, prepare_image
from stable_sam.modeling import StableSam

from .params import Params, load_params
from .raw_data import RawManifest, read_raw_manifest
from .sam_source import SamSource, read_sam_source, write_json_atomic
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = [
    "CHUNK",
    "COCO_ONLY",
    "EmbedPaths",
    "coco_chunks",
    "coco_files",
    "coco_sets",
    "display_name",
    "hq_chunks",
    "hq_sets",
    "main",
    "run",
    "sam_model",
    "set_threads",
]

logger = logging.getLogger("pipeline.embed")

# Images prepared (and held in memory) at a time: HQ images are up to 4K, so sets are streamed.
CHUNK = 32
# Evaluation sets that only have COCO instance annotations (no HQSeg-style GT folder).
COCO_ONLY = ("coco_val2017",)
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class EmbedPaths:
    base: Path  # models/base (sam.json)
    raw: Path  # data/raw
    out: Path  # data/embeddings
    metrics: Path  # metrics/embed.json


def display_name(spec: str) -> str:
    """How a ``data.val`` entry is named in tables: the registered name, or a folder's name."""
    return spec if spec in data_lib.DATASETS else Path(spec).name


def hq_sets(params: Params, raw: RawManifest) -> list[tuple[str, data_lib.SegmentationFolder]]:
    """(name, dataset) of every ``data.val`` entry with HQSeg-style GT (one target per image)."""
    return [
        (display_name(spec), raw.open_dataset(spec, split="val"))
        for spec in params.data.val
        if spec not in COCO_ONLY
    ]


def coco_files(raw: RawManifest, spec: str) -> tuple[Path, Path] | None:
    """(images folder, instances JSON) of a ``data.val`` entry with COCO annotations, else None.

    ``coco_val2017``: ``val2017/`` + ``annotations/instances_val2017.json`` under its root; the
    embedded set: ``<root>/val/im`` + ``<root>/val/instances.json`` (all objects of each scene);
    a folder: ``im/`` + ``instances.json`` in it (or in its ``val/``).
    """
    if spec == "coco_val2017":
        return data_lib.coco_paths(raw.dataset_root(spec))
    if spec in data_lib.DATASETS:
        if data_lib.dataset_family(spec) != "embedded":
            return None
        base = raw.dataset_root(spec) / "val"
    else:
        base = Path(spec)
        if not (base / "instances.json").is_file() and (base / "val" / "instances.json").is_file():
            base = base / "val"
    images, annotations = base / "im", base / "instances.json"
    return (images, annotations) if annotations.is_file() and images.is_dir() else None


def coco_sets(params: Params, raw: RawManifest) -> list[tuple[str, data_lib.CocoInstances]]:
    """(name, COCO instances) of every ``data.val`` entry with a COCO annotation file."""
    found = []
    for spec in params.data.val:
        files = coco_files(raw, spec)
        if files is not None:
            found.append(
                (display_name(spec), data_lib.CocoInstances(*files, max_images=params.eval.coco_max_images))
            )
    return found


def hq_chunks(
    dataset: data_lib.SegmentationFolder, *, resize: str, image_size: int, chunk: int = CHUNK
) -> Iterator[list[PreparedImage]]:
    """The dataset's images in the model frame, ``chunk`` at a time (index = position in the set)."""
    for start in range(0, len(dataset), chunk):
        yield [
            prepare_image(dataset[i], index=i, resize=resize, image_size=image_size)
            for i in range(start, min(start + chunk, len(dataset)))
        ]


def coco_chunks(
    coco: data_lib.CocoInstances, *, resize: str, image_size: int, chunk: int = CHUNK
) -> Iterator[list[CocoImage]]:
    """The COCO images with their instances in the model frame, ``chunk`` at a time."""
    for start in range(0, len(coco), chunk):
        yield [
            prepare_coco_image(coco[i], index=i, resize=resize, image_size=image_size)
            for i in range(start, min(start + chunk, len(coco)))
        ]


class DeviceError(RuntimeError):
    """The requested device is not there, or an official SAM would run on the CPU by accident."""


def resolve_device(choice: str, sam_type: str) -> str:
    """``eval.device`` for a model: "auto" is the GPU if any, else the CPU for small SAMs only."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("eval.device=cuda, but torch sees no CUDA device")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if sam_type in OFFICIAL_SAM_TYPES:
        raise DeviceError(
            f"no GPU for the {sam_type} SAM: its image encoder takes minutes per image on a CPU "
            "(days for an evaluation set). Run on a GPU node, or set eval.device=cpu to use the CPU anyway"
        )
    return "cpu"


def sam_model(source: SamSource, *, plugin_checkpoint: Path | None = None, device: str = "auto") -> StableSam:
    """The model of a stage: the frozen SAM of ``source``, with the plug-in checkpoint if given.

    Without a checkpoint the model has no plug-in at all (plain SAM, for the encoder or as the
    baseline of variants that change SAM's own weights). ``device``: ``eval.device``, see
    :func:`resolve_device` (the evaluation code moves embeddings and prompts to the model's device).
    """
    model = build_stable_sam(
        sam_type=source.sam_type,
        sam_checkpoint=source.checkpoint,
        plugin_config=None if plugin_checkpoint is not None else PluginConfig(variant="none"),
        plugin_checkpoint=plugin_checkpoint,
        device=resolve_device(device, source.sam_type),
    )
    if model.sam_checkpoint_sha256 != source.sha256:
        raise RuntimeError(f"{source.checkpoint} changed since the base stage hashed it ({source.sha256})")
    return model.eval()


def set_threads(threads: int | None) -> None:
    """torch CPU threads for a decoder-bound stage (see ``eval.threads``)."""
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))


def run(params: Params, paths: EmbedPaths, *, tracker: Any = None) -> dict[str, Any]:
    """Embed every evaluation image once; write the cache folder, its index and the metrics."""
    set_threads(params.eval.threads)
    started = time.perf_counter()
    source = read_sam_source(paths.base)
    model = sam_model(source, device=params.eval.device)
    raw = read_raw_manifest(paths.raw)
    resize, size = params.data.eval_resize, model.img_size
    cache = EmbeddingCache(paths.out, max_memory_items=0)
    datasets: dict[str, dict[str, int]] = {}

    def embed(name: str, kind: str, chunks: Iterator[Sequence[PreparedImage]]) -> None:
        count = 0
        for images in chunks:
            embed_images(model, images, cache=cache, progress=False, batch_size=params.eval.embed_batch_size)
            count += len(images)
        datasets.setdefault(name, {})[kind] = count
        logger.info("%s (%s): %d images", name, kind, count)

    with torch.no_grad():
        for name, dataset in hq_sets(params, raw):
            embed(name, "images", hq_chunks(dataset, resize=resize, image_size=size))
            if tracker is not None:  # the split's folder (from its files), not the dataset's root
                files = (f for pair in dataset.pairs for f in (pair.image_path, pair.mask_path))
                tracker.log_dataset(common_folder(files), context="evaluation")
        for name, coco in coco_sets(params, raw):
            chunks = ([c.image for c in chunk] for chunk in coco_chunks(coco, resize=resize, image_size=size))
            embed(name, "coco_images", chunks)
    # Every lookup first misses, then is stored: misses = encoder passes, hits = images seen twice
    # (the embedded set's COCO view is the same images as its HQ view).
    metrics = {
        "sam_type": source.sam_type,
        "resize": resize,
        "images": sum(sum(v.values()) for v in datasets.values()),
        "encoder_passes": cache.misses,
        "reused": cache.hits,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(
        paths.out / INDEX_NAME,
        {
            "sam_type": source.sam_type,
            "sam_checkpoint_sha256": source.sha256,
            "resize": resize,
            "image_size": size,
            "datasets": datasets,
            "entries": cache.misses,
        },
    )
    write_json_atomic(paths.metrics, metrics)
    logger.info(
        "%d encoder passes for %d evaluation images in %.1f s (%s, %s)",
        metrics["encoder_passes"], metrics["images"], metrics["seconds"], source.sam_type, resize,
    )  # fmt: skip
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Image-embedding cache of the evaluation sets (stage 'embed').")
    parser.add_argument("--base", type=Path, required=True, help="base model folder (sam.json)")
    parser.add_argument("--raw", type=Path, required=True, help="raw-data folder with manifest.json")
    parser.add_argument("--out", type=Path, required=True, help="cache folder, e.g. data/embeddings")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = EmbedPaths(args.base, args.raw, args.out, args.metrics)
    from .tracking import stage_run

    with stage_run("embed", params, params_path=Path(args.params)) as tracker:
        metrics = run(params, paths, tracker=tracker)
        tracker.log_metrics(metrics)
        tracker.log_artifact(paths.out / INDEX_NAME, artifact_path="embeddings")
    return metrics


if __name__ == "__main__":
    main()
