"""Stage ``evaluate``: SAM and Stable-SAM side by side on every evaluation set.

    python -m pipeline.evaluate --base models/base --plugin models/stable_sam --raw data/raw \\
        --embeddings data/embeddings --results reports/evaluation.json --metrics metrics/evaluate.json \\
        --effect metrics/effect.json --checks metrics/effect_checks.json --table reports/evaluation.md \\
        --per-image reports/per_image.csv --figures plots/evaluate

Protocol (method spec sections 5-6, HQ-SAM's evaluation): every image of ``data.val`` is brought
to the model frame with ``data.eval_resize``; each prompt type of ``eval.prompts`` is drawn
``eval.draws`` times from a generator seeded by (``eval.seed``, draw, image, prompt type), so both
models see the very same prompts; predictions are measured at the original resolution (mIoU,
mBIoU, ST = mean pairwise IoU over the draws, α1). SAM is the same model with its plug-ins
switched off (same process, same weights), unless the checkpoint also changed SAM's own weights
(decoder fine-tuning, LoRA, adapters: then a separate plain SAM is the baseline). Sets with COCO
annotations (the embedded set's ``instances.json``, COCO val2017) are also scored by mask mAP /
mAP50 with every instance prompted by a noisy box of IoU 0.5-0.6 with its GT box.

The encoder does not run here: embeddings come from the ``embed`` stage's cache (read-only; a
miss is computed in memory and reported). Encoder-tuned variants bypass the cache and say so.

Outputs: ``reports/evaluation.json`` (everything: per set, macro mean over the sets, COCO, α1 per
prompt type, cache use, timings), ``metrics/evaluate.json`` (its numbers for ``dvc metrics``: the
mean per model and prompt type, COCO AP), ``metrics/effect.json`` (the fixed-shape headline numbers),
``metrics/effect_checks.json`` (whether the targets hold), a markdown table in the paper's layout
with SAM, Stable-SAM and Δ, a per-image CSV (SAM vs Stable-SAM per image and prompt type, to find
where the model fails) and figures (SAM vs Stable-SAM under the same loose box and the same single
click; DSP offsets), all logged to MLflow. They are written as one set at the end
(:class:`stable_sam.atomic_write.AtomicFileSet`): every new file goes to a temporary sibling first,
then all are renamed, so a failure or a kill before the renames leaves the previous run's files as
they were (never a new ``evaluation.json`` beside an old ``effect_checks.json``); only a kill
during the renames themselves could mix two runs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stable_sam.atomic_write import AtomicFileSet
from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import (
    CocoResult,
    PreparedImage,
    coco_gt_subset,
    coco_noisy_box_detections,
    decode_prompts,
    embed_images,
    eval_prompts,
    evaluate_prompts,
    per_image_rows,
    summarize,
)
from stable_sam.metrics import coco_mask_ap, mask_iou
from stable_sam.modeling import StableSam

from .embed import COCO_ONLY, coco_chunks, coco_sets, hq_chunks, hq_sets, sam_model, set_threads
from .params import EvalConfig, Params, load_params
from .raw_data import read_raw_manifest
from .readme_table import EFFECT_PROMPTS
from .sam_source import json_text, read_sam_source
from .stage_cli import stage_argument_parser
from .tracking import common_folder

__all__ = [
    "EvaluatePaths",
    "ModelPass",
    "effect_checks",
    "effect_metrics",
    "embed_pass",
    "eval_kinds",
    "main",
    "model_passes",
    "run",
]

logger = logging.getLogger("pipeline.evaluate")

PLUGIN_FILE = "plugin.pt"
BASELINE, MODEL = "sam", "stable_sam"
# The targets of the effect check (values in percent points).
MIN_GAIN = 5.0
GT_BOX_TOLERANCE = 1.0


@dataclass(frozen=True)
class EvaluatePaths:
    base: Path  # models/base (sam.json)
    plugin: Path  # models/stable_sam (plugin.pt)
    raw: Path  # data/raw
    embeddings: Path  # data/embeddings (embed stage)
    results: Path  # reports/evaluation.json (full results)
    metrics: Path  # metrics/evaluate.json (the headline numbers, for DVC)
    effect: Path  # metrics/effect.json
    checks: Path  # metrics/effect_checks.json
    table: Path | None = None  # reports/evaluation.md
    per_image: Path | None = None  # reports/per_image.csv
    figures: Path | None = None  # plots/evaluate (PNG files)


@dataclass
class ModelPass:
    """One model and the settings evaluated on it (name -> context-manager factory)."""

    model: StableSam
    settings: dict[str, Callable[[], Any]]
    embedded: int = field(default=0)  # images this model embedded itself (encoder tuned)


def model_passes(base: Path, plugin_dir: Path, *, device: str = "auto") -> tuple[list[ModelPass], str]:
    """The models that produce the "sam" and "stable_sam" settings, and how the baseline is made.

    A checkpoint that trains nothing of SAM itself gives one model evaluated twice: plug-ins off
    ("sam") and on ("stable_sam"). One that also changed SAM's weights (tuning.decoder or
    tuning.encoder not frozen) gets a separate plain SAM as its baseline.
    """
    source = read_sam_source(base)
    model = sam_model(source, plugin_checkpoint=plugin_dir / PLUGIN_FILE, device=device)
    tuning = model.tuning
    if tuning.decoder == "frozen" and tuning.encoder == "frozen":
        return (
            [ModelPass(model, {BASELINE: model.plugins_disabled, MODEL: contextlib.nullcontext})],
            "same model with the plug-ins disabled",
        )
    vanilla = sam_model(source, device=device)
    how = (
        f"a separate plain SAM (the checkpoint tunes decoder={tuning.decoder}, encoder={tuning.encoder}, "
        "so plug-ins off is not SAM)"
    )
    return [
        ModelPass(vanilla, {BASELINE: contextlib.nullcontext}),
        ModelPass(model, {MODEL: contextlib.nullcontext}),
    ], how


def eval_kinds(prompts: Sequence[str]) -> list[str]:
    """``eval.prompts`` plus the prompt types effect.json needs, in order, without duplicates."""
    kinds = list(dict.fromkeys(prompts))
    missing = [k for k in EFFECT_PROMPTS if k not in kinds]
    if missing:
        logger.info("eval.prompts lacks %s (needed by effect.json): evaluated too", missing)
    return kinds + missing


def embed_pass(
    p: ModelPass, images: Sequence[PreparedImage], cache: ReadOnlyEmbeddingCache, *, batch_size: int = 8
) -> list[torch.Tensor]:
    if not p.model.encoder_is_frozen:
        p.embedded += len(images)
    return embed_images(p.model, images, cache=cache, progress=False, batch_size=batch_size)


def evaluate_pass(
    p: ModelPass,
    images: Sequence[PreparedImage],
    embeddings: Sequence[torch.Tensor],
    cfg: EvalConfig,
    *,
    kinds: Sequence[str],
    dataset: str,
    draws: int,
    draw_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per-image records of one model pass over ``images`` under the evaluation config's prompt
    settings (noise scale, box IoU floor, multimask, seed): the evaluate stage and the sweeps share it."""
    return evaluate_prompts(
        p.model,
        images,
        embeddings,
        kinds=kinds,
        draws=draws,
        draw_ids=draw_ids,
        seed=cfg.seed,
        settings=p.settings,
        noise_scale=cfg.noise_scale,
        min_iou=cfg.min_box_iou,
        multimask_output=cfg.multimask_output,
        dataset=dataset,
        progress=False,
    )


def _figure_indices(count: int, wanted: int) -> set[int]:
    if wanted <= 0 or count == 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(wanted, count)).round()}


def _to_frame(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resample of an original-resolution mask to the displayed model frame."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.ix_(rows, cols)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _draw_figures(
    passes: Sequence[ModelPass],
    embeddings: Sequence[torch.Tensor],
    image: PreparedImage,
    *,
    dataset: str,
    cfg: EvalConfig,
    out: Path,
) -> dict[Path, bytes]:
    """SAM vs Stable-SAM under the same noisy box and the same single click; DSP offsets.

    Returns the PNG files (path under ``out`` -> content): they are written with the other outputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    from stable_sam.visualize import MaskPanel, compare_masks, offsets_figure

    frame = image.input_image
    size = frame.shape[:2]
    mask_input_size = passes[0].model.mask_input_size
    panels, offset_entries = [], []
    for kind, label in (("noisy_box", "noisy box"), ("point_1", "1 click")):
        (prompt,) = eval_prompts(
            image,
            kind,
            draws=1,
            seed=cfg.seed,
            mask_input_size=mask_input_size,
            noise_scale=cfg.noise_scale,
            min_iou=cfg.min_box_iou,
        )
        decoded = {}
        for p, embedding in zip(passes, embeddings):
            for setting, context in p.settings.items():
                with context():
                    decoded[setting] = decode_prompts(
                        p.model, embedding, [prompt], image=image, multimask_output=cfg.multimask_output
                    )
        sam, stable = decoded[BASELINE], decoded[MODEL]
        panels.append(
            MaskPanel(
                label=label,
                prompt=prompt,
                sam_mask=_to_frame(sam.masks[0], size),
                stable_mask=_to_frame(stable.masks[0], size),
                sam_iou=mask_iou(image.mask, sam.masks[0]),
                stable_iou=mask_iou(image.mask, stable.masks[0]),
            )
        )
        if stable.offsets is not None:
            alpha = "" if stable.alpha1 is None else f", α1 = {stable.alpha1[0]:.2f}"
            offset_entries.append(
                (
                    f"DSP offsets · {label}{alpha}",
                    prompt,
                    stable.offsets[0].numpy(),
                    _to_frame(stable.masks[0], size),
                )
            )
    stem = _safe(f"{dataset}_{image.name}")
    rendered = {}
    fig = compare_masks(frame, _to_frame(image.mask, size), panels, title=f"{dataset} · {image.name}")
    rendered[out / f"{stem}_sam_vs_stable_sam.png"] = _png_bytes(fig)
    if offset_entries:
        fig = offsets_figure(frame, offset_entries, title=f"{dataset} · {image.name}")
        rendered[out / f"{stem}_offsets.png"] = _png_bytes(fig)
    return rendered


def _png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def compact_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the full results that ``dvc metrics show/diff`` should list.

    The macro mean per model and prompt type (mIoU, mBIoU, ST, α1), COCO mAP / mAP50 per set, the
    encoder passes this stage needed and its wall time.
    """
    keys = ("miou", "mbiou", "st", "alpha1")
    return {
        "mean": {
            setting: {kind: {k: _num(f[k]) for k in keys if k in f} for kind, f in kinds.items()}
            for setting, kinds in results["mean"].items()
        },
        "coco": {
            name: {f"{s}_{k}": _num(entry[s][k]) for s in (BASELINE, MODEL) for k in ("map", "map50")}
            for name, entry in results["coco"].items()
        },
        "encoder_passes": results["embedding_cache"]["encoder_passes"],
        "seconds": results["seconds"]["total"],
    }


def effect_metrics(mean: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """effect.json: {"base": {PROMPT: {miou, mbiou, st}}, "stable_sam": {PROMPT: {..., alpha1}}}.

    From the macro mean over the evaluation sets; a GT box is deterministic, so its ST is 100.
    """

    def entry(setting: str, kind: str, with_alpha: bool) -> dict[str, Any]:
        figures = mean.get(setting, {}).get(kind, {})
        value = {
            "miou": _num(figures.get("miou")),
            "mbiou": _num(figures.get("mbiou")),
            "st": 100.0 if kind == "gt_box" else _num(figures.get("st")),
        }
        if with_alpha:
            value["alpha1"] = _num(figures.get("alpha1"))
        return value

    return {
        "base": {kind: entry(BASELINE, kind, False) for kind in EFFECT_PROMPTS},
        "stable_sam": {kind: entry(MODEL, kind, True) for kind in EFFECT_PROMPTS},
    }


def _num(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return round(float(value), 4)


def effect_checks(effect: dict[str, Any]) -> dict[str, Any]:
    """Whether each target holds (percent points); None values count as not holding."""
    base, stable = effect["base"], effect["stable_sam"]

    def gain(kind: str, key: str, description: str) -> dict[str, Any]:
        b, s = base[kind][key], stable[kind][key]
        delta = None if b is None or s is None else round(s - b, 4)
        return {
            "description": description,
            "rule": f"Stable-SAM >= SAM + {MIN_GAIN:g}",
            "base": b,
            "stable_sam": s,
            "value": delta,
            "holds": delta is not None and delta >= MIN_GAIN,
        }

    b, s = base["gt_box"]["miou"], stable["gt_box"]["miou"]
    gt_delta = None if b is None or s is None else round(s - b, 4)
    a1, a10 = stable["point_1"]["alpha1"], stable["point_10"]["alpha1"]
    checks = {
        "noisy_box_miou": gain("noisy_box", "miou", "Noisy-box mIoU gain"),
        "noisy_box_st": gain("noisy_box", "st", "Noisy-box ST gain"),
        "point_1_miou": gain("point_1", "miou", "1-point mIoU gain"),
        "gt_box_miou": {
            "description": "GT-box mIoU change",
            "rule": f"|Stable-SAM - SAM| <= {GT_BOX_TOLERANCE:g}",
            "base": b,
            "stable_sam": s,
            "value": gt_delta,
            "holds": gt_delta is not None and abs(gt_delta) <= GT_BOX_TOLERANCE,
        },
        "alpha1_fewer_points": {
            "description": "α1 (1 point) - α1 (10 points)",
            "rule": "α1(1 point) > α1(10 points)",
            "point_1": a1,
            "point_10": a10,
            "value": None if a1 is None or a10 is None else round(a1 - a10, 4),
            "holds": a1 is not None and a10 is not None and a1 > a10,
        },
    }
    checks["all_hold"] = all(c["holds"] for c in checks.values())
    return checks


def _write_csv(outputs: AtomicFileSet, path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with outputs.open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _merge_coco(into: dict[str, CocoResult], part: dict[str, CocoResult]) -> None:
    for name, result in part.items():
        target = into.setdefault(name, CocoResult())
        target.detections.extend(result.detections)
        target.prompted += result.prompted
        target.skipped += result.skipped
        target.escalated += result.escalated


def run(params: Params, paths: EvaluatePaths, *, tracker: Any = None) -> dict[str, Any]:
    """Evaluate SAM and Stable-SAM; write metrics, effect, checks, table, per-image CSV, figures."""
    from .report import evaluation_markdown

    cfg = params.eval
    set_threads(cfg.threads)
    started = time.perf_counter()
    kinds = eval_kinds(cfg.prompts)
    passes, baseline_how = model_passes(paths.base, paths.plugin, device=cfg.device)
    raw = read_raw_manifest(paths.raw)
    resize, size = params.data.eval_resize, passes[0].model.img_size
    cache = ReadOnlyEmbeddingCache(paths.embeddings, max_memory_items=2 * 32)
    records: list[dict[str, Any]] = []
    rendered: dict[Path, bytes] = {}  # the figures, written with the other outputs at the end
    images: dict[str, int] = {}
    skipped: dict[str, dict[str, Any]] = {}  # files left out of each set, never replaced by others
    seconds: dict[str, float] = {}
    folders: list[Path] = []  # of the evaluation sets

    for d, (name, dataset) in enumerate(hq_sets(params, raw)):
        t0 = time.perf_counter()
        wanted = _figure_indices(len(dataset), cfg.num_figures) if d == 0 and paths.figures else set()
        for chunk in hq_chunks(dataset, resize=resize, image_size=size):
            chunk_embeddings = []
            for p in passes:
                embeddings = embed_pass(p, chunk, cache, batch_size=cfg.embed_batch_size)
                chunk_embeddings.append(embeddings)
                records += evaluate_pass(
                    p, chunk, embeddings, cfg, kinds=kinds, dataset=name, draws=cfg.draws
                )
            for j, image in enumerate(chunk):
                if image.index in wanted and image.frame_mask.any():
                    with torch.no_grad():
                        rendered |= _draw_figures(
                            passes,
                            [e[j] for e in chunk_embeddings],
                            image,
                            dataset=name,
                            cfg=cfg,
                            out=paths.figures,
                        )
        images[name] = len(dataset)
        # MLflow input: the split's folder (from its files), not the dataset's root (train and val)
        folders.append(common_folder(f for pair in dataset.pairs for f in (pair.image_path, pair.mask_path)))
        skipped[name] = {"count": dataset.num_skipped, "files": dataset.skipped_dicts()}
        if dataset.num_skipped:
            logger.warning(
                "%s: %d file(s) skipped, not evaluated (evaluation.json: skipped)", name, dataset.num_skipped
            )
        seconds[name] = round(time.perf_counter() - t0, 2)
        logger.info("%s: %d images, %d prompt types, %.1f s", name, len(dataset), len(kinds), seconds[name])

    coco_metrics: dict[str, Any] = {}
    for name, coco in coco_sets(params, raw):
        t0 = time.perf_counter()
        results: dict[str, CocoResult] = {}
        for chunk in coco_chunks(coco, resize=resize, image_size=size):
            for p in passes:
                embeddings = embed_pass(p, [c.image for c in chunk], cache, batch_size=cfg.embed_batch_size)
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
                _merge_coco(results, part)
        gt = coco_gt_subset(coco.coco.dataset, coco.image_ids)
        entry: dict[str, Any] = {}
        for setting, result in results.items():
            ap = coco_mask_ap(gt, result.detections)
            entry[setting] = {"map": 100 * ap["map"], "map50": 100 * ap["map50"]}
        any_result = next(iter(results.values()))
        entry.update(
            images=len(coco),
            instances=any_result.prompted + any_result.skipped,
            prompted=any_result.prompted,
            escalated=any_result.escalated,
        )
        coco_metrics[name] = entry
        seconds[f"coco:{name}"] = round(time.perf_counter() - t0, 2)
        logger.info(
            "%s COCO N-Box (%.1f-%.1f): mAP SAM %.1f, Stable-SAM %.1f (%d instances, %d escalated) in %.1f s",
            name, cfg.coco_min_box_iou, cfg.coco_max_box_iou, entry[BASELINE]["map"], entry[MODEL]["map"],
            entry["instances"], entry["escalated"], seconds[f"coco:{name}"],
        )  # fmt: skip

    datasets = {
        name: summarize([r for r in records if r["dataset"] == name]) for name in dict.fromkeys(images)
    }
    mean = summarize(records) if records else {}
    effect = effect_metrics(mean)
    checks = effect_checks(effect)
    bypassed = [
        f"{'stable_sam' if MODEL in p.settings else 'sam'}: encoder tuned ({p.model.tuning.encoder}), "
        f"{p.embedded} images embedded without the cache"
        for p in passes
        if not p.model.encoder_is_frozen
    ]
    for line in bypassed:
        logger.info("embedding cache bypassed: %s", line)
    metrics: dict[str, Any] = {
        "sam_type": passes[-1].model.sam_type,
        "datasets": datasets,
        "mean": mean,
        "mean_over": list(images),
        "coco": coco_metrics,
        "alpha1": {kind: figures.get("alpha1") for kind, figures in mean.get(MODEL, {}).items()},
        "images": images,
        "skipped": skipped,
        "prompts": kinds,
        "draws": cfg.draws,
        "baseline": baseline_how,
        "embedding_cache": {
            "hits": cache.hits,
            "computed_here": cache.computed,
            "bypassed": bypassed,
            "encoder_passes": cache.computed + sum(p.embedded for p in passes),
        },
        "trainable_parameters": passes[-1].model.num_trainable_parameters(),
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 2)},
    }
    if cache.computed:
        logger.warning(
            "%d embeddings were not in %s and were computed here: rerun the embed stage",
            cache.computed,
            paths.embeddings,
        )
    # One set: all new versions are written before any old one is replaced (see AtomicFileSet),
    # so a failure or a kill leaves the previous run's files together, never a mix of two runs.
    figures = list(rendered)
    with AtomicFileSet() as outputs:
        for path, png in rendered.items():
            outputs.write_bytes(path, png)
        outputs.write_text(paths.results, json_text(metrics))
        outputs.write_text(paths.metrics, json_text(compact_metrics(metrics)))
        outputs.write_text(paths.effect, json_text(effect))
        outputs.write_text(paths.checks, json_text(checks))
        if paths.table is not None:
            outputs.write_text(
                paths.table, evaluation_markdown(metrics, figures=figures, relative_to=paths.table.parent)
            )
        if paths.per_image is not None:
            _write_csv(outputs, paths.per_image, per_image_rows(records, baseline=BASELINE, model=MODEL))
    logger.info(
        "effect (mean over %s): noisy box mIoU %s -> %s, 1 point mIoU %s -> %s; all targets hold: %s",
        list(images), effect["base"]["noisy_box"]["miou"], effect["stable_sam"]["noisy_box"]["miou"],
        effect["base"]["point_1"]["miou"], effect["stable_sam"]["point_1"]["miou"], checks["all_hold"],
    )  # fmt: skip
    if tracker is not None:
        folders += [raw.dataset_root(spec) for spec in sorted(set(params.data.val) & set(COCO_ONLY))]
        for folder in folders:
            tracker.log_dataset(folder, context="evaluation")
        for path in figures:
            tracker.log_figure(path)
    metrics["figures"] = [str(p) for p in figures]
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("SAM vs Stable-SAM evaluation (stage 'evaluate').")
    for name, help_text in [
        ("--base", "base model folder (sam.json)"),
        ("--plugin", "plug-in folder (plugin.pt)"),
        ("--raw", "raw-data folder with manifest.json"),
        ("--embeddings", "embedding cache folder (embed stage)"),
        ("--results", "full results JSON"),
        ("--metrics", "metrics JSON (headline numbers, for DVC)"),
        ("--effect", "effect.json (headline numbers)"),
        ("--checks", "effect_checks.json (targets)"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    parser.add_argument("--table", type=Path, default=None, help="markdown tables")
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
        effect=args.effect,
        checks=args.checks,
        table=args.table,
        per_image=args.per_image,
        figures=args.figures,
    )
    from .tracking import stage_run

    with stage_run("evaluate", params, params_path=Path(args.params)) as tracker:
        metrics = run(params, paths, tracker=tracker)
        tracker.log_metrics(
            {
                "mean": metrics["mean"],
                "coco": metrics["coco"],
                "effect_checks_hold": float(_all_hold(paths.checks)),
            }
        )
        tracker.log_metrics(_headline(metrics["mean"]), headline=True)
        tracker.log_evaluated_checkpoint(paths.plugin / PLUGIN_FILE)
        tracker.set_tags(
            {"evaluate.baseline": metrics["baseline"], "evaluate.datasets": ",".join(metrics["images"])}
        )
        for path in (paths.results, paths.metrics, paths.effect, paths.checks, paths.table, paths.per_image):
            if path is not None:
                tracker.log_artifact(path, artifact_path="evaluation")
    return metrics


def _headline(mean: dict[str, Any]) -> dict[str, Any]:
    """mIoU of SAM, of Stable-SAM and their difference per prompt type (MLflow: on the parent run too)."""
    sam = mean.get(BASELINE, {})
    pairs = {k: (sam.get(k, {}).get("miou"), f.get("miou")) for k, f in mean.get(MODEL, {}).items()}
    return {
        f"headline.{kind}.miou": {BASELINE: base, MODEL: ours, "delta": ours - base}
        for kind, (base, ours) in pairs.items()
        if isinstance(base, (int, float)) and isinstance(ours, (int, float))
    }


def _all_hold(checks: Path) -> bool:
    import json

    return bool(json.loads(checks.read_text()).get("all_hold"))


if __name__ == "__main__":
    main()
