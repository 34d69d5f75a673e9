"""The effect table (SAM vs Stable-SAM) from ``metrics/effect.json``, and the README block it fills.

    python -m pipeline.readme_table --effect metrics/effect.json [--checks metrics/effect_checks.json]
        [--out reports/effect.md] [--readme README.md]

The ``report`` stage calls :func:`effect_markdown` and :func:`rewrite_marked_block`; the README
includes the table between the markers ``<!-- effect-table:start -->`` and
``<!-- effect-table:end -->``. A README without both markers is left untouched, and rewriting
with the same table changes nothing (the file is not even written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stable_sam.atomic_write import write_text_atomic

__all__ = [
    "CHECK_ORDER",
    "EFFECT_PROMPTS",
    "END_MARKER",
    "PROMPT_LABELS",
    "START_MARKER",
    "check_entries",
    "compared_cells",
    "effect_markdown",
    "fmt",
    "fmt_delta",
    "main",
    "markdown_table",
    "prompt_label",
    "rewrite_marked_block",
    "write_text_atomic",
]

START_MARKER = "<!-- effect-table:start -->"
END_MARKER = "<!-- effect-table:end -->"
EFFECT_PROMPTS = ("gt_box", "noisy_box", "point_1", "point_3", "point_10")
# The targets of metrics/effect_checks.json, in the order the table lists them.
CHECK_ORDER = ("noisy_box_miou", "noisy_box_st", "point_1_miou", "gt_box_miou", "alpha1_fewer_points")
PROMPT_LABELS = {
    "gt_box": "GT box",
    "noisy_box": "Noisy box",
    "oracle_point": "Oracle point",
    "coarse_mask": "Coarse mask",
}


def prompt_label(kind: str) -> str:
    """ "point_3" -> "3 points", "gt_box" -> "GT box"."""
    if kind in PROMPT_LABELS:
        return PROMPT_LABELS[kind]
    if kind.startswith("point_"):
        k = kind.split("_", 1)[1]
        return f"{k} point" if k == "1" else f"{k} points"
    return kind


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


def effect_markdown(effect: Mapping[str, Any], checks: Mapping[str, Any] | None = None) -> str:
    """The SAM / Stable-SAM / Δ table of ``effect.json`` (values in percent), plus the checks."""
    base, stable = effect["base"], effect["stable_sam"]
    rows = []
    for kind in EFFECT_PROMPTS:
        b, s = base.get(kind, {}), stable.get(kind, {})
        rows.append(
            [
                prompt_label(kind),
                *compared_cells(b, s, ("miou", "mbiou", "st")),
                fmt(s.get("alpha1"), 3),
            ]
        )
    headers = [
        "Prompt",
        "SAM mIoU",
        "Stable-SAM mIoU",
        "Δ mIoU",
        "SAM mBIoU",
        "Stable-SAM mBIoU",
        "Δ mBIoU",
        "SAM ST",
        "Stable-SAM ST",
        "Δ ST",
        "Stable-SAM α1",
    ]
    parts = [
        markdown_table(headers, rows),
        "",
        "SAM = the same frozen SAM with the plug-ins switched off; values in percent, mean over the "
        "prompt draws, macro-averaged over the evaluation sets. ST = mean pairwise IoU of the "
        "predictions for independently drawn prompts of one type; a GT box is a deterministic "
        "prompt, so its ST is trivially 100.",
    ]
    if checks:
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
        parts += ["", markdown_table(["Target", "Rule", "Measured", "Holds"], rows, align="llrc")]
    return "\n".join(parts) + "\n"


def rewrite_marked_block(
    path: str | os.PathLike, content: str, *, start: str = START_MARKER, end: str = END_MARKER
) -> bool:
    """Replace what lies between ``start`` and ``end`` in a text file by ``content``.

    The markers stay; the block becomes ``start\\n\\ncontent\\n\\nend``. Nothing happens when the
    file or either marker is missing (or the end comes first), or when the block already holds
    exactly this content.

    Returns:
      True when the file was rewritten.
    """
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text()
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return False
    updated = text[: i + len(start)] + "\n\n" + content.strip("\n") + "\n\n" + text[j:]
    if updated == text:
        return False
    write_text_atomic(path, updated)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--effect", type=Path, default=Path("metrics/effect.json"))
    parser.add_argument("--checks", type=Path, default=None, help="effect_checks.json (optional)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    parser.add_argument("--readme", type=Path, default=None, help="rewrite its marked block")
    args = parser.parse_args(argv)
    effect = json.loads(args.effect.read_text())
    checks = json.loads(args.checks.read_text()) if args.checks and args.checks.is_file() else None
    table = effect_markdown(effect, check_entries(checks))
    if args.out:
        write_text_atomic(args.out, table)
    if args.readme:
        changed = rewrite_marked_block(args.readme, table)
        print(f"{args.readme}: {'rewritten' if changed else 'unchanged'}")
    if not args.out and not args.readme:
        print(table, end="")
    return 0


def check_entries(checks: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The per-target entries of effect_checks.json (without the all_hold summary)."""
    if not checks:
        return None
    return {k: v for k, v in checks.items() if isinstance(v, Mapping)}


if __name__ == "__main__":
    raise SystemExit(main())
