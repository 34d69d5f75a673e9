"""Stage ``automatic``: automatic mask generation, SAM vs Stable-SAM, class-agnostic COCO AP / AR@100.

    python -m pipeline.automatic --base models/base --plugin models/stable_sam --raw data/raw \\
        --results reports/automatic.json --metrics metrics/automatic.json \\
        --figure reports/figures/automatic.png

segment-anything's ``SamAutomaticMaskGenerator`` (a grid of single points, where SAM is weakest)
runs on the plugged ``Sam`` of the plug-in checkpoint: once with the plug-ins disabled (SAM) and
once with them (Stable-SAM), with the generator arguments of the ``automatic`` section, on every
image of the sets in ``automatic.sets`` that have COCO instances (the embedded val split's
``instances.json`` by default; ``coco_val2017``; a folder with ``im/`` + ``instances.json``). The
masks are scored against all instances of each image, class-agnostically (``COCOeval`` segm with
``useCats = 0``), ranked by ``automatic.score`` (SAM's predicted IoU by default): AP@[.5:.95],
AP50, AP75 and AR@1/10/100 (maxDets per image).

The generator preprocesses an image itself (``SamPredictor``: longest side + pad, at the original
resolution), which is not the evaluation frame of the ``embed`` stage's cache; each image is
embedded here once, in memory, and shared by SAM and Stable-SAM.

Outputs: ``reports/automatic.json`` (per set: a row per model with every figure and the masks per
image, the Δ row, which model is better on each), ``metrics/automatic.json`` (AR@100 and AP of
SAM, Stable-SAM and Δ per set, for ``dvc metrics``) and ``reports/figures/automatic.png`` (image |
SAM | Stable-SAM: the best-scored masks of a few images).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from stable_sam import data as data_lib
from stable_sam.atomic_write import AtomicFileSet
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import amg_coco_eval, amg_detections, amg_overlay, coco_gt_subset, mask_generator

# H2 moves these shared helpers to pipeline/eval_inputs.py (same names): import them from there then.
from .effect import BASELINE, MODEL
from .eval_inputs import coco_files, display_name, model_passes, set_threads
from .outputs import without_seconds
from .params import Params, load_params
from .raw_data import read_raw_manifest
from .sam_source import json_text
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = ["AutomaticPaths", "headline_metrics", "main", "run"]

logger = logging.getLogger("pipeline.automatic")

# The figure: the first images of the first set, the best-scored masks of each model, upscaled.
FIGURE_IMAGES = 3
FIGURE_MASKS = 8
FIGURE_SCALE = 2
# The figures kept as DVC metrics (the rest are in the results).
METRIC_KEYS = ("ar100", "ap")


@dataclass(frozen=True)
class AutomaticPaths:
    base: Path  # models/base (sam.json)
    plugin: Path  # models/stable_sam (plugin.pt)
    raw: Path  # data/raw
    results: Path  # reports/automatic.json
    metrics: Path  # metrics/automatic.json
    figure: Path  # reports/figures/automatic.png


def headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """metrics/automatic.json: per set, AR@100 and AP (%) of SAM, Stable-SAM and their Δ."""
    return {
        name: {
            **{model: {k: row[k] for k in METRIC_KEYS} for model, row in entry["models"].items()},
            "delta": {k: entry["delta"][k] for k in METRIC_KEYS},
        }
        for name, entry in results["sets"].items()
    }


def _better(sam: float, stable: float) -> str:
    return MODEL if stable > sam else BASELINE if stable < sam else "tie"


def _open_coco(raw: Any, spec: str, max_images: int | None) -> data_lib.CocoInstances:
    files = coco_files(raw, spec)
    if files is None:
        raise data_lib.DatasetError(
            f"automatic.sets: {spec!r} has no COCO instance annotations (embedded, coco_val2017, or a "
            "folder with im/ + instances.json)"
        )
    return data_lib.CocoInstances(*files, max_images=max_images)


def _figure_png(rows: Sequence[tuple[np.ndarray, list[dict], list[dict]]], *, score: str) -> bytes:
    """A grid: one row per image, columns image | SAM | Stable-SAM with the FIGURE_MASKS best-scored
    masks of each (all of them overlap into noise), tiles upscaled FIGURE_SCALE x (nearest)."""

    def top(records: list[dict]) -> list[dict]:
        return sorted(records, key=lambda r: -r[score])[:FIGURE_MASKS]

    def tile(image: Image.Image) -> Image.Image:
        return image.resize((image.width * FIGURE_SCALE, image.height * FIGURE_SCALE), Image.NEAREST)

    tiles = [
        [tile(Image.fromarray(im)), tile(amg_overlay(im, top(sam))), tile(amg_overlay(im, top(stable)))]
        for im, sam, stable in rows
    ]
    gap = 8
    width = max(sum(t.width for t in row) for row in tiles) + gap * 2
    height = sum(max(t.height for t in row) for row in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in tiles:
        x = 0
        for t in row:
            canvas.paste(t, (x, y))
            x += t.width + gap
        y += max(t.height for t in row) + gap
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _evaluate_set(
    params: Params, passes: list, coco: data_lib.CocoInstances, *, figure_rows: list
) -> dict[str, Any]:
    """Generate masks with every setting on every image of one set; score them; fill figure_rows."""
    cfg = params.automatic
    cache = EmbeddingCache(max_memory_items=4)  # one image at a time: SAM and Stable-SAM share its pass
    generators = [
        (setting, context, mask_generator(p.model, cache=cache, **cfg.generator_options()))
        for p in passes
        for setting, context in p.settings.items()
    ]
    detections: dict[str, list[dict[str, Any]]] = {setting: [] for setting, _, _ in generators}
    for i in range(len(coco)):
        sample = coco[i]
        records = {}
        for setting, context, generator in generators:
            with context(), torch.no_grad():
                records[setting] = generator.generate(sample.image)
            detections[setting] += amg_detections(records[setting], image_id=sample.image_id, score=cfg.score)
        if len(figure_rows) < FIGURE_IMAGES:
            figure_rows.append((sample.image, records[BASELINE], records[MODEL]))
    gt = coco_gt_subset(coco.coco.dataset, coco.image_ids)
    rows = {
        setting: {
            **{k: round(100 * v, 4) for k, v in amg_coco_eval(gt, found).items()},
            "masks_per_image": round(len(found) / len(coco), 2),
        }
        for setting, found in detections.items()
    }
    return {
        "images": len(coco),
        "instances": len(gt["annotations"]),
        "models": rows,
        "delta": {k: round(rows[MODEL][k] - rows[BASELINE][k], 4) for k in rows[MODEL]},
        # Which model is better on each score (higher is better): a report can say where Stable-SAM loses.
        "better": {
            k: _better(rows[BASELINE][k], rows[MODEL][k]) for k in rows[MODEL] if k != "masks_per_image"
        },
    }


def run(params: Params, paths: AutomaticPaths, *, tracker: Any = None) -> dict[str, Any]:
    """Automatic masks of SAM and Stable-SAM on every set; write results, metrics and the figure."""
    cfg = params.automatic
    set_threads(params.eval.threads)
    started = time.perf_counter()
    passes, baseline_how = model_passes(
        paths.base, paths.plugin, device=params.eval.device, encoder_precision=params.sam.encoder_precision
    )
    raw = read_raw_manifest(paths.raw)
    sets: dict[str, Any] = {}
    figure_rows: list[tuple[np.ndarray, list[dict], list[dict]]] = []
    for spec in cfg.sets:
        name = display_name(spec)
        t0 = time.perf_counter()
        sets[name] = _evaluate_set(
            params, passes, _open_coco(raw, spec, cfg.max_images), figure_rows=figure_rows
        )
        sets[name]["seconds"] = round(time.perf_counter() - t0, 2)
        rows = sets[name]["models"]
        logger.info(
            "%s: %d images, %d instances; AR@100 SAM %.1f, Stable-SAM %.1f; AP %.1f -> %.1f (%.1f s)",
            name, sets[name]["images"], sets[name]["instances"], rows[BASELINE]["ar100"],
            rows[MODEL]["ar100"], rows[BASELINE]["ap"], rows[MODEL]["ap"], sets[name]["seconds"],
        )  # fmt: skip
    results: dict[str, Any] = {
        "protocol": (
            "segment-anything SamAutomaticMaskGenerator on the plugged Sam (plug-ins off: SAM); "
            f"COCOeval segm, class-agnostic (useCats=0), masks ranked by {cfg.score}"
        ),
        "generator": {k: v for k, v in cfg.generator_options().items() if k != "output_mode"},
        "score": cfg.score,
        "sam_type": passes[-1].model.sam_type,
        "baseline": baseline_how,
        "columns": list(next(iter(sets.values()))["models"][MODEL]),
        "sets": sets,
        "seconds": round(time.perf_counter() - started, 2),
    }
    with AtomicFileSet() as outputs:
        outputs.write_text(paths.results, json_text(without_seconds(results)))
        outputs.write_text(paths.metrics, json_text(headline_metrics(results)))
        outputs.write_bytes(paths.figure, _figure_png(figure_rows, score=cfg.score))
    if tracker is not None:
        for spec in cfg.sets:  # the split's images and its instances file, not the dataset's root
            tracker.log_dataset(common_folder(coco_files(raw, spec)), context="evaluation")
        tracker.log_figure(paths.figure)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Automatic mask generation, SAM vs Stable-SAM (stage 'automatic').")
    for name, help_text in [
        ("--base", "base model folder (sam.json)"),
        ("--plugin", "plug-in folder (plugin.pt)"),
        ("--raw", "raw-data folder with manifest.json"),
        ("--results", "full results JSON"),
        ("--metrics", "metrics JSON (headline numbers, for DVC)"),
        ("--figure", "PNG: image | SAM | Stable-SAM automatic masks"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = AutomaticPaths(args.base, args.plugin, args.raw, args.results, args.metrics, args.figure)
    from .tracking import stage_run

    with stage_run("automatic", params, params_path=Path(args.params)) as tracker:
        results = run(params, paths, tracker=tracker)
        tracker.log_metrics(headline_metrics(results))
        for path in (paths.results, paths.metrics):
            tracker.log_artifact(path, artifact_path="automatic")
    return results


if __name__ == "__main__":
    main()
