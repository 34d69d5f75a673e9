"""Stage ``embed``: the image-embedding cache every evaluation and sweep reads.

    python -m pipeline.embed --base models/base --raw data/raw --out data/embeddings \\
        --metrics reports/embed.json

SAM's image encoder is frozen, so its output for an evaluation image never changes: this stage
runs it once per image of every evaluation set (``data.val``, brought to the model frame with
the set's resize, see ``data.eval_resize``; COCO-format sets too) and writes the embeddings in
:class:`stable_sam.embedding_cache.EmbeddingCache`'s disk format, keyed by image content,
preprocessing, SAM type, SAM checkpoint sha256 and ``sam.encoder_precision`` (the encoder's fast
path, when on: its keys never match fp32 ones). The ``evaluate`` stage and every ``ablate``
sweep point read this folder (read-only) and run the decoder only. Variants whose encoder is
tuned (LoRA, adapters) cannot use it and embed their images themselves (their evaluation says so).

What "the evaluation sets" are, and the model of a stage, live in :mod:`pipeline.eval_inputs`
(shared with ``evaluate`` and ``ablate``), so the embedding, the evaluation and the sweeps always
agree on the images. ``--metrics``: a summary of the cache (counts; not a DVC metric); the wall
time goes to MLflow and the log, so a rerun rewrites it byte for byte.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import PreparedImage, embed_images

from .eval_inputs import coco_chunks, coco_sets, hq_chunks, hq_sets, sam_model, set_threads
from .params import Params, load_params
from .raw_data import read_raw_manifest
from .sam_source import read_sam_source, write_json_atomic
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = ["EmbedPaths", "main", "run"]

logger = logging.getLogger("pipeline.embed")

INDEX_NAME = "index.json"


@dataclass(frozen=True)
class EmbedPaths:
    base: Path  # models/base (sam.json)
    raw: Path  # data/raw
    out: Path  # data/embeddings
    metrics: Path  # reports/embed.json (the cache's counts)


def run(params: Params, paths: EmbedPaths, *, tracker: Any = None) -> dict[str, Any]:
    """Embed every evaluation image once; write the cache folder, its index and the summary."""
    set_threads(params.eval.threads)
    started = time.perf_counter()
    source = read_sam_source(paths.base)
    model = sam_model(source, device=params.eval.device, encoder_precision=params.sam.encoder_precision)
    raw = read_raw_manifest(paths.raw)
    size = model.img_size
    cache = EmbeddingCache(paths.out, max_memory_items=0)
    datasets: dict[str, dict[str, int]] = {}
    resize: dict[str, str] = {}  # per set: the key of its entries (and of every later lookup)

    def embed(name: str, kind: str, mode: str, chunks: Iterator[Sequence[PreparedImage]]) -> None:
        count = 0
        for images in chunks:
            embed_images(model, images, cache=cache, progress=False, batch_size=params.eval.embed_batch_size)
            count += len(images)
        datasets.setdefault(name, {})[kind] = count
        resize[name] = mode
        logger.info("%s (%s, %s): %d images", name, kind, mode, count)

    with torch.no_grad():
        for name, dataset, mode in hq_sets(params, raw):
            embed(name, "images", mode, hq_chunks(dataset, resize=mode, image_size=size))
            if tracker is not None:
                # the split's folder (from its files), not the dataset's root (train and val)
                files = (f for pair in dataset.pairs for f in (pair.image_path, pair.mask_path))
                tracker.log_dataset(common_folder(files), context="evaluation")
        for name, coco, mode in coco_sets(params, raw):
            chunks = ([c.image for c in chunk] for chunk in coco_chunks(coco, resize=mode, image_size=size))
            embed(name, "coco_images", mode, chunks)
    # Every lookup first misses, then is stored: misses = encoder passes, hits = images seen twice
    # (the embedded set's COCO view is the same images as its HQ view).
    metrics = {
        "sam_type": source.sam_type,
        "resize": resize,
        "images": sum(sum(v.values()) for v in datasets.values()),
        "encoder_passes": cache.misses,
        "reused": cache.hits,
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
    seconds = round(time.perf_counter() - started, 2)  # MLflow and the log only: not in an output
    logger.info(
        "%d encoder passes for %d evaluation images in %.1f s (%s, %s)",
        metrics["encoder_passes"], metrics["images"], seconds, source.sam_type, resize,
    )  # fmt: skip
    return {**metrics, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Image-embedding cache of the evaluation sets (stage 'embed').")
    parser.add_argument("--base", type=Path, required=True, help="base model folder (sam.json)")
    parser.add_argument("--raw", type=Path, required=True, help="raw-data folder with manifest.json")
    parser.add_argument("--out", type=Path, required=True, help="cache folder, e.g. data/embeddings")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (counts)")
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
