"""The ablate stage (run): the points and α1 sweeps, the encoder budget, the variants summary."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from test_evaluate_stage import N_IMAGES, EncoderCounter, eval_paths, make_project, tiny_params

from pipeline.ablate import SweepPaths, VariantsPaths, summarize_variants
from pipeline.ablate import run as ablate
from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.evaluate import run as evaluate
from pipeline.params import Variant, load_params
from stable_sam.build import build_stable_sam

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _params(**ablate_kwargs):
    params = tiny_params()
    params.ablate = dataclasses.replace(
        params.ablate,
        point_counts=[1, 3, 10],
        alpha1_values=[0.0, 0.5, 1.0],
        alpha1_point_counts=[1, 10],
        seeds=[0, 1, 2],
        noise_scales=[0.0, 0.4],
        **ablate_kwargs,
    )
    return params


def _sweep_paths(project: dict[str, Path], out: Path, sweep: str) -> SweepPaths:
    return SweepPaths(
        base=project["base"],
        plugin=project["plugin"],
        raw=project["raw"],
        embeddings=project["root"] / "embeddings",
        results=out / f"ablate_{sweep}_full.json",
        metrics=out / f"ablate_{sweep}.json",
        plot=out / f"{sweep}.csv",
        figure=out / f"{sweep}.png",
        table=out / f"{sweep}.md",
    )


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """embed -> evaluate -> ablate@points -> ablate@alpha1 in one process, encoder passes counted."""
    root = tmp_path_factory.mktemp("ablate")
    project = make_project(root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = EncoderCounter(monkeypatch)
        embed(
            _params(), EmbedPaths(project["base"], project["raw"], root / "embeddings", root / "embed.json")
        )
        evaluation = evaluate(_params(), eval_paths(project, root / "eval"))
        points = ablate(_params(), _sweep_paths(project, root, "points"), sweep="points")
        alpha = ablate(_params(), _sweep_paths(project, root, "alpha1"), sweep="alpha1")
        loose = ablate(_params(), _sweep_paths(project, root, "looseness"), sweep="looseness")
    return {
        "looseness": loose,
        "root": root,
        "encoder_images": counter.images,
        "evaluation": evaluation,
        "points": points,
        "alpha1": alpha,
    }


def test_the_encoder_runs_once_per_image_across_evaluate_and_sweeps(stages):
    assert stages["encoder_images"] == N_IMAGES
    assert stages["points"]["embedding_cache_hits"] == N_IMAGES


def test_points_sweep_reuses_the_evaluation_draws(stages):
    points, evaluation = stages["points"]["points"], stages["evaluation"]["mean"]
    assert list(points) == ["1", "3", "10"]
    # seeds [0, 1, 2] are the evaluation's draws 0-2 (eval.draws = 3): the very same numbers
    for k in ("1", "3", "10"):
        for setting in ("sam", "stable_sam"):
            assert points[k][setting]["miou"] == pytest.approx(evaluation[setting][f"point_{k}"]["miou"])
            assert points[k][setting]["st"] == pytest.approx(evaluation[setting][f"point_{k}"]["st"])
        assert points[k]["sam"]["miou_std"] >= 0.0
        assert 0.0 < points[k]["stable_sam"]["alpha1"] < 1.0
    with open(stages["root"] / "points.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["points"]) for r in rows] == [1, 3, 10]
    assert set(rows[0]) == {"points", "sam", "sam_std", "stable_sam", "stable_sam_std", "alpha1"}
    assert float(rows[0]["sam"]) == pytest.approx(points["1"]["sam"]["miou"], abs=1e-3)
    assert (stages["root"] / "points.png").stat().st_size > 0
    assert "| SAM |" in (stages["root"] / "points.md").read_text()


def test_alpha1_zero_is_sam_and_the_curve_moves(stages):
    sweep = stages["alpha1"]
    assert sweep["alpha0_equals_sam"] is True and sweep["alpha0_max_abs_diff"] == 0.0
    for kind in ("point_1", "point_10"):
        curve = sweep["alpha1"][kind]
        assert curve["forced"]["0"]["miou"] == curve["sam"]["miou"]
        assert curve["forced"]["1"]["miou"] != curve["forced"]["0"]["miou"]
    with open(stages["root"] / "alpha1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha1"]) for r in rows] == [0.0, 0.5, 1.0]
    assert set(rows[0]) == {"alpha1", "point_1", "point_1_std", "point_10", "point_10_std"}
    assert "α1 = 0 reproduces SAM exactly" in (stages["root"] / "alpha1.md").read_text()


def test_looseness_sweep_spans_gt_box_to_loose_boxes_and_the_click_counts(stages):
    """Noise 0 is the GT box and 0.4 the evaluation's noisy box (same draws); clicks = the points sweep."""
    sweep, evaluation = stages["looseness"], stages["evaluation"]["mean"]
    for setting in ("sam", "stable_sam"):
        assert sweep["box_noise"]["0"][setting]["miou"] == pytest.approx(
            evaluation[setting]["gt_box"]["miou"]
        )
        assert sweep["box_noise"]["0.4"][setting]["miou"] == pytest.approx(
            evaluation[setting]["noisy_box"]["miou"]
        )
        assert sweep["clicks"]["3"][setting]["miou"] == pytest.approx(
            stages["points"]["points"]["3"][setting]["miou"]
        )
    with open(stages["root"] / "looseness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["axis"], float(r["x"])) for r in rows] == [
        ("box_noise", 0.0), ("box_noise", 0.4), ("clicks", 1.0), ("clicks", 3.0), ("clicks", 10.0)
    ]  # fmt: skip
    assert (stages["root"] / "looseness.png").stat().st_size > 0
    assert "box noise scale" in (stages["root"] / "looseness.md").read_text()


def test_unknown_sweep_is_refused(stages):
    with pytest.raises(ValueError, match="unknown sweep"):
        ablate(
            _params(),
            _sweep_paths(
                {"base": Path(), "plugin": Path(), "raw": Path(), "root": Path()}, stages["root"], "x"
            ),
            sweep="x",
        )


def _fake_evaluation(noisy: float, *, bypassed: list[str] | None = None) -> dict:
    figures = {"miou": noisy, "mbiou": noisy - 10, "st": noisy - 5}
    mean = {s: {k: dict(figures) for k in ("noisy_box", "point_1", "gt_box")} for s in ("sam", "stable_sam")}
    mean["sam"]["noisy_box"]["miou"] = 30.0
    coco = {"embedded": {"sam": {"map": 10.0, "map50": 20.0}, "stable_sam": {"map": 12.0, "map50": 25.0}}}
    return {
        "mean": mean,
        "coco": coco,
        "embedding_cache": {"bypassed": bypassed or []},
        "seconds": {"total": 3.0},
    }


def test_variants_summary_table(tmp_path):
    params = _params(
        variants={
            "lora": {"tuning.encoder": "lora", "plugin.variant": "none"},
            "gone": {"train.lsj": False},
        }
    )
    results = tmp_path / "results"
    (results / "lora").mkdir(parents=True)
    (results / "lora" / "evaluation.json").write_text(
        json.dumps(_fake_evaluation(55.0, bypassed=["stable_sam: encoder tuned (lora), 4 images embedded"]))
    )
    (results / "lora" / "train.json").write_text(
        json.dumps({"trainable_parameters": 1234, "fit_seconds": 42.0})
    )
    (tmp_path / "evaluate.json").write_text(json.dumps(_fake_evaluation(60.0)))
    paths = VariantsPaths(
        results, tmp_path / "evaluate.json", tmp_path / "summary.md", tmp_path / "summary.json"
    )
    summary = summarize_variants(params, paths)
    assert list(summary["variants"]) == ["sam", "stable_sam", "lora"]
    assert summary["missing"] == ["gone"]
    lora = summary["variants"]["lora"]
    assert (
        lora["noisy_box_miou"] == 55.0 and lora["coco_map"] == 12.0 and lora["trainable_parameters"] == 1234
    )
    assert (
        lora["cache"].startswith("bypassed")
        and lora["overrides"] == "tuning.encoder=lora plugin.variant=none"
    )
    assert summary["variants"]["sam"]["noisy_box_miou"] == 30.0
    table = (tmp_path / "summary.md").read_text()
    assert "| lora |" in table and "| SAM |" in table and "1234" in table


def test_every_variant_in_params_yaml_is_a_valid_override_set():
    params = load_params(REPO / "params.yaml")
    assert len(params.ablate.variants) >= 7
    for name in params.ablate.variants:
        variant = load_params(REPO / "params.yaml", [Variant(name)])
        model = build_stable_sam(sam_type="tiny", plugin_config=variant.plugin, tuning=variant.tuning)
        assert model.num_trainable_parameters() > 0, name
