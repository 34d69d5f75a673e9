"""Stage ``ablate``: the ablation sweeps, and the summary of the trained variants.

Decoder-only sweeps (``dvc.yaml``: ``foreach: [points, alpha1]``, in the default ``dvc repro``)::

    python -m pipeline.ablate --sweep points --base models/base --plugin models/stable_sam \\
        --raw data/raw --embeddings data/embeddings --results reports/ablate_points.json \\
        --metrics metrics/ablate_points.json --plot plots/ablate/points.csv \\
        --figure reports/figures/points.png --table reports/ablate_points.md

- ``points``: k random positive points for k in ``ablate.point_counts``, SAM and Stable-SAM,
  mIoU ± std over the prompt draws ``ablate.seeds`` (the paper's Table S6) and the learned α1 per
  k (Table S7).
- ``alpha1``: α1 forced to each of ``ablate.alpha1_values`` for k in ``ablate.alpha1_point_counts``
  points (Table S8), the same prompts for every α1; α1 = 0 must reproduce SAM exactly, which is
  checked on every prediction (``alpha0_equals_sam``).

The draws are the evaluate stage's draws (``rng([eval.seed, draw, image, prompt type])`` with
draw in ``ablate.seeds``), so 1/3/10-point numbers agree with the evaluation. Embeddings come from
the ``embed`` stage (read-only): a sweep costs decoder passes only.

Trained variants (``variants/dvc.yaml``, not in the default ``dvc repro``): each entry of
``ablate.variants`` (name -> {params key: value}) is trained by the ``train`` stage and evaluated by
the ``evaluate`` stage with ``--variant NAME``; this module's ``--sweep variants`` collects them
into one table::

    python -m pipeline.ablate --sweep variants --results variants/results \\
        --reference reports/evaluation.json --reference-train metrics/train.json \\
        --table variants/summary.md --metrics variants/summary.json
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import summarize

from .embed import hq_chunks, hq_sets, set_threads
from .evaluate import BASELINE, MODEL, ModelPass, embed_pass, evaluate_pass, model_passes
from .params import Params, load_params
from .raw_data import read_raw_manifest
from .readme_table import write_text_atomic
from .report import alpha1_markdown, looseness_markdown, points_markdown, variants_markdown
from .sam_source import write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = ["SWEEPS", "SweepPaths", "VariantsPaths", "main", "run", "summarize_variants"]

logger = logging.getLogger("pipeline.ablate")

SWEEPS = ("points", "alpha1", "looseness")


@dataclass(frozen=True)
class SweepPaths:
    base: Path  # models/base
    plugin: Path  # models/stable_sam
    raw: Path  # data/raw
    embeddings: Path  # data/embeddings
    results: Path  # reports/ablate_<sweep>.json (full results)
    metrics: Path  # metrics/ablate_<sweep>.json (the curve's numbers, for DVC)
    plot: Path  # plots/ablate/<sweep>.csv (DVC plot data)
    figure: Path | None = None  # reports/figures/<sweep>.png
    table: Path | None = None  # reports/ablate_<sweep>.md


def _alpha_name(value: float) -> str:
    return f"alpha1={value:g}"


def _sweep_records(
    params: Params,
    paths: SweepPaths,
    *,
    kinds: Sequence[str],
    extra_settings: Callable[[ModelPass], dict[str, Callable[[], Any]]] | None = None,
    noise_scales: Sequence[float] = (),
) -> tuple[list[dict[str, Any]], dict[str, int], str, ReadOnlyEmbeddingCache]:
    """Records of ``kinds``, plus noisy boxes at each of ``noise_scales`` (kind ``noisy_box@S``:
    the same random draws at every scale, so only the looseness changes)."""
    passes, how = model_passes(paths.base, paths.plugin, device=params.eval.device)
    if extra_settings is not None:
        for p in passes:
            if MODEL in p.settings:
                p.settings.update(extra_settings(p))
    raw = read_raw_manifest(paths.raw)
    cache = ReadOnlyEmbeddingCache(paths.embeddings, max_memory_items=64)
    resize, size = params.data.eval_resize, passes[0].model.img_size
    cfg, seeds = params.eval, list(params.ablate.seeds)
    records: list[dict[str, Any]] = []
    images: dict[str, int] = {}
    for name, dataset in hq_sets(params, raw):
        for chunk in hq_chunks(dataset, resize=resize, image_size=size):
            for p in passes:
                embeddings = embed_pass(p, chunk, cache, batch_size=cfg.embed_batch_size)
                records += evaluate_pass(
                    p, chunk, embeddings, cfg, kinds=kinds, dataset=name, draws=len(seeds), draw_ids=seeds,
                )  # fmt: skip
                for scale in noise_scales:
                    loose = evaluate_pass(
                        p, chunk, embeddings, dataclasses.replace(cfg, noise_scale=scale),
                        kinds=["noisy_box"], dataset=name, draws=len(seeds), draw_ids=seeds,
                    )  # fmt: skip
                    records += [{**r, "kind": f"noisy_box@{scale:g}"} for r in loose]
        images[name] = len(dataset)
    if cache.computed:
        logger.warning(
            "%d embeddings were missing from %s and computed here", cache.computed, paths.embeddings
        )
    return records, images, how, cache


def _figures(summary: dict[str, Any], kind: str) -> dict[str, Any]:
    figures = summary.get(kind, {})
    keys = ("miou", "miou_std", "mbiou", "st", "alpha1")
    return {k: figures[k] for k in keys if k in figures}


def _write_plot(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        )
    tmp.replace(path)


def _save_figure(fig: Any, path: Path | None) -> list[str]:
    if path is None:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return [str(path)]


def _points(params: Params, paths: SweepPaths) -> dict[str, Any]:
    counts = list(params.ablate.point_counts)
    kinds = [f"point_{k}" for k in counts]
    records, images, how, cache = _sweep_records(params, paths, kinds=kinds)
    summary = summarize(records)
    points = {
        str(k): {setting: _figures(summary.get(setting, {}), f"point_{k}") for setting in (BASELINE, MODEL)}
        for k in counts
    }
    rows = [
        {
            "points": k,
            "sam": points[str(k)][BASELINE].get("miou"),
            "sam_std": points[str(k)][BASELINE].get("miou_std"),
            "stable_sam": points[str(k)][MODEL].get("miou"),
            "stable_sam_std": points[str(k)][MODEL].get("miou_std"),
            "alpha1": points[str(k)][MODEL].get("alpha1"),
        }
        for k in counts
    ]
    _write_plot(paths.plot, rows)
    from stable_sam.visualize import sweep_figure

    fig = sweep_figure(
        counts,
        {
            "SAM": ([r["sam"] for r in rows], [r["sam_std"] for r in rows]),
            "Stable-SAM": ([r["stable_sam"] for r in rows], [r["stable_sam_std"] for r in rows]),
        },
        xlabel="number of prompt points",
        title="mIoU vs number of points (± std over draws)",
        log_x=True,
    )
    return {
        "sweep": "points",
        "points": points,
        "draws": list(params.ablate.seeds),
        "images": images,
        "baseline": how,
        "embedding_cache_hits": cache.hits,
        "figures": _save_figure(fig, paths.figure),
    }


def _alpha1(params: Params, paths: SweepPaths) -> dict[str, Any]:
    values = list(dict.fromkeys(float(v) for v in params.ablate.alpha1_values))
    kinds = [f"point_{k}" for k in params.ablate.alpha1_point_counts]

    def forced(p: ModelPass) -> dict[str, Callable[[], Any]]:
        if not p.model.sites:
            raise ValueError("the alpha1 sweep needs a model with plug-ins (plugin.variant != 'none')")
        settings = {_alpha_name(v): (lambda v=v: p.model.forced_alpha1(v)) for v in values}
        if 0.0 not in values:
            settings[_alpha_name(0.0)] = lambda: p.model.forced_alpha1(0.0)  # for the SAM check
        return settings

    records, images, how, cache = _sweep_records(params, paths, kinds=kinds, extra_settings=forced)
    summary = summarize(records)
    curves = {
        kind: {
            "forced": {f"{v:g}": _figures(summary.get(_alpha_name(v), {}), kind) for v in values},
            "learned": _figures(summary.get(MODEL, {}), kind),
            BASELINE: _figures(summary.get(BASELINE, {}), kind),
        }
        for kind in kinds
    }
    # α1 = 0 must give SAM's predictions exactly: compare every record's IoU and boundary IoU.
    key = ("dataset", "image", "kind", "draw")
    sam = {tuple(r[k] for k in key): r for r in records if r["setting"] == BASELINE and r["draw"] >= 0}
    zero = [r for r in records if r["setting"] == _alpha_name(0.0) and r["draw"] >= 0]
    diffs = [
        max(
            abs(r["iou"] - sam[tuple(r[k] for k in key)]["iou"]),
            abs(r["biou"] - sam[tuple(r[k] for k in key)]["biou"]),
        )
        for r in zero
    ]
    max_diff = float(max(diffs)) if diffs else float("nan")
    equal = bool(diffs) and bool(max_diff == 0.0)
    if not equal:
        logger.warning("alpha1 = 0 differs from SAM (max |ΔIoU| %.3g): %s", max_diff, how)
    rows = []
    for v in values:
        row: dict[str, Any] = {"alpha1": v}
        for kind in kinds:
            figures = curves[kind]["forced"][f"{v:g}"]
            row[kind] = figures.get("miou")
            row[f"{kind}_std"] = figures.get("miou_std")
        rows.append(row)
    _write_plot(paths.plot, rows)
    from stable_sam.visualize import sweep_figure

    from .readme_table import prompt_label

    fig = sweep_figure(
        values,
        {prompt_label(k): ([r[k] for r in rows], [r[f"{k}_std"] for r in rows]) for k in kinds},
        xlabel="forced α1",
        title="mIoU vs forced α1 (α1 = 0 is SAM)",
        reference={f"SAM, {prompt_label(k)}": curves[k][BASELINE].get("miou") for k in kinds},
    )
    return {
        "sweep": "alpha1",
        "alpha1_values": values,
        "alpha1": curves,
        "alpha0_equals_sam": equal,
        "alpha0_max_abs_diff": max_diff,
        "draws": list(params.ablate.seeds),
        "images": images,
        "baseline": how,
        "embedding_cache_hits": cache.hits,
        "figures": _save_figure(fig, paths.figure),
    }


def _looseness(params: Params, paths: SweepPaths) -> dict[str, Any]:
    """SAM vs Stable-SAM against prompt looseness: box noise scale and number of clicks, ± std."""
    scales = list(params.ablate.noise_scales)
    counts = list(params.ablate.point_counts)
    records, images, how, cache = _sweep_records(
        params, paths, kinds=[f"point_{k}" for k in counts], noise_scales=scales
    )
    summary = summarize(records)

    def curve(kinds: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        return {s: [_figures(summary.get(s, {}), k) for k in kinds] for s in (BASELINE, MODEL)}

    boxes = curve([f"noisy_box@{v:g}" for v in scales])
    clicks = curve([f"point_{k}" for k in counts])
    rows = [
        {"axis": axis, "x": x, **{f"{s}{suffix}": figs[s][i].get(key) for s in (BASELINE, MODEL)
                                  for suffix, key in (("", "miou"), ("_std", "miou_std"))}}
        for axis, xs, figs in (("box_noise", scales, boxes), ("clicks", counts, clicks))
        for i, x in enumerate(xs)
    ]  # fmt: skip
    _write_plot(paths.plot, rows)
    from stable_sam.visualize import looseness_figure

    def series(figs):
        return {
            label: ([f.get("miou") for f in figs[s]], [f.get("miou_std") for f in figs[s]])
            for label, s in (("SAM", BASELINE), ("Stable-SAM", MODEL))
        }

    fig = looseness_figure(scales, series(boxes), counts, series(clicks))
    return {
        "sweep": "looseness",
        "noise_scales": scales,
        "point_counts": counts,
        "box_noise": {f"{v:g}": {s: boxes[s][i] for s in (BASELINE, MODEL)} for i, v in enumerate(scales)},
        "clicks": {str(k): {s: clicks[s][i] for s in (BASELINE, MODEL)} for i, k in enumerate(counts)},
        "draws": list(params.ablate.seeds),
        "images": images,
        "baseline": how,
        "embedding_cache_hits": cache.hits,
        "figures": _save_figure(fig, paths.figure),
    }


def _compact(results: dict[str, Any]) -> dict[str, Any]:
    """The curve's numbers for ``dvc metrics``: mIoU (± std) per sweep value, α1, the α1 = 0 check."""
    if results["sweep"] == "looseness":
        return {
            axis: {x: {s: v[s].get("miou") for s in (BASELINE, MODEL)} for x, v in results[axis].items()}
            for axis in ("box_noise", "clicks")
        }
    if results["sweep"] == "points":
        return {
            "points": {
                k: {
                    "sam": v[BASELINE].get("miou"),
                    "sam_std": v[BASELINE].get("miou_std"),
                    "stable_sam": v[MODEL].get("miou"),
                    "stable_sam_std": v[MODEL].get("miou_std"),
                    "alpha1": v[MODEL].get("alpha1"),
                }
                for k, v in results["points"].items()
            },
            "seconds": results.get("seconds"),
        }
    return {
        "alpha1": {
            kind: {
                **{f"forced_{a}": f.get("miou") for a, f in curve["forced"].items()},
                "learned": curve["learned"].get("miou"),
                "learned_alpha1": curve["learned"].get("alpha1"),
                "sam": curve[BASELINE].get("miou"),
            }
            for kind, curve in results["alpha1"].items()
        },
        "alpha0_equals_sam": results["alpha0_equals_sam"],
        "seconds": results.get("seconds"),
    }


def run(params: Params, paths: SweepPaths, *, sweep: str, tracker: Any = None) -> dict[str, Any]:
    """Run one decoder-only sweep; write its metrics, plot data, figure and table."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose from {SWEEPS} (or 'variants')")
    set_threads(params.eval.threads)
    started = time.perf_counter()
    metrics = {"points": _points, "alpha1": _alpha1, "looseness": _looseness}[sweep](params, paths)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json_atomic(paths.results, metrics)
    write_json_atomic(paths.metrics, _compact(metrics))
    if paths.table is not None:
        tables = {"points": points_markdown, "alpha1": alpha1_markdown, "looseness": looseness_markdown}
        write_text_atomic(paths.table, tables[sweep](metrics))
    logger.info("sweep %s: %s images in %.1f s", sweep, metrics["images"], metrics["seconds"])
    if tracker is not None:
        if sweep != "looseness":  # its figure and CSV are the record (two x axes, no one series)
            with open(paths.plot, newline="") as f:
                rows = [
                    {k: float(v) if v not in ("", None) else None for k, v in r.items()}
                    for r in csv.DictReader(f)
                ]
            x = "points" if sweep == "points" else "alpha1"
            # Curves as MLflow series: the step is the sweep value (α1 in hundredths).
            scale = 1 if sweep == "points" else 100
            tracker.log_metrics_series(
                [
                    {"step": round(r[x] * scale), **{k: v for k, v in r.items() if k != x and v is not None}}
                    for r in rows
                ]
            )
        if sweep == "alpha1":
            tracker.log_metrics({"alpha0_equals_sam": float(metrics["alpha0_equals_sam"])})
        for f in metrics["figures"]:
            tracker.log_figure(f)
        for path in (paths.results, paths.metrics, paths.plot, paths.table):
            if path is not None:
                tracker.log_artifact(path, artifact_path="ablate")
    return metrics


# ------------------------------------------------------------------------------------------------
# Trained variants


@dataclass(frozen=True)
class VariantsPaths:
    results: Path  # variants/results: <name>/train.json and <name>/evaluation.json per variant
    reference: Path  # reports/evaluation.json (SAM and the full Stable-SAM of the main pipeline)
    table: Path  # variants/summary.md
    metrics: Path  # variants/summary.json
    reference_train: Path | None = None  # metrics/train.json


def _row(evaluation: dict[str, Any], setting: str) -> dict[str, Any]:
    mean = evaluation.get("mean", {}).get(setting, {})
    coco = [e[setting] for e in evaluation.get("coco", {}).values() if setting in e]
    row: dict[str, Any] = {
        "coco_map": sum(c["map"] for c in coco) / len(coco) if coco else None,
        "coco_map50": sum(c["map50"] for c in coco) / len(coco) if coco else None,
    }
    for kind in ("noisy_box", "point_1", "gt_box"):
        for key in ("miou", "mbiou", "st"):
            row[f"{kind}_{key}"] = mean.get(kind, {}).get(key)
    bypassed = evaluation.get("embedding_cache", {}).get("bypassed", [])
    row["cache"] = "bypassed (encoder tuned)" if any(setting in b for b in bypassed) else "shared"
    return row


def _overrides_text(overrides: dict[str, Any]) -> str:
    """``{"plugin.placements": ["block2"], "train.lsj": False}`` -> ``plugin.placements=[block2] train.lsj=false``."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if value is None:
            return "null"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(text(v) for v in value) + "]"
        return str(value)

    return " ".join(f"{key}={text(value)}" for key, value in overrides.items())


def summarize_variants(params: Params, paths: VariantsPaths, *, tracker: Any = None) -> dict[str, Any]:
    """One table: SAM, the full Stable-SAM and every trained variant of ``ablate.variants``."""
    reference = json.loads(paths.reference.read_text())
    reference_train = (
        json.loads(paths.reference_train.read_text())
        if paths.reference_train is not None and paths.reference_train.is_file()
        else {}
    )
    variants: dict[str, dict[str, Any]] = {
        "sam": {"label": "SAM", **_row(reference, BASELINE), "trainable_parameters": 0},
        "stable_sam": {
            "label": "Stable-SAM (DSP + DRP)",
            **_row(reference, MODEL),
            "trainable_parameters": reference_train.get("trainable_parameters"),
            "train_seconds": reference_train.get("fit_seconds"),
        },
    }
    missing = []
    for name, overrides in params.ablate.variants.items():
        folder = paths.results / name
        if not (folder / "evaluation.json").is_file():
            missing.append(name)
            continue
        evaluation = json.loads((folder / "evaluation.json").read_text())
        train = json.loads((folder / "train.json").read_text()) if (folder / "train.json").is_file() else {}
        variants[name] = {
            "label": name,
            "overrides": _overrides_text(overrides),
            **_row(evaluation, MODEL),
            "trainable_parameters": train.get("trainable_parameters"),
            "train_seconds": train.get("fit_seconds"),
            "evaluate_seconds": evaluation.get("seconds", {}).get("total"),
        }
    if missing:
        logger.warning("variants without results in %s: %s", paths.results, missing)
    summary = {"variants": variants, "missing": missing}
    write_json_atomic(paths.metrics, summary)
    write_text_atomic(
        paths.table,
        "# Stable-SAM variants\n\n"
        + variants_markdown(summary)
        + "\nSAM and Stable-SAM (DSP + DRP) come from the main pipeline's evaluate stage; each variant "
        "is trained by the same train stage and evaluated by the same evaluate stage with its overrides "
        "(`dvc repro variants/dvc.yaml`). Values in percent; train s = wall time of the Ray fit.\n",
    )
    if tracker is not None:
        tracker.log_metrics(
            {
                name: {k: v for k, v in row.items() if isinstance(v, (int, float))}
                for name, row in variants.items()
            }
        )
        tracker.log_artifact(paths.table, artifact_path="variants")
        tracker.log_artifact(paths.metrics, artifact_path="variants")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Ablation sweeps and the trained-variants summary (stage 'ablate').")
    parser.add_argument("--sweep", required=True, choices=[*SWEEPS, "variants"])
    for name in ("--base", "--plugin", "--raw", "--embeddings", "--plot", "--figure", "--table"):
        parser.add_argument(name, type=Path, default=None)
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    parser.add_argument(
        "--results",
        type=Path,
        required=True,
        help="full results JSON (variants: the per-variant results folder)",
    )
    parser.add_argument("--reference", type=Path, default=None, help="variants: reports/evaluation.json")
    parser.add_argument("--reference-train", type=Path, default=None, help="variants: metrics/train.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    if args.sweep == "variants":
        needed = {"--reference": args.reference, "--table": args.table}
    else:
        needed = {
            "--base": args.base,
            "--plugin": args.plugin,
            "--raw": args.raw,
            "--embeddings": args.embeddings,
            "--plot": args.plot,
        }
    absent = [k for k, v in needed.items() if v is None]
    if absent:
        parser.error(f"--sweep {args.sweep} needs {', '.join(absent)}")
    from .tracking import stage_run

    stage = "ablate_variants" if args.sweep == "variants" else "ablate"
    with stage_run(stage, params, params_path=Path(args.params)) as tracker:
        tracker.set_tags({"ablate.sweep": args.sweep})
        if args.sweep == "variants":
            paths = VariantsPaths(
                args.results, args.reference, args.table, args.metrics, args.reference_train
            )
            return summarize_variants(params, paths, tracker=tracker)
        paths = SweepPaths(
            args.base,
            args.plugin,
            args.raw,
            args.embeddings,
            args.results,
            args.metrics,
            args.plot,
            args.figure,
            args.table,
        )
        return run(params, paths, sweep=args.sweep, tracker=tracker)


if __name__ == "__main__":
    main()
