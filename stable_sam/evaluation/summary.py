"""Summaries of per-prompt records: mIoU, boundary mIoU, stability, per image rows."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["per_image_rows", "summarize"]


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Aggregate records into {setting: {kind: figures}} in percent, the paper's layout.

    Figures: ``miou`` / ``mbiou`` = mean over draws of the dataset mean over images (for one
    dataset; several datasets are macro-averaged, HQ-SAM's convention), ``miou_std`` = std over
    draws of that dataset-level mIoU (Table S6's ±), ``st`` = mean over images of the stability
    of the draws (random kinds only), ``alpha1`` = mean α1 over images and draws, macro-averaged
    over datasets (plug-in settings only), ``n`` = images.
    """
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[(record["setting"], record["kind"])].append(record)
    summary: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (setting, kind), rows in by_key.items():
        predictions = [r for r in rows if r["draw"] >= 0]
        datasets = sorted({r["dataset"] for r in predictions})
        per_draw: dict[int, list[float]] = defaultdict(list)
        per_draw_b: dict[int, list[float]] = defaultdict(list)
        for draw in sorted({r["draw"] for r in predictions}):
            for ds in datasets:
                sel = [r for r in predictions if r["draw"] == draw and r["dataset"] == ds]
                per_draw[draw].append(_nanmean(r["iou"] for r in sel))
                per_draw_b[draw].append(_nanmean(r["biou"] for r in sel))
        draw_miou = [float(np.mean(v)) for v in per_draw.values()]
        draw_mbiou = [float(np.mean(v)) for v in per_draw_b.values()]
        figures = {
            "miou": 100 * float(np.mean(draw_miou)),
            "miou_std": 100 * float(np.std(draw_miou)),
            "mbiou": 100 * float(np.mean(draw_mbiou)),
            "n": len({(r["dataset"], r["image"]) for r in predictions}),
        }
        st_rows = [r for r in rows if r["draw"] == -1]
        if st_rows:
            figures["st"] = 100 * float(
                np.mean([_nanmean(r["st"] for r in st_rows if r["dataset"] == ds) for ds in datasets])
            )
        # Macro average over datasets, like every other figure (Table S7 averages 4 datasets).
        alphas = [
            _nanmean(r["alpha1"] for r in predictions if r["dataset"] == ds and r.get("alpha1") is not None)
            for ds in datasets
        ]
        alphas = [a for a in alphas if not math.isnan(a)]
        if alphas:
            figures["alpha1"] = float(np.mean(alphas))
        summary[setting][kind] = figures
    return dict(summary)


def per_image_rows(
    records: Sequence[dict[str, Any]], *, baseline: str = "sam", model: str = "stable_sam"
) -> list[dict[str, Any]]:
    """One row per (dataset, image, kind): baseline vs model, averaged over the draws.

    Columns: dataset, image, kind, draws, ``iou_<setting>``, ``biou_<setting>``, ``st_<setting>``
    (random kinds), ``predicted_iou_<setting>`` for both settings, ``delta_iou`` / ``delta_biou``
    (model - baseline) and ``alpha1`` (the model's mean α1, if it routes). Values in [0, 1];
    sorting by ``delta_iou`` shows where the model loses to the baseline.
    """
    grouped: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in records:
        if r["setting"] in (baseline, model):
            grouped[(r["dataset"], r["image"], r["kind"])][r["setting"]].append(r)
    rows = []
    for (dataset, image, kind), by_setting in grouped.items():
        row: dict[str, Any] = {"dataset": dataset, "image": image, "kind": kind}
        for setting in (baseline, model):
            preds = [r for r in by_setting.get(setting, []) if r["draw"] >= 0]
            st = [r["st"] for r in by_setting.get(setting, []) if r["draw"] == -1]
            row["draws"] = max(row.get("draws", 0), len(preds))
            row[f"iou_{setting}"] = _nanmean(r["iou"] for r in preds)
            row[f"biou_{setting}"] = _nanmean(r["biou"] for r in preds)
            row[f"st_{setting}"] = st[0] if st else float("nan")
            row[f"predicted_iou_{setting}"] = _nanmean(r["predicted_iou"] for r in preds)
            if setting == model:
                row["alpha1"] = _nanmean(r["alpha1"] for r in preds if r.get("alpha1") is not None)
        row["delta_iou"] = row[f"iou_{model}"] - row[f"iou_{baseline}"]
        row["delta_biou"] = row[f"biou_{model}"] - row[f"biou_{baseline}"]
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["image"], r["kind"]))
    return rows
