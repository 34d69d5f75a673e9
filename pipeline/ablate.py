"""Stage ``ablate``: the decoder-only ablation sweeps on the cached embeddings.

``dvc.yaml``: ``foreach: [points, alpha1, looseness]``, in the default ``dvc repro``::

    python -m pipeline.ablate --sweep points --base models/base --plugin models/stable_sam \\
        --raw data/raw --embeddings data/embeddings --results reports/ablate_points.json \\
        --metrics metrics/ablate_points.json --plot plots/ablate/points.csv \\
        --figure reports/figures/points.png

- ``points``: k random positive points for k in ``ablate.point_counts``, SAM and Stable-SAM,
  mIoU ± std over the prompt draws ``ablate.seeds`` (the paper's Table S6) and the learned α1 per
  k (Table S7).
- ``alpha1``: α1 forced to each of ``ablate.alpha1_values`` for each prompt kind of
  ``ablate.alpha1_prompts`` (Table S8: 1 and 10 points; here also the GT and the noisy box, which
  shows what routing by prompt looseness could gain), the same prompts for every α1; α1 = 0 must
  reproduce SAM exactly, which is checked on every prediction (``alpha0_equals_sam``). A
  checkpoint without plug-ins (LoRA, adapters) has no α1 to force: the sweep says so
  (``applicable: false``) instead of failing.
- ``looseness``: noisy boxes at each of ``ablate.noise_scales`` (the same draws at every scale,
  0 = the GT box) and the click counts of the points sweep.

The draws are the evaluate stage's draws (``rng([eval.seed, draw, image, prompt type])`` with
draw in ``ablate.seeds``), so 1/3/10-point numbers agree with the evaluation. Embeddings come from
the ``embed`` stage (read-only): a sweep costs decoder passes only.

Outputs, JSON, CSV and a figure (the ``report`` stage renders the tables): the full results
(``reports/ablate_<sweep>.json``), the curve as DVC plot data (``plots/ablate/<sweep>.csv``, drawn by
the top-level ``plots:`` of ``dvc.yaml``), a figure, and a few summary numbers as DVC metrics
(:func:`summary_metrics`). Wall times go to MLflow and the log only.

The trained variants (``ablate.variants``) are DVC experiments of the whole pipeline, not a sweep
here: see :mod:`pipeline.variants`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import summarize

from .effect import BASELINE, MODEL, prompt_label, rounded
from .eval_inputs import ModelPass, embed_pass, evaluate_pass, hq_chunks, hq_sets, model_passes, set_threads
from .params import Params, load_params
from .raw_data import read_raw_manifest
from .sam_source import write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = ["SWEEPS", "SweepPaths", "main", "run", "summary_metrics"]

logger = logging.getLogger("pipeline.ablate")

SWEEPS = ("points", "alpha1", "looseness")


@dataclass(frozen=True)
class SweepPaths:
    base: Path  # models/base
    plugin: Path  # models/stable_sam
    raw: Path  # data/raw
    embeddings: Path  # data/embeddings
    results: Path  # reports/ablate_<sweep>.json (full results)
    metrics: Path  # metrics/ablate_<sweep>.json (summary numbers, for DVC)
    plot: Path  # plots/ablate/<sweep>.csv (DVC plot data)
    figure: Path | None = None  # reports/figures/<sweep>.png


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
    passes, how = model_passes(
        paths.base, paths.plugin, device=params.eval.device, encoder_precision=params.sam.encoder_precision
    )
    if extra_settings is not None:
        for p in passes:
            if MODEL in p.settings:
                p.settings.update(extra_settings(p))
    raw = read_raw_manifest(paths.raw)
    cache = ReadOnlyEmbeddingCache(paths.embeddings, max_memory_items=64)
    size = passes[0].model.img_size
    cfg, seeds = params.eval, list(params.ablate.seeds)
    records: list[dict[str, Any]] = []
    images: dict[str, int] = {}
    for name, dataset, resize in hq_sets(params, raw):
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


def _common(
    params: Params, images: dict[str, int], how: str, cache: ReadOnlyEmbeddingCache
) -> dict[str, Any]:
    return {
        "draws": list(params.ablate.seeds),
        "images": images,
        "baseline": how,
        "embedding_cache_hits": cache.hits,
    }


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
        **_common(params, images, how, cache),
        "figures": _save_figure(fig, paths.figure),
    }


def _alpha0_check(records: Sequence[dict[str, Any]]) -> tuple[bool, float]:
    """Whether α1 = 0 gives SAM's predictions exactly: every record's IoU and boundary IoU."""
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
    return bool(diffs) and bool(max_diff == 0.0), max_diff


def _alpha1(params: Params, paths: SweepPaths) -> dict[str, Any]:
    values = list(dict.fromkeys(float(v) for v in params.ablate.alpha1_values))
    kinds = list(params.ablate.alpha1_prompts)
    plugged: list[bool] = []

    def forced(p: ModelPass) -> dict[str, Callable[[], Any]]:
        plugged.append(bool(p.model.sites))
        if not p.model.sites:  # LoRA / adapter checkpoints: no routing weight to force
            return {}
        settings = {_alpha_name(v): (lambda v=v: p.model.forced_alpha1(v)) for v in values}
        if 0.0 not in values:
            settings[_alpha_name(0.0)] = lambda: p.model.forced_alpha1(0.0)  # for the SAM check
        return settings

    records, images, how, cache = _sweep_records(params, paths, kinds=kinds, extra_settings=forced)
    applicable = all(plugged)
    summary = summarize(records)
    curves = {
        kind: {
            "forced": {f"{v:g}": _figures(summary.get(_alpha_name(v), {}), kind) for v in values},
            "learned": _figures(summary.get(MODEL, {}), kind),
            BASELINE: _figures(summary.get(BASELINE, {}), kind),
        }
        for kind in kinds
    }
    equal, max_diff = _alpha0_check(records) if applicable else (None, None)
    if applicable and not equal:
        logger.warning("alpha1 = 0 differs from SAM (max |ΔIoU| %.3g): %s", max_diff, how)
    if not applicable:
        logger.warning("the checkpoint has no plug-ins: no α1 to force, the alpha1 sweep does not apply")
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

    fig = sweep_figure(
        values,
        {prompt_label(k): ([r[k] for r in rows], [r[f"{k}_std"] for r in rows]) for k in kinds},
        xlabel="forced α1",
        title="mIoU vs forced α1 (α1 = 0 is SAM)",
        reference={f"SAM, {prompt_label(k)}": curves[k][BASELINE].get("miou") for k in kinds},
    )
    return {
        "sweep": "alpha1",
        "applicable": applicable,
        "prompts": kinds,
        "alpha1_values": values,
        "alpha1": curves,
        "alpha0_equals_sam": equal,
        "alpha0_max_abs_diff": max_diff,
        **_common(params, images, how, cache),
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
    # The plot data is the box-noise curve; the clicks curve is the points sweep's (same draws).
    rows = [
        {"noise_scale": x, **{f"{s}{suffix}": boxes[s][i].get(key) for s in (BASELINE, MODEL)
                              for suffix, key in (("", "miou"), ("_std", "miou_std"))}}
        for i, x in enumerate(scales)
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
        **_common(params, images, how, cache),
        "figures": _save_figure(fig, paths.figure),
    }


def _mean_miou(by_x: dict[str, Any]) -> dict[str, float | None]:
    """Per setting, the mean mIoU over a curve's points (None when a point has no value)."""
    out: dict[str, float | None] = {}
    for s in (BASELINE, MODEL):
        values = [v.get(s, {}).get("miou") for v in by_x.values()]
        out[s] = None if not values or None in values else rounded(sum(values) / len(values))
    return out


def summary_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """A sweep's few numbers for ``dvc metrics``/``dvc exp show`` (its curve is in the plot CSV).

    points: the mean mIoU over the point counts; looseness: the mean mIoU over the box noise
    scales (per model); alpha1: whether α1 = 0 reproduces SAM, and the largest difference.
    """
    if results["sweep"] == "points":
        return {"mean_miou": _mean_miou(results["points"])}
    if results["sweep"] == "looseness":
        return {"box_noise_mean_miou": _mean_miou(results["box_noise"])}
    return {
        "alpha0_equals_sam": results["alpha0_equals_sam"],
        "alpha0_max_abs_diff": results["alpha0_max_abs_diff"],
    }


# The x column of each sweep's plot CSV, and the factor that makes it an MLflow step (an integer).
_PLOT_X = {"points": ("points", 1), "alpha1": ("alpha1", 100), "looseness": ("noise_scale", 100)}


def _log(tracker: Any, sweep: str, paths: SweepPaths, results: dict[str, Any], seconds: float) -> None:
    """The curve as an MLflow series (step = the sweep value), the summary, figure and files."""
    x, scale = _PLOT_X[sweep]
    with open(paths.plot, newline="") as f:
        rows = [
            {k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(f)
        ]
    tracker.log_metrics_series(
        [
            {"step": round(r[x] * scale), **{k: v for k, v in r.items() if k != x and v is not None}}
            for r in rows
        ]
    )
    summary = {k: float(v) if isinstance(v, bool) else v for k, v in summary_metrics(results).items()}
    tracker.log_metrics({**summary, "seconds": seconds})
    for f in results["figures"]:
        tracker.log_figure(f)
    for path in (paths.results, paths.metrics, paths.plot):
        tracker.log_artifact(path, artifact_path="ablate")


def run(params: Params, paths: SweepPaths, *, sweep: str, tracker: Any = None) -> dict[str, Any]:
    """Run one decoder-only sweep; write its results, summary metrics, plot data and figure.

    Returns the results plus ``seconds`` (the wall time, which no output holds).
    """
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; choose from {SWEEPS}")
    set_threads(params.eval.threads)
    started = time.perf_counter()
    results = {"points": _points, "alpha1": _alpha1, "looseness": _looseness}[sweep](params, paths)
    write_json_atomic(paths.results, results)
    write_json_atomic(paths.metrics, summary_metrics(results))
    seconds = round(time.perf_counter() - started, 2)
    logger.info("sweep %s: %s images in %.1f s", sweep, results["images"], seconds)
    if tracker is not None:
        _log(tracker, sweep, paths, results, seconds)
    return {**results, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Decoder-only ablation sweeps (stage 'ablate').")
    parser.add_argument("--sweep", required=True, choices=SWEEPS)
    for name, help_text in [
        ("--base", "base model folder (sam.json)"),
        ("--plugin", "plug-in folder (plugin.pt)"),
        ("--raw", "raw-data folder with manifest.json"),
        ("--embeddings", "embedding cache folder (embed stage)"),
        ("--results", "full results JSON"),
        ("--metrics", "summary metrics JSON (for DVC)"),
        ("--plot", "the curve's CSV (DVC plot data)"),
    ]:
        parser.add_argument(name, type=Path, required=True, help=help_text)
    parser.add_argument("--figure", type=Path, default=None, help="PNG figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = SweepPaths(
        args.base, args.plugin, args.raw, args.embeddings, args.results, args.metrics, args.plot, args.figure
    )
    from .tracking import stage_run

    with stage_run("ablate", params, params_path=Path(args.params)) as tracker:
        tracker.set_tags({"ablate.sweep": args.sweep})
        return run(params, paths, sweep=args.sweep, tracker=tracker)


if __name__ == "__main__":
    main()
