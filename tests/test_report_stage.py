"""The report stage (run): the one markdown report, the targets, and the tables it renders."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_evaluate_stage import EFFECT_KEYS, eval_paths, make_project, tiny_params

from pipeline.ablate import SweepPaths
from pipeline.ablate import run as ablate
from pipeline.effect import effect_numbers
from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.evaluate import run as evaluate
from pipeline.report import ReportPaths, effect_checks, holds, run
from pipeline.report_tables import checks_markdown, evaluation_markdown, markdown_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MEAN = {
    "sam": {
        "gt_box": {"miou": 80.0, "mbiou": 70.0},
        "noisy_box": {"miou": 48.8, "mbiou": 42.1, "st": 39.5},
        "point_1": {"miou": 43.3, "mbiou": 37.4, "st": 45.1},
        "point_3": {"miou": 78.7, "mbiou": 70.0, "st": 70.0},
        "point_10": {"miou": 84.8, "mbiou": 75.0, "st": 80.0},
    },
    "stable_sam": {
        "gt_box": {"miou": 80.2, "mbiou": 70.5, "alpha1": 0.45},
        "noisy_box": {"miou": 82.3, "mbiou": 74.1, "st": 82.3, "alpha1": 0.5},
        "point_1": {"miou": 76.9, "mbiou": 68.4, "st": 71.1, "alpha1": 0.614},
        "point_3": {"miou": 84.0, "mbiou": 75.0, "st": 78.0, "alpha1": 0.469},
        "point_10": {"miou": 87.0, "mbiou": 78.0, "st": 85.0, "alpha1": 0.371},
    },
}


def test_prompt_type_table_has_sam_stable_sam_and_delta_columns():
    table = evaluation_markdown({"mean": MEAN, "prompts": list(MEAN["sam"]), "mean_over": ["x"]})
    header = next(line for line in table.splitlines() if line.startswith("| Prompt |"))
    for column in ("SAM mIoU", "Stable-SAM mIoU", "Δ", "SAM ST", "Stable-SAM ST", "α1"):
        assert column in header
    noisy = next(line for line in table.splitlines() if line.startswith("| Noisy box"))
    assert noisy.startswith("| Noisy box | 48.8 | 82.3 | +33.5 |")
    assert "| 0.614 |" in next(line for line in table.splitlines() if line.startswith("| 1 point"))
    assert "| 100.0 | 100.0 | +0.0 |" in next(
        line for line in table.splitlines() if line.startswith("| GT box")
    )


def test_coco_tables_show_each_sets_resize_and_the_detector_boxes_when_given():
    nbox = {"sam": {"map": 20.0, "map50": 40.0}, "stable_sam": {"map": 25.0, "map50": 45.0}, "images": 5}
    boxed = {"sam": {"map": 48.5, "map50": 70.0}, "stable_sam": {"map": 49.5, "map50": 71.0}}
    boxed |= {"prompted": 1500, "file": "/data/detections/dino.json", "score": "detection_x_iou"}
    metrics = {
        "mean": MEAN,
        "mean_over": ["x"],
        "resize": {"embedded": "stretch", "coco_val2017": "longest_side"},
    }
    table = evaluation_markdown({**metrics, "coco": {"embedded": nbox}})
    assert "| embedded | 20.0 | 25.0 | +5.0 | 40.0 | 45.0 | +5.0 | 5 | – | – | stretch |" in table
    assert "detector boxes" not in table
    table = evaluation_markdown(
        {**metrics, "coco": {"embedded": nbox, "coco_val2017": {**nbox, "detections": boxed}}}
    )
    assert "### COCO mask AP, detector boxes (HQ-SAM's COCO protocol)" in table
    row = "| coco_val2017 | 48.5 | 49.5 | +1.0 | 70.0 | 71.0 | +1.0 | 1500 | `dino.json` | detection_x_iou | longest_side |"
    assert row in table


def test_markdown_table_refuses_a_row_of_the_wrong_width():
    assert markdown_table(["a", "b"], [["x|y", 1]]).splitlines() == [
        "| a | b |",
        "| :-- | --: |",
        "| x\\|y | 1 |",
    ]
    with pytest.raises(ValueError, match="has 1 cells"):
        markdown_table(["a", "b"], [["x"]])


def _effect(nb=(40, 48, 30, 38), p1=(20, 28), gt=(80, 80.5), a=(0.6, 0.4)) -> dict:
    entry = {"miou": 50.0, "mbiou": 40.0, "st": 60.0}
    effect = {
        "base": {k: dict(entry) for k in EFFECT_KEYS},
        "stable_sam": {k: {**entry, "alpha1": 0.5} for k in EFFECT_KEYS},
    }
    effect["base"]["noisy_box"].update(miou=nb[0], st=nb[2])
    effect["stable_sam"]["noisy_box"].update(miou=nb[1], st=nb[3])
    effect["base"]["point_1"]["miou"], effect["stable_sam"]["point_1"]["miou"] = p1
    effect["base"]["gt_box"]["miou"], effect["stable_sam"]["gt_box"]["miou"] = gt
    effect["stable_sam"]["point_1"]["alpha1"], effect["stable_sam"]["point_10"]["alpha1"] = a
    return effect


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({}, set()),
        ({"nb": (40, 47.9, 30, 38)}, {"noisy_box_miou"}),
        ({"nb": (40, 48, 30, 37.9)}, {"noisy_box_st"}),
        ({"p1": (20, 27.9)}, {"point_1_miou"}),
        ({"gt": (80, 78.5)}, {"gt_box_miou"}),
        ({"a": (0.4, 0.6)}, {"alpha1_fewer_points"}),
    ],
)
def test_effect_checks_apply_the_targets(changes, failing):
    checks = holds(effect_checks(_effect(**changes)))
    assert {name for name, ok in checks.items() if not ok} == failing | ({"all_hold"} if failing else set())
    assert set(checks) == {
        "all_hold", "noisy_box_miou", "noisy_box_st", "point_1_miou", "gt_box_miou", "alpha1_fewer_points"
    }  # fmt: skip


def test_targets_table_lists_each_rule_and_the_measured_value():
    table = checks_markdown(effect_checks(effect_numbers(MEAN)))
    noisy = next(line for line in table.splitlines() if line.startswith("| Noisy-box mIoU gain"))
    assert noisy == "| Noisy-box mIoU gain | Stable-SAM >= SAM + 8 | 33.5 | yes |"
    assert "| GT-box mIoU change | \\|Stable-SAM - SAM\\| <= 1 | 0.2 | yes |" in table
    assert "| α1 (1 point) - α1 (10 points) | α1(1 point) > α1(10 points) | 0.243 | yes |" in table


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory):
    """Real stage outputs on the tiny project: evaluate + the three sweeps."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    project = make_project(root)
    params = tiny_params()
    params.ablate = dataclasses.replace(
        params.ablate,
        point_counts=[1, 3, 10],
        alpha1_values=[0.0, 1.0],
        alpha1_prompts=["point_1", "gt_box"],
        seeds=[0, 1],
        noise_scales=[0.0, 0.4],
    )
    embed(params, EmbedPaths(project["base"], project["raw"], root / "embeddings", root / "embed.json"))
    evaluation = evaluate(params, eval_paths(project, root))
    sweeps = []
    for sweep in ("points", "alpha1", "looseness"):
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
    return root, params, tuple(sweeps), evaluation


def test_report_has_every_table_and_links_the_figures(pipeline_outputs):
    root, params, sweeps, evaluation = pipeline_outputs
    paths = ReportPaths(
        evaluation=root / "reports" / "evaluation.json",
        out=root / "reports" / "summary.md",
        checks=root / "metrics" / "effect_checks.json",
        sweeps=sweeps,
        figures=(root / "plots" / "evaluate",),
    )
    result = run(params, paths)
    report = paths.out.read_text()
    for heading in (
        "## Targets",
        "Headline (the paper's Table S5/S9 layout)",
        "Every prompt type",
        "COCO mask AP",
        "Mean routing weight α1",
        "Number of prompt points (Table S6 / S7)",
        "Forced routing weight α1 (Table S8)",
        "Prompt looseness",
        "Trained variants",
    ):
        assert heading in report, heading
    assert report.count("### Every prompt type") == 1  # each table once
    assert "| # points | 1 | 3 | 10 |" in report  # numeric order, although JSON keys are text
    forced = report.split("Forced routing weight α1 (Table S8)", 1)[1].split("###", 1)[0]
    rows = [line.split(" | ", 1)[0] for line in forced.splitlines() if line.startswith("| ")]
    assert rows[2:] == ["| 1 point", "| GT box"]  # header, rule, then ablate.alpha1_prompts' order
    assert "![points](figures/points.png)" in report and "![alpha1](figures/alpha1.png)" in report
    assert "(../plots/evaluate/embedded_val_00000_sam_vs_stable_sam.png)" in report
    for link in ("figures/looseness.png", "../plots/evaluate/embedded_val_00000_offsets.png"):
        assert (paths.out.parent / link).is_file()
    assert len(result["figures"]) == 5
    expected = holds(effect_checks(effect_numbers(evaluation["mean"])))
    assert json.loads(paths.checks.read_text()) == expected
    assert all(isinstance(v, bool) for v in expected.values())  # no numbers: they are in the report
    for name, ok in expected.items():
        if name != "all_hold":
            row = next(
                line
                for line in report.splitlines()
                if line.startswith(f"| {result['checks'][name]['description']} |")
            )
            assert row.endswith("| yes |" if ok else "| **no** |"), row
    # The same inputs again: the same report, byte for byte.
    run(params, paths)
    assert paths.out.read_text() == report


def test_the_annotator_tables_show_both_models_the_difference_and_the_winner():
    from pipeline.report_tables import annotator_markdown

    interactive = {
        "columns": ["noc85", "miou_1"],
        "max_clicks": 20,
        "protocol": "RITM clicks",
        "sets": {
            "embedded": {
                "models": {
                    "sam": {"noc85": 15.2, "miou_1": 50.15},
                    "stable_sam": {"noc85": 15.86, "miou_1": 49.36},
                },
                "delta": {"noc85": 0.66, "miou_1": -0.79},
                "better": {"noc85": "sam", "miou_1": "sam"},
            }
        },
    }
    text = annotator_markdown(None, interactive)
    assert "NoC@85 | mIoU@1" in text  # the columns' names, in the results' order
    assert "| SAM | 15.20 | 50.15 |" in text and "| Stable-SAM | 15.86 | 49.36 |" in text
    assert "| Δ | 0.66 | -0.79 |" in text and "| better | SAM | SAM |" in text
    assert "Automatic masks" not in text and "up to 20 clicks" in text
