"""The report stage (run) and the README effect-table block."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_evaluate_stage import eval_paths, make_project, tiny_params

from pipeline.ablate import SweepPaths
from pipeline.ablate import run as ablate
from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.evaluate import run as evaluate
from pipeline.readme_table import END_MARKER, START_MARKER, effect_markdown, main, rewrite_marked_block
from pipeline.report import ReportPaths, run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EFFECT = {
    "base": {
        "gt_box": {"miou": 80.0, "mbiou": 70.0, "st": 100.0},
        "noisy_box": {"miou": 48.8, "mbiou": 42.1, "st": 39.5},
        "point_1": {"miou": 43.3, "mbiou": 37.4, "st": 45.1},
        "point_3": {"miou": 78.7, "mbiou": 70.0, "st": 70.0},
        "point_10": {"miou": 84.8, "mbiou": 75.0, "st": 80.0},
    },
    "stable_sam": {
        "gt_box": {"miou": 80.2, "mbiou": 70.5, "st": 100.0, "alpha1": 0.45},
        "noisy_box": {"miou": 82.3, "mbiou": 74.1, "st": 82.3, "alpha1": 0.5},
        "point_1": {"miou": 76.9, "mbiou": 68.4, "st": 71.1, "alpha1": 0.614},
        "point_3": {"miou": 84.0, "mbiou": 75.0, "st": 78.0, "alpha1": 0.469},
        "point_10": {"miou": 87.0, "mbiou": 78.0, "st": 85.0, "alpha1": 0.371},
    },
}


def test_effect_table_has_sam_stable_sam_and_delta_columns():
    table = effect_markdown(EFFECT)
    header = table.splitlines()[0]
    for column in ("SAM mIoU", "Stable-SAM mIoU", "Δ mIoU", "SAM ST", "Stable-SAM ST", "Δ ST", "α1"):
        assert column in header
    noisy = next(line for line in table.splitlines() if line.startswith("| Noisy box"))
    assert "| 48.8 | 82.3 | +33.5 |" in noisy
    assert "| 0.614 |" in next(line for line in table.splitlines() if line.startswith("| 1 point"))
    assert "trivially 100" in table


def test_readme_block_rewrite_is_idempotent_and_needs_both_markers(tmp_path):
    readme = tmp_path / "README.md"
    text = f"# Project\n\nintro\n\n{START_MARKER}\nstale\n{END_MARKER}\n\nrest\n"
    readme.write_text(text)
    table = effect_markdown(EFFECT)
    assert rewrite_marked_block(readme, table) is True
    once = readme.read_text()
    assert "stale" not in once and table.strip() in once
    assert once.startswith("# Project\n\nintro\n\n" + START_MARKER) and once.endswith(
        END_MARKER + "\n\nrest\n"
    )
    assert rewrite_marked_block(readme, table) is False
    assert readme.read_text() == once
    for broken in ("no markers\n", f"{START_MARKER}\nonly the start\n", f"{END_MARKER}\n{START_MARKER}\n"):
        readme.write_text(broken)
        assert rewrite_marked_block(readme, table) is False
        assert readme.read_text() == broken
    assert rewrite_marked_block(tmp_path / "missing.md", table) is False


def test_readme_table_cli(tmp_path):
    (tmp_path / "effect.json").write_text(json.dumps(EFFECT))
    readme = tmp_path / "README.md"
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n")
    main(
        [
            "--effect",
            str(tmp_path / "effect.json"),
            "--out",
            str(tmp_path / "effect.md"),
            "--readme",
            str(readme),
        ]
    )
    assert "| Noisy box | 48.8 | 82.3 |" in (tmp_path / "effect.md").read_text()
    assert "| Noisy box | 48.8 | 82.3 |" in readme.read_text()


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory):
    """Real stage outputs on the tiny project: evaluate + both sweeps."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    project = make_project(root)
    params = tiny_params()
    params.ablate = dataclasses.replace(
        params.ablate,
        point_counts=[1, 3, 10],
        alpha1_values=[0.0, 1.0],
        alpha1_point_counts=[1],
        seeds=[0, 1],
    )
    embed(params, EmbedPaths(project["base"], project["raw"], root / "embeddings", root / "embed.json"))
    evaluate(params, eval_paths(project, root))
    sweeps = []
    for sweep in ("points", "alpha1"):
        paths = SweepPaths(
            project["base"],
            project["plugin"],
            project["raw"],
            root / "embeddings",
            root / "reports" / f"ablate_{sweep}.json",
            root / "metrics" / f"ablate_{sweep}.json",
            root / "plots" / f"{sweep}.csv",
            root / "reports" / "figures" / f"{sweep}.png",
        )
        ablate(params, paths, sweep=sweep)
        sweeps.append(paths.results)
    torch.set_num_threads(previous)
    return root, params, tuple(sweeps)


def test_report_has_every_table_and_links_the_figures(pipeline_outputs):
    root, params, sweeps = pipeline_outputs
    readme = root / "README.md"
    readme.write_text(f"# x\n{START_MARKER}\n{END_MARKER}\n")
    paths = ReportPaths(
        evaluate=root / "reports" / "evaluation.json",
        effect=root / "metrics" / "effect.json",
        checks=root / "metrics" / "effect_checks.json",
        out=root / "reports" / "summary.md",
        effect_table=root / "reports" / "effect.md",
        sweeps=sweeps,
        figures=(root / "plots" / "evaluate",),
        readme=readme,
    )
    metrics = run(params, paths)
    report = paths.out.read_text()
    for heading in (
        "Headline effect",
        "Headline (the paper's Table S5/S9 layout)",
        "Every prompt type",
        "COCO mask AP",
        "Mean routing weight α1",
        "Number of prompt points (Table S6 / S7)",
        "Forced routing weight α1 (Table S8)",
        "Trained variants",
    ):
        assert heading in report, heading
    assert "| # points | 1 | 3 | 10 |" in report  # numeric order, although JSON keys are text
    assert "![points](figures/points.png)" in report and "![alpha1](figures/alpha1.png)" in report
    assert "(../plots/evaluate/embedded_val_00000_sam_vs_stable_sam.png)" in report
    for link in ("figures/points.png", "../plots/evaluate/embedded_val_00000_offsets.png"):
        assert (paths.out.parent / link).is_file()
    assert metrics["figures"] == 4 and metrics["readme_rewritten"] is True
    effect_table = paths.effect_table.read_text()
    assert effect_table.split("\n", 2)[2].strip() in readme.read_text()
    # a second run changes nothing
    assert run(params, paths)["readme_rewritten"] is False
