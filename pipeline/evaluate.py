"""Stage ``evaluate``: SAM and Stable-SAM side by side on every evaluation set.

    python -m pipeline.evaluate --base models/base --plugin models/stable_sam --raw data/raw \\
        --embeddings data/embeddings --results reports/evaluation.json --metrics metrics/evaluate.json \\
        --per-image reports/per_image.csv --figures plots/evaluate

Protocol (method spec sections 5-6, HQ-SAM's evaluation): every image of ``data.val`` is brought
to the model frame with its set's resize (``data.eval_resize``; under "auto" each set's protocol:
stretch for the HQ sets like HQ-SAM, longest side for COCO val2017 like SAM's and HQ-SAM's COCO
numbers; recorded per set in ``evaluation.json``); each prompt type of ``eval.prompts`` is drawn
``eval.draws`` times from a generator seeded by (``eval.seed``, draw, image, prompt type), so both
models see the very same prompts; predictions are measured at the original resolution (mIoU,
mBIoU, ST = mean pairwise IoU over the draws, α1). SAM is the same model with its plug-ins
switched off (same process, same weights), unless the checkpoint also changed SAM's own weights
(decoder fine-tuning, LoRA, adapters: then a separate plain SAM is the baseline). Sets with COCO
annotations (the embedded set's ``instances.json``, COCO val2017) are also scored by mask mAP /
mAP50 with every instance prompted by a noisy box of IoU 0.5-0.6 with its GT box; a set named in
``eval.coco_detections`` also with a detector's boxes (a COCO results file: every detection scored
at least ``eval.coco_detection_min_score`` prompts the models, its mask is scored by
``eval.coco_detection_score`` under the detection's category: HQ-SAM's COCO protocol).

The encoder does not run here: embeddings come from the ``embed`` stage's cache (read-only; a
miss is computed in memory and reported). Encoder-tuned variants bypass the cache and say so.

Outputs, JSON, CSV and figures only (the ``report`` stage renders them, and says whether the
targets hold): ``reports/evaluation.json`` (everything: per set, macro mean over the sets, COCO,
α1 per prompt type, cache use), ``metrics/evaluate.json`` (what ``dvc metrics``/``dvc exp show``
compare: the macro mean per model and prompt type, COCO mAP / mAP50), a per-image CSV (SAM vs
Stable-SAM per image and prompt type, to find where the model fails) and figures (SAM vs
Stable-SAM under the same loose box and the same single click; DSP offsets). Wall times go to
MLflow and the log only, so a rerun on the same inputs rewrites every output byte for byte. The
outputs are written as one set (:class:`stable_sam.atomic_write.AtomicFileSet`): every new file
goes to a temporary sibling first, then all are renamed, so a failure or a kill before the renames
leaves the previous run's files as they were; only a kill during the renames could mix two runs.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stable_sam.atomic_write import AtomicFileSet
from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import (
    CocoDetections,
    CocoResult,
    PreparedImage,
    coco_box_detections,
    coco_gt_subset,
    coco_noisy_box_detections,
    per_image_rows,
    summarize,
)

from .effect import BASELINE, EFFECT_PROMPTS, MODEL, rounded
from .eval_coco import ap_entry, detections_entry, merge_coco, read_detections
from .eval_figures import draw_figures, figure_indices
from .eval_inputs import (
    COCO_ONLY,
    PLUGIN_FILE,
    ModelPass,
    coco_chunks,
    coco_sets,
    embed_pass,
    evaluate_pass,
    hq_chunks,
    hq_sets,
    model_passes,
    set_threads,
)
from .params import EvalConfig, Params, load_params
from .raw_data import read_raw_manifest
from .sam_source import json_text
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = ["EvaluatePaths", "compact_metrics", "eval_kinds", "main", "run"]

logger = logging.getLogger("pipeline.evaluate")


@dataclass(frozen=True)
class EvaluatePaths:
    base: Path  # models/base (sam.json)
    plugin: Path  # models/stable_sam (plugin.pt)
    raw: Path  # data/raw
    embeddings: Path  # data/embeddings (embed stage)
    results: Path  # reports/evaluation.json (full results)
    metrics: Path  # metrics/evaluate.json (the numbers DVC compares)
    per_image: Path | None = None  # reports/per_image.csv
    figures: Path | None = None  # plots/evaluate (PNG files)


def eval_kinds(prompts: Sequence[str]) -> list[str]:
    """``eval.prompts`` plus the headline's prompt types, in order, without duplicates."""
    kinds = list(dict.fromkeys(prompts))
    missing = [k for k in EFFECT_PROMPTS if k not in kinds]
    if missing:
        logger.info("eval.prompts lacks %s (needed by the headline): evaluated too", missing)
    return kinds + missing


# ------------------------------------------------------------------------------------------------
# Figures


# ------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class _Evaluation:
    """One run of the stage: its models and cache, and what it collects set by set."""

    cfg: EvalConfig
    passes: list[ModelPass]
    cache: ReadOnlyEmbeddingCache
    kinds: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    resize: dict[str, str] = field(default_factory=dict)  # per set, as embed keyed its entries
    figures: dict[Path, bytes] = field(default_factory=dict)  # written with the other outputs
    images: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)  # left out, never replaced
    coco: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    folders: list[Path] = field(default_factory=list)  # MLflow inputs: each set's split folder

    @property
    def image_size(self) -> int:
        return self.passes[0].model.img_size

    def embed(self, p: ModelPass, images: Sequence[PreparedImage]) -> list[torch.Tensor]:
        return embed_pass(p, images, self.cache, batch_size=self.cfg.embed_batch_size)


def _evaluate_set(ev: _Evaluation, name: str, dataset: Any, resize: str, *, figures: Path | None) -> None:
    """Every prompt type on every image of one HQ set; figures of ``eval.num_figures`` images."""
    t0 = time.perf_counter()
    ev.resize[name] = resize
    # The split's folder (from its files), not the dataset's root (which may hold train and val).
    ev.folders.append(common_folder(f for pair in dataset.pairs for f in (pair.image_path, pair.mask_path)))
    wanted = figure_indices(len(dataset), ev.cfg.num_figures) if figures is not None else set()
    for chunk in hq_chunks(dataset, resize=resize, image_size=ev.image_size):
        chunk_embeddings = []
        for p in ev.passes:
            embeddings = ev.embed(p, chunk)
            chunk_embeddings.append(embeddings)
            ev.records += evaluate_pass(
                p, chunk, embeddings, ev.cfg, kinds=ev.kinds, dataset=name, draws=ev.cfg.draws
            )
        for j, image in enumerate(chunk):
            if image.index in wanted and image.frame_mask.any():
                with torch.no_grad():
                    ev.figures |= draw_figures(
                        ev.passes,
                        [e[j] for e in chunk_embeddings],
                        image,
                        dataset=name,
                        cfg=ev.cfg,
                        out=figures,
                    )
    ev.images[name] = len(dataset)
    ev.skipped[name] = {"count": dataset.num_skipped, "files": dataset.skipped_dicts()}
    if dataset.num_skipped:
        logger.warning(
            "%s: %d file(s) skipped, not evaluated (evaluation.json: skipped)", name, dataset.num_skipped
        )
    ev.seconds[name] = round(time.perf_counter() - t0, 2)
    logger.info("%s: %d images, %d prompt types, %.1f s", name, len(dataset), len(ev.kinds), ev.seconds[name])


def _evaluate_coco(
    ev: _Evaluation, name: str, coco: Any, resize: str, detections: CocoDetections | None
) -> None:
    """Mask mAP / mAP50 of one COCO-format set, every instance prompted by a noisy box; with
    ``detections``, also every detection prompting by its box."""
    t0 = time.perf_counter()
    ev.resize[name] = resize
    cfg = ev.cfg
    results: dict[str, CocoResult] = {}
    boxed: dict[str, CocoResult] = {}
    for chunk in coco_chunks(coco, resize=resize, image_size=ev.image_size):
        for p in ev.passes:
            embeddings = ev.embed(p, [c.image for c in chunk])
            part = coco_noisy_box_detections(
                p.model,
                chunk,
                embeddings,
                settings=p.settings,
                seed=cfg.seed,
                min_iou=cfg.coco_min_box_iou,
                max_iou=cfg.coco_max_box_iou,
                progress=False,
            )
            merge_coco(results, part)
            if detections is not None:
                part = coco_box_detections(
                    p.model, chunk, embeddings, detections, settings=p.settings,
                    score=cfg.coco_detection_score, progress=False,
                )  # fmt: skip
                merge_coco(boxed, part)
    gt = coco_gt_subset(coco.coco.dataset, coco.image_ids)
    entry = ap_entry(gt, results)
    any_result = next(iter(results.values()))
    entry.update(
        images=len(coco),
        instances=any_result.prompted + any_result.skipped,
        prompted=any_result.prompted,
        escalated=any_result.escalated,
    )
    if detections is not None:
        entry["detections"] = detections_entry(gt, boxed, detections, cfg)
        logger.info(
            "%s COCO detector boxes (%s): mAP SAM %.1f, Stable-SAM %.1f (%d boxes)",
            name, detections.path, entry["detections"][BASELINE]["map"], entry["detections"][MODEL]["map"],
            detections.kept,
        )  # fmt: skip
    ev.coco[name] = entry
    ev.seconds[f"coco:{name}"] = round(time.perf_counter() - t0, 2)
    logger.info(
        "%s COCO N-Box (%.1f-%.1f): mAP SAM %.1f, Stable-SAM %.1f (%d instances, %d escalated) in %.1f s",
        name, cfg.coco_min_box_iou, cfg.coco_max_box_iou, entry[BASELINE]["map"], entry[MODEL]["map"],
        entry["instances"], entry["escalated"], ev.seconds[f"coco:{name}"],
    )  # fmt: skip


def _results(ev: _Evaluation, baseline_how: str) -> dict[str, Any]:
    """Everything the stage measured (reports/evaluation.json)."""
    datasets = {
        name: summarize([r for r in ev.records if r["dataset"] == name]) for name in dict.fromkeys(ev.images)
    }
    mean = summarize(ev.records) if ev.records else {}
    bypassed = [
        f"{'stable_sam' if MODEL in p.settings else 'sam'}: encoder tuned ({p.model.tuning.encoder}), "
        f"{p.embedded} images embedded without the cache"
        for p in ev.passes
        if not p.model.encoder_is_frozen
    ]
    for line in bypassed:
        logger.info("embedding cache bypassed: %s", line)
    cache = ev.cache
    if cache.computed:
        logger.warning(
            "%d embeddings were not in the cache, computed here: rerun the embed stage", cache.computed
        )
    return {
        "sam_type": ev.passes[-1].model.sam_type,
        "datasets": datasets,
        "mean": mean,
        "mean_over": list(ev.images),
        "resize": ev.resize,
        "coco": ev.coco,
        "alpha1": {kind: figures.get("alpha1") for kind, figures in mean.get(MODEL, {}).items()},
        "images": ev.images,
        "skipped": ev.skipped,
        "prompts": ev.kinds,
        "draws": ev.cfg.draws,
        "baseline": baseline_how,
        "embedding_cache": {
            "hits": cache.hits,
            "computed_here": cache.computed,
            "bypassed": bypassed,
            "encoder_passes": cache.computed + sum(p.embedded for p in ev.passes),
        },
        "trainable_parameters": ev.passes[-1].model.num_trainable_parameters(),
    }


def compact_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """What ``dvc metrics show/diff`` and ``dvc exp show`` compare: the macro mean per model and
    prompt type (mIoU, mBIoU, ST, α1) and COCO mAP / mAP50 per set. No timings, no counts."""
    keys = ("miou", "mbiou", "st", "alpha1")
    return {
        "mean": {
            setting: {kind: {k: rounded(f[k]) for k in keys if k in f} for kind, f in kinds.items()}
            for setting, kinds in results["mean"].items()
        },
        "coco": {name: _ap_metrics(entry) for name, entry in results["coco"].items()},
        # only with eval.coco_detections (the default's metrics stay as they were)
        **_detection_metrics(results["coco"]),
    }


def _ap_metrics(entry: dict[str, Any]) -> dict[str, float]:
    return {f"{s}_{k}": rounded(entry[s][k]) for s in (BASELINE, MODEL) for k in ("map", "map50")}


def _detection_metrics(coco: dict[str, Any]) -> dict[str, Any]:
    boxed = {name: _ap_metrics(entry["detections"]) for name, entry in coco.items() if "detections" in entry}
    return {"coco_detections": boxed} if boxed else {}


def _write_csv(outputs: AtomicFileSet, path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with outputs.open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _write(paths: EvaluatePaths, results: dict[str, Any], ev: _Evaluation) -> None:
    """All outputs as one set: new versions first, then the renames (see AtomicFileSet)."""
    with AtomicFileSet() as outputs:
        for path, png in ev.figures.items():
            outputs.write_bytes(path, png)
        outputs.write_text(paths.results, json_text(results))
        outputs.write_text(paths.metrics, json_text(compact_metrics(results)))
        if paths.per_image is not None:
            rows = per_image_rows(ev.records, baseline=BASELINE, model=MODEL)
            _write_csv(outputs, paths.per_image, rows)


def run(params: Params, paths: EvaluatePaths, *, tracker: Any = None) -> dict[str, Any]:
    """Evaluate SAM and Stable-SAM; write the results, metrics, per-image CSV and figures.

    Returns the results, plus ``figures`` (the PNG paths) and ``seconds`` (wall times), which
    are not written to any output.
    """
    cfg = params.eval
    set_threads(cfg.threads)
    started = time.perf_counter()
    passes, baseline_how = model_passes(
        paths.base, paths.plugin, device=cfg.device, encoder_precision=params.sam.encoder_precision
    )
    ev = _Evaluation(
        cfg=cfg,
        passes=passes,
        cache=ReadOnlyEmbeddingCache(paths.embeddings, max_memory_items=2 * 32),
        kinds=eval_kinds(cfg.prompts),
    )
    raw = read_raw_manifest(paths.raw)
    cocos = coco_sets(params, raw)
    detections = read_detections(cfg, cocos)
    for d, (name, dataset, resize) in enumerate(hq_sets(params, raw)):
        _evaluate_set(ev, name, dataset, resize, figures=paths.figures if d == 0 else None)
    for name, coco, resize in cocos:
        _evaluate_coco(ev, name, coco, resize, detections.get(name))
    results = _results(ev, baseline_how)
    _write(paths, results, ev)
    sam, stable = results["mean"].get(BASELINE, {}), results["mean"].get(MODEL, {})
    for kind in ("noisy_box", "point_1"):
        logger.info(
            "%s mIoU (mean over %s): SAM %s, Stable-SAM %s",
            kind, list(ev.images), rounded(sam.get(kind, {}).get("miou")), rounded(stable.get(kind, {}).get("miou")),
        )  # fmt: skip
    if tracker is not None:
        coco_only = [raw.dataset_root(spec) for spec in sorted(set(params.data.val) & set(COCO_ONLY))]
        for folder in [*ev.folders, *coco_only]:
            tracker.log_dataset(folder, context="evaluation")
        for path in ev.figures:
            tracker.log_figure(path)
    seconds = {**ev.seconds, "total": round(time.perf_counter() - started, 2)}
    return {**results, "figures": [str(p) for p in ev.figures], "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("SAM vs Stable-SAM evaluation (stage 'evaluate').")
    for name, help_text in [
        ("--base", "base model folder (sam.json)"),
        ("--plugin", "plug-in folder (plugin.pt)"),
        ("--raw", "raw-data folder with manifest.json"),
        ("--embeddings", "embedding cache folder (embed stage)"),
        ("--results", "full results JSON"),
        ("--metrics", "metrics JSON (the numbers DVC compares)"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    parser.add_argument("--per-image", type=Path, default=None, help="per-image CSV")
    parser.add_argument("--figures", type=Path, default=None, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = EvaluatePaths(
        base=args.base,
        plugin=args.plugin,
        raw=args.raw,
        embeddings=args.embeddings,
        results=args.results,
        metrics=args.metrics,
        per_image=args.per_image,
        figures=args.figures,
    )
    from .tracking import stage_run

    with stage_run("evaluate", params, params_path=Path(args.params)) as tracker:
        results = run(params, paths, tracker=tracker)
        tracker.log_metrics({"mean": results["mean"], "coco": results["coco"], "seconds": results["seconds"]})
        tracker.set_tags(
            {"evaluate.baseline": results["baseline"], "evaluate.datasets": ",".join(results["images"])}
        )
        for path in (paths.results, paths.metrics, paths.per_image):
            if path is not None:
                tracker.log_artifact(path, artifact_path="evaluation")
        tracker.log_metrics(_headline(results["mean"]), headline=True)
        tracker.log_evaluated_checkpoint(paths.plugin / PLUGIN_FILE)
    return results


def _headline(mean: dict[str, Any]) -> dict[str, Any]:
    """mIoU of SAM, of Stable-SAM and their difference per prompt type (MLflow: on the parent run too)."""
    sam = mean.get(BASELINE, {})
    pairs = {k: (sam.get(k, {}).get("miou"), f.get("miou")) for k, f in mean.get(MODEL, {}).items()}
    return {
        f"headline.{kind}.miou": {BASELINE: base, MODEL: ours, "delta": ours - base}
        for kind, (base, ours) in pairs.items()
        if isinstance(base, (int, float)) and isinstance(ours, (int, float))
    }


if __name__ == "__main__":
    main()
