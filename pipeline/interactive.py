"""Stage ``interactive``: interactive segmentation, SAM vs Stable-SAM, NoC@85 / NoC@90.

    python -m pipeline.interactive --base models/base --plugin models/stable_sam --raw data/raw \\
        --embeddings data/embeddings --results reports/interactive.json \\
        --metrics metrics/interactive.json --plot plots/interactive.csv \\
        --figure reports/figures/interactive.png

The standard click protocol (:mod:`stable_sam.evaluation.interactive`): RITM's oracle clicks at
the centre of the largest error region, all clicks so far plus the previous low-res logits as
SAM's mask input, ``interactive.multimask_output`` (the supplement keeps SAM's default, True: the
best-scored of 3 masks is kept and fed back), up to ``interactive.max_clicks`` clicks; IoU at the
original resolution after every click, NoC@t per threshold of ``interactive.iou_thresholds``
(``max_clicks`` when never reached). SAM and Stable-SAM run the very same protocol on each target
of every set of ``interactive.sets`` (the embedded val split by default, or folders in the HQSeg
layout: GrabCut, Berkeley, DAVIS, SBD converted to ``im/`` + ``gt/``), brought to the model frame
with the set's resize (``data.eval_resize``, as the embed stage: ``eval_inputs.set_resize``; recorded
per set). Embeddings come from the ``embed`` stage's cache (read-only); images
it does not hold (a set that is not in ``data.val``) are embedded here, once, in memory.

Outputs: ``reports/interactive.json`` (per set: a row per model with NoC, NoF and mIoU@1/5/20,
the Δ row, which model is better on each, the per-click curves), ``metrics/interactive.json``
(NoC@85, NoC@90, mIoU@1, mIoU@5 per model and set, for ``dvc metrics``), ``plots/interactive.csv``
(mIoU ± std per click) and ``reports/figures/interactive.png``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stable_sam.atomic_write import AtomicFileSet
from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import ClickTrace, click_trace, model_decoder, summarize_traces

# H2 moves these shared helpers to pipeline/eval_inputs.py (same names): import them from there then.
from .effect import BASELINE, MODEL
from .eval_inputs import display_name, embed_pass, hq_chunks, model_passes, set_resize, set_threads
from .outputs import without_seconds
from .params import Params, load_params
from .raw_data import read_raw_manifest
from .sam_source import json_text
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = ["InteractivePaths", "headline_metrics", "main", "run"]

logger = logging.getLogger("pipeline.interactive")

# The per-click mIoUs kept as DVC metrics (the full curve is in the plot CSV and the results).
METRIC_CLICKS = (1, 5)


@dataclass(frozen=True)
class InteractivePaths:
    base: Path  # models/base (sam.json)
    plugin: Path  # models/stable_sam (plugin.pt)
    raw: Path  # data/raw
    embeddings: Path  # data/embeddings (embed stage, read-only)
    results: Path  # reports/interactive.json
    metrics: Path  # metrics/interactive.json
    plot: Path  # plots/interactive.csv
    figure: Path  # reports/figures/interactive.png


def _threshold_tags(thresholds: Sequence[float]) -> list[str]:
    return [f"{round(100 * t):d}" for t in thresholds]


def _rows(summary: dict[str, dict[str, Any]], tags: Sequence[str]) -> dict[str, dict[str, float]]:
    """{model: {metric: value}}: NoC / NoF per threshold, mIoU after 1, 5, 20 clicks."""
    keys = [f"noc{t}" for t in tags] + [f"nof{t}" for t in tags]
    keys += [k for k in ("miou_1", "miou_5", "miou_20") if k in next(iter(summary.values()))]
    return {
        model: {k: s[k] if k.startswith("nof") else round(s[k], 4) for k in keys}
        for model, s in summary.items()
    }


def _better(metric: str, sam: float, stable: float) -> str:
    """Which model is better on a metric: fewer clicks (NoC) and failures (NoF), higher mIoU."""
    if metric.startswith(("noc", "nof")):
        sam, stable = -sam, -stable
    return MODEL if stable > sam else BASELINE if stable < sam else "tie"


def headline_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """metrics/interactive.json: per set and model, NoC per threshold and mIoU@1, mIoU@5."""
    metrics: dict[str, Any] = {}
    for name, entry in results["sets"].items():
        keep = [f"noc{t}" for t in _threshold_tags(results["iou_thresholds"])]
        keep += [f"miou_{k}" for k in METRIC_CLICKS if f"miou_{k}" in entry["models"][MODEL]]
        metrics[name] = {model: {k: row[k] for k in keep} for model, row in entry["models"].items()}
    return metrics


def _set_traces(
    params: Params, passes: list, dataset: Any, resize: str, cache: ReadOnlyEmbeddingCache
) -> dict:
    """{setting: [ClickTrace per target]} for one set, every setting on the same targets."""
    cfg = params.interactive
    count = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    traces: dict[str, list[ClickTrace]] = {s: [] for p in passes for s in p.settings}
    size = passes[0].model.img_size
    for chunk in hq_chunks(dataset, resize=resize, image_size=size):
        chunk = [image for image in chunk if image.index < count]
        if not chunk:
            break
        for p in passes:
            embeddings = embed_pass(p, chunk, cache, batch_size=params.eval.embed_batch_size)
            for image, embedding in zip(chunk, embeddings):
                for setting, context in p.settings.items():
                    decode = model_decoder(p.model, embedding, image, multimask_output=cfg.multimask_output)
                    with context():
                        traces[setting].append(click_trace(decode, image, max_clicks=cfg.max_clicks))
    return traces


def _curve_csv(results: dict[str, Any]) -> str:
    """One row per (dataset, click): mIoU ± std (over targets) of each model, in percent."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    models = (BASELINE, MODEL)
    writer.writerow(["dataset", "click", *[c for m in models for c in (m, f"{m}_std")]])
    for name, entry in results["sets"].items():
        curves = entry["curves"]
        for k in range(results["max_clicks"]):
            values = [f"{curves[m][key][k]:.4f}" for m in models for key in ("miou", "miou_std")]
            writer.writerow([name, k + 1, *values])
    return buffer.getvalue()


def _figure_png(results: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from stable_sam.visualize import clicks_figure

    labels = {BASELINE: "SAM", MODEL: "Stable-SAM"}
    curves = {
        name: {labels[m]: (c["miou"], c["miou_std"]) for m, c in entry["curves"].items()}
        for name, entry in results["sets"].items()
    }
    fig = clicks_figure(curves, thresholds=results["iou_thresholds"])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def run(params: Params, paths: InteractivePaths, *, tracker: Any = None) -> dict[str, Any]:
    """Run the click protocol for SAM and Stable-SAM on every set; write results, metrics, plot, figure."""
    cfg = params.interactive
    set_threads(params.eval.threads)
    started = time.perf_counter()
    passes, baseline_how = model_passes(
        paths.base, paths.plugin, device=params.eval.device, encoder_precision=params.sam.encoder_precision
    )
    raw = read_raw_manifest(paths.raw)
    cache = ReadOnlyEmbeddingCache(paths.embeddings, max_memory_items=64)
    tags = _threshold_tags(cfg.iou_thresholds)
    sets: dict[str, Any] = {}
    folders: list[Path] = []  # MLflow inputs: each set's split folder (from its files)
    resize: dict[str, str] = {}
    for spec in cfg.sets:
        name = display_name(spec)
        resize[name] = set_resize(params.data.eval_resize, spec)
        t0 = time.perf_counter()
        dataset = raw.open_dataset(spec, split="val")
        folders.append(common_folder(f for pair in dataset.pairs for f in (pair.image_path, pair.mask_path)))
        with torch.no_grad():
            traces = _set_traces(params, passes, dataset, resize[name], cache)
        summary = {
            s: summarize_traces(t, thresholds=cfg.iou_thresholds, max_clicks=cfg.max_clicks)
            for s, t in traces.items()
        }
        rows = _rows(summary, tags)
        sets[name] = {
            "targets": summary[MODEL]["n"],
            "skipped": dataset.num_skipped,
            "models": rows,
            "delta": {k: round(rows[MODEL][k] - rows[BASELINE][k], 4) for k in rows[MODEL]},
            "better": {k: _better(k, rows[BASELINE][k], rows[MODEL][k]) for k in rows[MODEL]},
            "curves": {s: {"miou": f["miou"], "miou_std": f["miou_std"]} for s, f in summary.items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        logger.info(
            "%s: %d targets; NoC@%s SAM %.2f, Stable-SAM %.2f; mIoU@1 %.1f -> %.1f (%.1f s)",
            name, sets[name]["targets"], tags[-1], rows[BASELINE][f"noc{tags[-1]}"],
            rows[MODEL][f"noc{tags[-1]}"], rows[BASELINE]["miou_1"], rows[MODEL]["miou_1"],
            sets[name]["seconds"],
        )  # fmt: skip
    results: dict[str, Any] = {
        "protocol": (
            "RITM oracle clicks (centre of the largest error region, at the original resolution), "
            "previous low-res logits fed back as mask input, best-scored mask of the multimask output"
        ),
        "max_clicks": cfg.max_clicks,
        "iou_thresholds": list(cfg.iou_thresholds),
        "multimask_output": cfg.multimask_output,
        "resize": resize,
        "sam_type": passes[-1].model.sam_type,
        "baseline": baseline_how,
        "columns": list(next(iter(sets.values()))["models"][MODEL]),
        "sets": sets,
        "embedding_cache": {"hits": cache.hits, "computed_here": cache.computed},
        "seconds": round(time.perf_counter() - started, 2),
    }
    with AtomicFileSet() as outputs:
        outputs.write_text(paths.results, json_text(without_seconds(results)))
        outputs.write_text(paths.metrics, json_text(headline_metrics(results)))
        outputs.write_text(paths.plot, _curve_csv(results))
        outputs.write_bytes(paths.figure, _figure_png(results))
    if tracker is not None:
        for folder in folders:
            tracker.log_dataset(folder, context="evaluation")
        tracker.log_figure(paths.figure)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Interactive segmentation, SAM vs Stable-SAM (stage 'interactive').")
    for name, help_text in [
        ("--base", "base model folder (sam.json)"),
        ("--plugin", "plug-in folder (plugin.pt)"),
        ("--raw", "raw-data folder with manifest.json"),
        ("--embeddings", "embedding cache folder (embed stage)"),
        ("--results", "full results JSON"),
        ("--metrics", "metrics JSON (headline numbers, for DVC)"),
        ("--plot", "per-click mIoU CSV"),
        ("--figure", "mIoU-per-click PNG"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = InteractivePaths(
        args.base, args.plugin, args.raw, args.embeddings, args.results, args.metrics, args.plot, args.figure
    )
    from .tracking import stage_run

    with stage_run("interactive", params, params_path=Path(args.params)) as tracker:
        results = run(params, paths, tracker=tracker)
        tracker.log_metrics(headline_metrics(results))
        for path in (paths.results, paths.metrics, paths.plot):
            tracker.log_artifact(path, artifact_path="interactive")
    return results


if __name__ == "__main__":
    main()
