"""The ablate stage (run): the points, α1 and looseness sweeps, the encoder budget; the variants recipe."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from test_evaluate_stage import N_IMAGES, EncoderCounter, eval_paths, make_project, tiny_params

from pipeline.ablate import SweepPaths, summary_metrics
from pipeline.ablate import run as ablate
from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.evaluate import run as evaluate
from pipeline.params import Variant, load_params
from pipeline.variants import queue_command, set_params
from stable_sam.build import build_stable_sam
from stable_sam.config import PluginConfig, TuningConfig

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
        alpha1_prompts=["point_1", "point_10", "gt_box", "noisy_box"],
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
    assert not list(stages["root"].glob("*.md"))  # the report stage alone renders markdown
    summary = json.loads((stages["root"] / "ablate_points.json").read_text())
    assert summary == summary_metrics(stages["points"])
    assert summary["mean_miou"]["stable_sam"] == pytest.approx(
        sum(points[k]["stable_sam"]["miou"] for k in points) / len(points), abs=1e-4
    )
    assert "seconds" not in json.loads((stages["root"] / "ablate_points_full.json").read_text())


def test_alpha1_zero_is_sam_and_the_curve_moves(stages):
    sweep = stages["alpha1"]
    assert sweep["alpha0_equals_sam"] is True and sweep["alpha0_max_abs_diff"] == 0.0
    kinds = ["point_1", "point_10", "gt_box", "noisy_box"]
    assert sweep["prompts"] == kinds and set(sweep["alpha1"]) == set(kinds)  # boxes too
    for kind in kinds:
        curve = sweep["alpha1"][kind]
        assert curve["forced"]["0"]["miou"] == curve["sam"]["miou"]
        assert curve["forced"]["1"]["miou"] != curve["forced"]["0"]["miou"]
        assert 0.0 < curve["learned"]["alpha1"] < 1.0
    # One GT box per image, the same in every draw: no spread; noisy boxes differ per draw.
    assert sweep["alpha1"]["gt_box"]["forced"]["1"]["miou_std"] == 0.0
    assert sweep["alpha1"]["noisy_box"]["forced"]["1"]["miou_std"] > 0.0
    with open(stages["root"] / "alpha1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha1"]) for r in rows] == [0.0, 0.5, 1.0]
    assert list(rows[0]) == ["alpha1", *(c for k in kinds for c in (k, f"{k}_std"))]
    assert sweep["applicable"] is True
    assert json.loads((stages["root"] / "ablate_alpha1.json").read_text()) == {
        "alpha0_equals_sam": True,
        "alpha0_max_abs_diff": 0.0,
    }


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
    # The plot data is the box-noise curve (the clicks curve is the points sweep's CSV).
    assert [float(r["noise_scale"]) for r in rows] == [0.0, 0.4]
    assert set(rows[0]) == {"noise_scale", "sam", "sam_std", "stable_sam", "stable_sam_std"}
    assert float(rows[1]["stable_sam"]) == pytest.approx(
        sweep["box_noise"]["0.4"]["stable_sam"]["miou"], abs=1e-3
    )
    assert (stages["root"] / "looseness.png").stat().st_size > 0
    summary = json.loads((stages["root"] / "ablate_looseness.json").read_text())
    assert set(summary) == {"box_noise_mean_miou"} and set(summary["box_noise_mean_miou"]) == {
        "sam",
        "stable_sam",
    }


def test_unknown_sweep_is_refused(stages):
    with pytest.raises(ValueError, match="unknown sweep"):
        ablate(
            _params(),
            _sweep_paths(
                {"base": Path(), "plugin": Path(), "raw": Path(), "root": Path()}, stages["root"], "x"
            ),
            sweep="x",
        )


def test_alpha1_sweep_of_a_checkpoint_without_plug_ins_says_it_does_not_apply(tmp_path):
    project = make_project(
        tmp_path / "p",
        plugin=PluginConfig(variant="none"),
        tuning=TuningConfig(encoder="lora", decoder="prediction_head"),
    )
    params = _params()
    params.ablate.alpha1_prompts = ["point_1"]
    embed(params, EmbedPaths(project["base"], project["raw"], tmp_path / "embeddings", tmp_path / "e.json"))
    project["root"] = tmp_path
    sweep = ablate(params, _sweep_paths(project, tmp_path, "alpha1"), sweep="alpha1")
    assert sweep["applicable"] is False and sweep["alpha0_equals_sam"] is None
    assert sweep["alpha1"]["point_1"]["forced"]["0"] == {}  # nothing forced
    assert sweep["alpha1"]["point_1"]["sam"]["miou"] >= 0.0  # the reference is still measured
    assert json.loads((tmp_path / "ablate_alpha1.json").read_text()) == {
        "alpha0_equals_sam": None,
        "alpha0_max_abs_diff": None,
    }
    with open(tmp_path / "alpha1.csv", newline="") as f:
        assert {r["point_1"] for r in csv.DictReader(f)} == {""}
    assert (tmp_path / "alpha1.png").stat().st_size > 0


def test_variants_are_queued_as_dvc_experiments_with_their_overrides(tmp_path):
    """What `dvc exp run -S` writes into params.yaml (DVC's own Hydra code) is the variant."""
    from dvc.utils.hydra import apply_overrides

    variants = load_params(REPO / "params.yaml").ablate.variants
    for name, overrides in variants.items():
        command = queue_command(name, overrides)
        assert command[1:8] == ["-m", "dvc", "exp", "run", "--queue", "-n", name]
        assert command[8::2] == ["-S"] * len(overrides) and command[9::2] == set_params(overrides)
        edited = tmp_path / f"{name}.yaml"
        edited.write_text((REPO / "params.yaml").read_text())
        apply_overrides(edited, set_params(overrides))
        assert load_params(edited) == load_params(REPO / "params.yaml", [Variant(name)]), name
    # JSON values keep their types through the override grammar: a string stays a string.
    assert set_params({"plugin.routing": "fixed", "plugin.placements": ["block2"], "train.lsj": False}) == [
        'plugin.routing="fixed"',
        'plugin.placements=["block2"]',
        "train.lsj=false",
    ]


def test_variants_print_queues_nothing_and_unknown_names_fail(capsys, monkeypatch):
    import pipeline.variants as variants

    monkeypatch.setattr(variants.subprocess, "run", lambda *a, **k: pytest.fail("queued"))
    assert variants.main(["--params", str(REPO / "params.yaml"), "--print", "block2_only"]) == 0
    assert (
        capsys.readouterr().out == "dvc exp run --queue -n block2_only -S 'plugin.placements=[\"block2\"]'\n"
    )
    with pytest.raises(SystemExit):
        variants.main(["--params", str(REPO / "params.yaml"), "--print", "no_such_variant"])
    assert "not in ablate.variants: no_such_variant" in capsys.readouterr().err


def test_every_variant_in_params_yaml_is_a_valid_override_set():
    params = load_params(REPO / "params.yaml")
    assert len(params.ablate.variants) >= 7
    for name in params.ablate.variants:
        variant = load_params(REPO / "params.yaml", [Variant(name)])
        model = build_stable_sam(sam_type="tiny", plugin_config=variant.plugin, tuning=variant.tuning)
        assert model.num_trainable_parameters() > 0, name
