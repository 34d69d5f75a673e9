"""Stage ``report``: one markdown report with every table, links to the figures, and the README block.

    python -m pipeline.report --evaluate metrics/evaluate.json --effect metrics/effect.json \\
        --checks metrics/effect_checks.json --sweeps metrics/ablate_points.json \\
        metrics/ablate_alpha1.json --figures plots/evaluate reports/figures \\
        --out reports/summary.md --effect-table reports/effect.md --readme README.md

The tables are built from the stages' JSON metrics only (the formatting functions here are also
what the ``evaluate`` and ``ablate`` stages use for their own markdown), so the report can be
regenerated without running a model. ``--readme``: the block between
``<!-- effect-table:start -->`` and ``<!-- effect-table:end -->`` is rewritten with the effect
table; a README without the markers is left untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import Params, load_params
from .readme_table import (
    check_entries,
    compared_cells,
    effect_markdown,
    fmt,
    fmt_delta,
    markdown_table,
    prompt_label,
    rewrite_marked_block,
    write_text_atomic,
)
from .stage_cli import stage_argument_parser

__all__ = [
    "ReportPaths",
    "alpha1_markdown",
    "evaluation_markdown",
    "main",
    "points_markdown",
    "run",
    "variants_markdown",
]

logger = logging.getLogger("pipeline.report")

BASELINE, MODEL = "sam", "stable_sam"


def _link(path: Path | str, relative_to: Path | None) -> str:
    path = Path(path)
    if relative_to is None:
        return path.as_posix()
    return Path(os.path.relpath(path.resolve(), relative_to.resolve())).as_posix()


def _with_std(figures: Mapping[str, Any] | None) -> str:
    if not figures or figures.get("miou") is None:
        return "–"
    std = figures.get("miou_std")
    return f"{figures['miou']:.1f} ± {std:.1f}" if std is not None else f"{figures['miou']:.1f}"


# ------------------------------------------------------------------------------------------------
# Evaluation


def _coco_mean(coco: Mapping[str, Any], setting: str, key: str) -> float | None:
    values = [entry[setting][key] for entry in coco.values() if setting in entry]
    return sum(values) / len(values) if values else None


def evaluation_markdown(
    metrics: Mapping[str, Any], *, figures: Sequence[Path | str] = (), relative_to: Path | None = None
) -> str:
    """The evaluate stage's tables: the paper's headline layout, every prompt type, per set, COCO, α1."""
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
                _with_std(s),
                _with_std(t),
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
    if coco:
        rows = [
            [
                name,
                *compared_cells(e[BASELINE], e[MODEL], ("map", "map50")),
                e.get("images", "–"),
                e.get("instances", "–"),
                e.get("escalated", "–"),
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
                ],
                rows,
            ),
            "",
            "Score = SAM's predicted IoU, single-mask output, category = the GT one; "
            "'Escalated noise': boxes that needed a noise scale above 0.4 to land in the IoU window.",
            "",
        ]
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
    if figures:
        lines += ["### Figures", ""]
        lines += [f"- [{Path(f).name}]({_link(f, relative_to)})" for f in figures]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Sweeps


def _compared_rows(by_key: Mapping[str, Any], keys: Sequence[str]) -> list[list[str]]:
    """The SAM, Stable-SAM (mIoU ± std) and Δ rows of a sweep table, one column per key."""
    return [
        ["SAM", *(_with_std(by_key[k].get(BASELINE)) for k in keys)],
        ["Stable-SAM", *(_with_std(by_key[k].get(MODEL)) for k in keys)],
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
    for kind in sorted(curves, key=lambda k: (len(k), k)):  # point_1 before point_10
        curve = curves[kind]
        learned = curve.get("learned", {})
        rows.append(
            [
                prompt_label(kind),
                *(_with_std(curve["forced"].get(f"{v:g}")) for v in values),
                f"{_with_std(learned)} (α1 = {fmt(learned.get('alpha1'), 3)})",
                _with_std(curve.get(BASELINE)),
            ]
        )
    check = sweep.get("alpha0_equals_sam")
    note = (
        "α1 = 0 reproduces SAM exactly (identical predictions for every prompt)."
        if check
        else ("α1 = 0 does NOT reproduce SAM: see the metrics." if check is not None else "")
    )
    return "\n".join(
        [
            "### Forced routing weight α1 (Table S8)",
            "",
            markdown_table(["Prompt", *(f"α1 = {v:g}" for v in values), "learned", "SAM"], rows),
            "",
            f"mIoU ± std over the prompt draws, the same prompts for every α1. {note}",
            "",
        ]
    )


def variants_markdown(summary: Mapping[str, Any]) -> str:
    """The trained variants (Table S9 and the baselines) next to SAM and Stable-SAM."""
    rows = []
    for name, v in summary["variants"].items():
        rows.append(
            [
                v.get("label", name),
                v.get("overrides", "") or "–",
                fmt(v.get("trainable_parameters"), 0),
                fmt(v.get("train_seconds"), 0),
                fmt(v.get("coco_map")),
                fmt(v.get("coco_map50")),
                fmt(v.get("noisy_box_miou")),
                fmt(v.get("noisy_box_mbiou")),
                fmt(v.get("noisy_box_st")),
                fmt(v.get("point_1_miou")),
                fmt(v.get("point_1_mbiou")),
                fmt(v.get("point_1_st")),
                fmt(v.get("gt_box_miou")),
                v.get("cache", "–"),
            ]
        )
    return "\n".join(
        [
            "### Trained variants (Table S9 and the baselines)",
            "",
            markdown_table(
                [
                    "Model",
                    "Overrides",
                    "Trainable",
                    "Train s",
                    "COCO mAP",
                    "mAP50",
                    "Noisy box mIoU",
                    "mBIoU",
                    "ST",
                    "1 point mIoU",
                    "mBIoU",
                    "ST",
                    "GT box mIoU",
                    "Embedding cache",
                ],
                rows,
                align="ll" + "r" * 11 + "l",
            ),
            "",
        ]
    )


# ------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class ReportPaths:
    evaluate: Path  # metrics/evaluate.json
    effect: Path  # metrics/effect.json
    checks: Path  # metrics/effect_checks.json
    out: Path  # reports/summary.md
    effect_table: Path  # reports/effect.md
    sweeps: tuple[Path, ...] = ()  # metrics/ablate_*.json
    figures: tuple[Path, ...] = field(default=())  # folders (or files) of PNG figures to link
    readme: Path | None = None  # README.md (marked block rewritten)


def _figures(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.glob("*.png"))
        elif path.suffix == ".png" and path.is_file():
            found.append(path)
    return found


def run(params: Params, paths: ReportPaths, *, tracker: Any = None) -> dict[str, Any]:
    """Write the summary report and the effect table; rewrite the README's marked block."""
    started = time.perf_counter()
    evaluation = json.loads(paths.evaluate.read_text())
    effect = json.loads(paths.effect.read_text())
    checks = json.loads(paths.checks.read_text())
    table = effect_markdown(effect, check_entries(checks))
    write_text_atomic(paths.effect_table, "## Effect of the plug-ins (metrics/effect.json)\n\n" + table)
    figures = _figures(paths.figures)
    sweep_sections, sweep_figures = [], []
    for path in paths.sweeps:
        sweep = json.loads(path.read_text())
        render = {"points": points_markdown, "alpha1": alpha1_markdown, "looseness": looseness_markdown}
        sweep_sections.append(render[sweep["sweep"]](sweep))
        sweep_figures += [Path(f) for f in sweep.get("figures", [])]
    here = paths.out.parent
    lines = [
        "# Stable-SAM: evaluation report",
        "",
        "Generated by `dvc repro` (stage `report`) from the metrics of the `evaluate` and `ablate` "
        f"stages; SAM type `{evaluation.get('sam_type', params.sam.type)}`, data.val = {params.data.val}.",
        "Numbers of the offline embedded default come from a small SAM trained here on procedural "
        "data: they show the pipeline and the direction of the effect, not the paper's values.",
        "",
        "## Headline effect (metrics/effect.json)",
        "",
        table,
        evaluation_markdown(evaluation),
        "## Ablation sweeps (decoder only, on cached embeddings)",
        "",
        *sweep_sections,
    ]
    if sweep_figures or figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.stem}]({_link(f, here)})" for f in sweep_figures]
        lines += [""] + [f"- [{f.name}]({_link(f, here)})" for f in figures] + [""]
    lines += [
        "## Trained variants",
        "",
        "Not part of the default `dvc repro` (each variant trains its own plug-in): run "
        "`dvc repro variants/dvc.yaml`; the table lands in `variants/summary.md`.",
        "",
    ]
    write_text_atomic(paths.out, "\n".join(lines))
    readme_changed = rewrite_marked_block(paths.readme, table) if paths.readme is not None else False
    logger.info(
        "wrote %s and %s; README block %s",
        paths.out,
        paths.effect_table,
        "rewritten" if readme_changed else "unchanged",
    )
    metrics = {
        "effect_checks_hold": bool(checks.get("all_hold")),
        "figures": len(figures) + len(sweep_figures),
        "readme_rewritten": readme_changed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if tracker is not None:
        tracker.log_metrics({k: float(v) for k, v in metrics.items()})
        tracker.log_artifact(paths.out, artifact_path="report")
        tracker.log_artifact(paths.effect_table, artifact_path="report")
        for f in [*figures, *sweep_figures]:
            tracker.log_figure(f)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser("Summary report (stage 'report').")
    parser.add_argument("--evaluate", type=Path, required=True, help="metrics/evaluate.json")
    parser.add_argument("--effect", type=Path, required=True, help="metrics/effect.json")
    parser.add_argument("--checks", type=Path, required=True, help="metrics/effect_checks.json")
    parser.add_argument("--sweeps", type=Path, nargs="*", default=[], help="ablate metrics JSON files")
    parser.add_argument("--figures", type=Path, nargs="*", default=[], help="PNG folders/files to link")
    parser.add_argument("--out", type=Path, required=True, help="the report (markdown)")
    parser.add_argument("--effect-table", type=Path, required=True, help="the effect table (markdown)")
    parser.add_argument("--readme", type=Path, default=None, help="README whose marked block is rewritten")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    paths = ReportPaths(
        evaluate=args.evaluate,
        effect=args.effect,
        checks=args.checks,
        out=args.out,
        effect_table=args.effect_table,
        sweeps=tuple(args.sweeps),
        figures=tuple(args.figures),
        readme=args.readme,
    )
    from .tracking import stage_run

    with stage_run("report", params, params_path=Path(args.params)) as tracker:
        return run(params, paths, tracker=tracker)


if __name__ == "__main__":
    main()
