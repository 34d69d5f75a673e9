"""The markdown of the ``report`` stage: formatting, and the tables of each results file.

Only :mod:`pipeline.report` imports it (the one stage that renders markdown): the ``evaluate``
and ``ablate`` stages write JSON, CSV and figures, and every table here is built from those
files, so a caption change reruns the report alone. Missing values (None, NaN) print as an en dash.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .effect import BASELINE, MODEL, prompt_label

__all__ = [
    "CHECK_ORDER",
    "alpha1_markdown",
    "annotator_markdown",
    "checks_markdown",
    "compared_cells",
    "evaluation_markdown",
    "fmt",
    "fmt_delta",
    "link",
    "looseness_markdown",
    "markdown_table",
    "points_markdown",
]

# The targets (pipeline.report.effect_checks), in the order the table lists them.
CHECK_ORDER = ("noisy_box_miou", "noisy_box_st", "point_1_miou", "gt_box_miou", "alpha1_fewer_points")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table; missing values (None, NaN) as an en dash."""
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_delta(new: Any, old: Any, digits: int = 1) -> str:
    """new - old with its sign."""
    if _missing(new) or _missing(old):
        return "–"
    return f"{float(new) - float(old):+.{digits}f}"


def compared_cells(
    base: Mapping[str, Any], model: Mapping[str, Any], keys: Sequence[str], digits: int = 1
) -> list[str]:
    """For each key: the base value, the model value and their difference (model - base), formatted."""
    cells: list[str] = []
    for key in keys:
        old, new = base.get(key), model.get(key)
        cells += [fmt(old, digits), fmt(new, digits), fmt_delta(new, old, digits)]
    return cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one of l/r/c per column (default l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(headers)}")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def link(path: Path | str, relative_to: Path) -> str:
    """``path`` as a markdown link target from a file in the folder ``relative_to``."""
    return Path(os.path.relpath(Path(path).resolve(), relative_to.resolve())).as_posix()


def with_std(figures: Mapping[str, Any] | None) -> str:
    """ "mIoU ± std" of a summary entry (just the mIoU without a std)."""
    if not figures or figures.get("miou") is None:
        return "–"
    std = figures.get("miou_std")
    return f"{figures['miou']:.1f} ± {std:.1f}" if std is not None else f"{figures['miou']:.1f}"


# ------------------------------------------------------------------------------------------------
# Evaluation


def _coco_mean(coco: Mapping[str, Any], setting: str, key: str) -> float | None:
    values = [entry[setting][key] for entry in coco.values() if setting in entry]
    return sum(values) / len(values) if values else None


def _coco_detection_lines(coco: Mapping[str, Any], resize: Mapping[str, str]) -> list[str]:
    """The table of the COCO sets evaluated with a detector's boxes (eval.coco_detections), if any."""
    rows = [
        [
            name,
            *compared_cells(d[BASELINE], d[MODEL], ("map", "map50")),
            d.get("prompted", "–"),
            f"`{Path(d['file']).name}`",
            d.get("score", "–"),
            resize.get(name, "–"),
        ]
        for name, e in coco.items()
        if (d := e.get("detections"))
    ]
    if not rows:
        return []
    headers = ["Set", "SAM mAP", "Stable-SAM mAP", "Δ", "SAM mAP50", "Stable-SAM mAP50", "Δ"]
    return [
        "### COCO mask AP, detector boxes (HQ-SAM's COCO protocol)",
        "",
        markdown_table([*headers, "Boxes", "Detections file", "Score", "Resize"], rows),
        "",
        "Every detection of the file (scored at least eval.coco_detection_min_score) prompts the models "
        "with its box, single-mask output, category = the detection's; score detection_x_iou = the "
        "detection's score x SAM's predicted IoU (HQ-SAM's harness), detection = the detection's.",
        "",
    ]


def evaluation_markdown(metrics: Mapping[str, Any]) -> str:
    """The tables of ``reports/evaluation.json``: the paper's headline layout, every prompt type,
    per set, COCO, α1 per prompt type, and the embedding cache's use."""
    mean = metrics.get("mean", {})
    sam, stable = mean.get(BASELINE, {}), mean.get(MODEL, {})
    coco = metrics.get("coco", {})
    over = metrics.get("mean_over", [])
    lines = [
        "## SAM vs Stable-SAM",
        "",
        f"Evaluation sets: {', '.join(over) or '–'} (macro mean over the sets; images: "
        f"{', '.join(f'{k} {v}' for k, v in metrics.get('images', {}).items())}); "
        f"{metrics.get('draws', '?')} prompt draws per random prompt type; SAM = {metrics.get('baseline', '?')}. "
        "Values in percent; Δ = Stable-SAM - SAM.",
        "",
    ]

    def headline(figures: Mapping[str, Any], setting: str) -> list[str]:
        nb, p1, p3 = figures.get("noisy_box", {}), figures.get("point_1", {}), figures.get("point_3", {})
        return [
            fmt(_coco_mean(coco, setting, "map")),
            fmt(_coco_mean(coco, setting, "map50")),
            fmt(nb.get("miou")),
            fmt(nb.get("mbiou")),
            fmt(nb.get("st")),
            fmt(p1.get("miou")),
            fmt(p1.get("mbiou")),
            fmt(p1.get("st")),
            fmt(p3.get("miou")),
            fmt(figures.get("gt_box", {}).get("miou")),
        ]

    sam_row, stable_row = headline(sam, BASELINE), headline(stable, MODEL)
    delta_row = [
        fmt_delta(_coco_mean(coco, MODEL, "map"), _coco_mean(coco, BASELINE, "map")),
        fmt_delta(_coco_mean(coco, MODEL, "map50"), _coco_mean(coco, BASELINE, "map50")),
    ] + [
        fmt_delta(stable.get(kind, {}).get(key), sam.get(kind, {}).get(key))
        for kind, key in (
            ("noisy_box", "miou"),
            ("noisy_box", "mbiou"),
            ("noisy_box", "st"),
            ("point_1", "miou"),
            ("point_1", "mbiou"),
            ("point_1", "st"),
            ("point_3", "miou"),
            ("gt_box", "miou"),
        )
    ]
    lines += [
        "### Headline (the paper's Table S5/S9 layout)",
        "",
        markdown_table(
            [
                "Model",
                "COCO mAP",
                "mAP50",
                "Noisy box mIoU",
                "mBIoU",
                "ST",
                "1 point mIoU",
                "mBIoU",
                "ST",
                "3 points mIoU",
                "GT box mIoU",
            ],
            [["SAM", *sam_row], ["Stable-SAM", *stable_row], ["Δ", *delta_row]],
        ),
        "",
        "### Every prompt type",
        "",
    ]
    rows = []
    for kind in metrics.get("prompts", list(sam)):
        s, t = sam.get(kind, {}), stable.get(kind, {})
        st_sam = 100.0 if kind == "gt_box" else s.get("st")
        st_stable = 100.0 if kind == "gt_box" else t.get("st")
        rows.append(
            [
                prompt_label(kind),
                with_std(s),
                with_std(t),
                fmt_delta(t.get("miou"), s.get("miou")),
                *compared_cells(s, t, ("mbiou",)),
                fmt(st_sam),
                fmt(st_stable),
                fmt_delta(st_stable, st_sam),
                fmt(t.get("alpha1"), 3),
            ]
        )
    lines += [
        markdown_table(
            [
                "Prompt",
                "SAM mIoU",
                "Stable-SAM mIoU",
                "Δ",
                "SAM mBIoU",
                "Stable-SAM mBIoU",
                "Δ",
                "SAM ST",
                "Stable-SAM ST",
                "Δ",
                "α1",
            ],
            rows,
        ),
        "",
        "mIoU ± std over the prompt draws; ST of a GT box (or of the deterministic oracle point) is "
        "trivially 100 (one prompt, no variation), written for the GT box as the paper does.",
        "",
    ]
    datasets = metrics.get("datasets", {})
    if len(datasets) > 1:
        rows = []
        for name, summary in datasets.items():
            for kind in metrics.get("prompts", []):
                s, t = summary.get(BASELINE, {}).get(kind, {}), summary.get(MODEL, {}).get(kind, {})
                rows.append(
                    [
                        name,
                        prompt_label(kind),
                        *compared_cells(s, t, ("miou", "mbiou")),
                    ]
                )
        lines += [
            "### Per evaluation set",
            "",
            markdown_table(
                ["Set", "Prompt", "SAM mIoU", "Stable-SAM mIoU", "Δ", "SAM mBIoU", "Stable-SAM mBIoU", "Δ"],
                rows,
            ),
            "",
        ]
    resize = metrics.get("resize", {})
    if coco:
        rows = [
            [
                name,
                *compared_cells(e[BASELINE], e[MODEL], ("map", "map50")),
                e.get("images", "–"),
                e.get("instances", "–"),
                e.get("escalated", "–"),
                resize.get(name, "–"),
            ]
            for name, e in coco.items()
        ]
        lines += [
            "### COCO mask AP, noisy boxes (IoU 0.5-0.6 with the GT box)",
            "",
            markdown_table(
                [
                    "Set",
                    "SAM mAP",
                    "Stable-SAM mAP",
                    "Δ",
                    "SAM mAP50",
                    "Stable-SAM mAP50",
                    "Δ",
                    "Images",
                    "Instances",
                    "Escalated noise",
                    "Resize",
                ],
                rows,
            ),
            "",
            "Score = SAM's predicted IoU, single-mask output, category = the GT one; "
            "'Escalated noise': boxes that needed a noise scale above 0.4 to land in the IoU window; "
            "'Resize': how the images reached the model (data.eval_resize; SAM's and HQ-SAM's COCO numbers "
            "are longest_side).",
            "",
        ]
        lines += _coco_detection_lines(coco, resize)
    alpha1 = metrics.get("alpha1", {})
    order = [k for k in metrics.get("prompts", []) if k in alpha1] + [
        k for k in alpha1 if k not in metrics.get("prompts", [])
    ]
    alpha = {k: alpha1[k] for k in order if alpha1[k] is not None}
    if alpha:
        lines += [
            "### Mean routing weight α1 per prompt type (the paper's Table 7/S7)",
            "",
            markdown_table(
                ["", *(prompt_label(k) for k in alpha)], [["α1", *(fmt(v, 3) for v in alpha.values())]]
            ),
            "",
        ]
    cache = metrics.get("embedding_cache", {})
    if cache:
        bypassed = "; ".join(cache.get("bypassed", [])) or "none"
        lines += [
            f"Embedding cache: {cache.get('hits', 0)} hits, {cache.get('computed_here', 0)} computed here; "
            f"bypassed: {bypassed}.",
            "",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Sweeps


def _compared_rows(by_key: Mapping[str, Any], keys: Sequence[str]) -> list[list[str]]:
    """The SAM, Stable-SAM (mIoU ± std) and Δ rows of a sweep table, one column per key."""
    return [
        ["SAM", *(with_std(by_key[k].get(BASELINE)) for k in keys)],
        ["Stable-SAM", *(with_std(by_key[k].get(MODEL)) for k in keys)],
        [
            "Δ",
            *(
                fmt_delta(by_key[k].get(MODEL, {}).get("miou"), by_key[k].get(BASELINE, {}).get("miou"))
                for k in keys
            ),
        ],
    ]


def looseness_markdown(sweep: Mapping[str, Any]) -> str:
    """SAM vs Stable-SAM against prompt looseness: box noise scale, then number of clicks."""
    parts = ["### Prompt looseness: box noise and number of clicks", ""]
    for axis, title in (("box_noise", "box noise scale"), ("clicks", "# clicks")):
        by_x = sweep[axis]
        xs = list(by_x)
        parts += [markdown_table([title, *xs], _compared_rows(by_x, xs)), ""]
    parts += [
        f"mIoU ± std over {len(sweep.get('draws', []))} prompt draws; a noisy box at scale s moves each "
        "side by up to s x the box size, the same draws at every scale (0 = the GT box).",
        "",
    ]
    return "\n".join(parts)


def points_markdown(sweep: Mapping[str, Any]) -> str:
    """Number of prompt points (Table S6: mIoU ± std over the draws) and the learned α1 (Table S7)."""
    points = sweep["points"]
    counts = sorted(points, key=int)  # JSON keys come back as strings, sorted as text
    rows = [
        *_compared_rows(points, counts),
        ["SAM ST", *(fmt(points[k].get(BASELINE, {}).get("st")) for k in counts)],
        ["Stable-SAM ST", *(fmt(points[k].get(MODEL, {}).get("st")) for k in counts)],
        ["learned α1", *(fmt(points[k].get(MODEL, {}).get("alpha1"), 3) for k in counts)],
    ]
    return "\n".join(
        [
            "### Number of prompt points (Table S6 / S7)",
            "",
            markdown_table(["# points", *counts], rows),
            "",
            f"mIoU ± std over {len(sweep.get('draws', []))} prompt draws {sweep.get('draws', '')} "
            "(the same draws as the evaluate stage); learned α1 = Stable-SAM's mean routing weight.",
            "",
        ]
    )


def alpha1_markdown(sweep: Mapping[str, Any]) -> str:
    """Forced α1 (Table S8), with the learned routing and SAM for reference."""
    curves = sweep["alpha1"]
    values = sweep["alpha1_values"]
    rows = []
    for kind in sweep["prompts"]:  # ablate.alpha1_prompts' order (the JSON's keys are sorted)
        curve = curves[kind]
        learned = curve.get("learned", {})
        rows.append(
            [
                prompt_label(kind),
                *(with_std(curve["forced"].get(f"{v:g}")) for v in values),
                f"{with_std(learned)} (α1 = {fmt(learned.get('alpha1'), 3)})",
                with_std(curve.get(BASELINE)),
            ]
        )
    check = sweep.get("alpha0_equals_sam")
    if not sweep.get("applicable", True):
        note = "The checkpoint has no plug-ins: there is no α1 to force."
    elif check:
        note = "α1 = 0 reproduces SAM exactly (identical predictions for every prompt)."
    else:
        note = "α1 = 0 does NOT reproduce SAM: see the metrics."
    return "\n".join(
        [
            "### Forced routing weight α1 (Table S8)",
            "",
            markdown_table(["Prompt", *(f"α1 = {v:g}" for v in values), "learned", "SAM"], rows),
            "",
            f"mIoU ± std over the prompt draws, the same prompts for every α1. {note} A row's best "
            "forced α1 against its learned one: what routing by prompt type could gain.",
            "",
        ]
    )


def checks_markdown(checks: Mapping[str, Any]) -> str:
    """The targets: what each demands, the measured value and whether it holds."""
    order = [n for n in CHECK_ORDER if n in checks] + [n for n in checks if n not in CHECK_ORDER]
    rows = [
        [
            checks[name].get("description", name),
            checks[name].get("rule", ""),
            fmt(checks[name].get("value"), 3 if name.startswith("alpha1") else 1),
            "yes" if checks[name].get("holds") else "**no**",
        ]
        for name in order
        if isinstance(checks[name], Mapping)
    ]
    return markdown_table(["Target", "Rule", "Measured", "Holds"], rows, align="llrc") + "\n"


_ANNOTATOR_COLUMNS = {
    "ap": "AP", "ap50": "AP50", "ap75": "AP75", "ar1": "AR@1", "ar10": "AR@10", "ar100": "AR@100",
    "masks_per_image": "masks / image", "noc85": "NoC@85", "noc90": "NoC@90", "nof85": "never 85",
    "nof90": "never 90", "miou_1": "mIoU@1", "miou_5": "mIoU@5", "miou_20": "mIoU@20",
}  # fmt: skip


def _annotator_table(title: str, results: Mapping[str, Any], note: str) -> list[str]:
    """One table per evaluation set: SAM, Stable-SAM, the difference, and which one is better."""
    columns = list(results.get("columns", []))
    lines = [f"### {title}", ""]
    for name, figures in results.get("sets", {}).items():
        models, delta, better = figures.get("models", {}), figures.get("delta", {}), figures.get("better", {})

        def cell(value: Any) -> str:
            return fmt(value, 0 if isinstance(value, int) else 2)  # counts (never 85 %) stay counts

        rows = [
            ["SAM", *(cell(models.get(BASELINE, {}).get(c)) for c in columns)],
            ["Stable-SAM", *(cell(models.get(MODEL, {}).get(c)) for c in columns)],
            ["Δ", *(cell(delta.get(c)) for c in columns)],
            [
                "better",
                *(
                    better.get(c, "–").replace("stable_sam", "Stable-SAM").replace("sam", "SAM")
                    for c in columns
                ),
            ],
        ]
        lines += [
            f"`{name}`:",
            "",
            markdown_table(["", *(_ANNOTATOR_COLUMNS.get(c, c) for c in columns)], rows),
            "",
        ]
    return [*lines, note, ""]


def annotator_markdown(automatic: Mapping[str, Any] | None, interactive: Mapping[str, Any] | None) -> str:
    """Where annotators work: automatic masks (COCO AP / AR, %) and interactive clicks (NoC, mIoU %)."""
    lines = ["## Annotator protocols", ""]
    if automatic is not None:
        lines += _annotator_table(
            "Automatic masks (segment-anything's generator, class-agnostic COCO mask AP / AR)",
            automatic,
            f"{automatic.get('protocol', '')}.",
        )
    if interactive is not None:
        lines += _annotator_table(
            f"Interactive segmentation (up to {interactive.get('max_clicks', '?')} clicks)",
            interactive,
            f"{interactive.get('protocol', '')}. NoC is capped at the click budget for a target that "
            "never reaches the IoU; 'never' counts those targets (fewer is better, like NoC).",
        )
    return "\n".join(lines)
