"""Interactive segmentation: the click protocol, NoC, mask feedback, and the ``interactive`` stage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordingTracker, perturb_plugins, random_stable_sam, repo_params
from PIL import Image
from segment_anything import SamPredictor
from test_evaluate_stage import N_IMAGES, EncoderCounter, make_project

from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.interactive import InteractivePaths, headline_metrics
from pipeline.interactive import run as interactive
from stable_sam.evaluation import (
    ClickTrace,
    Decoded,
    PreparedImage,
    click_trace,
    embed_images,
    frame_points,
    model_decoder,
    number_of_clicks,
    summarize_traces,
)
from stable_sam.metrics import mask_iou
from stable_sam.prompts import oracle_point

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _image(mask: np.ndarray, *, input_size: tuple[int, int] | None = None, rgb: np.ndarray | None = None):
    size = input_size or mask.shape
    pixels = rgb if rgb is not None else np.zeros((*size, 3), np.uint8)
    return PreparedImage("t", 0, pixels, mask, mask, tuple(size), "stretch")


def test_noc_is_the_first_click_reaching_the_threshold_else_max_clicks():
    ious = [0.5, 0.86, 0.84, 0.91, 0.95]
    assert number_of_clicks(ious, 0.85, max_clicks=20) == 2  # reached at click 2, lost at 3: still 2
    assert number_of_clicks(ious, 0.90, max_clicks=20) == 4
    assert number_of_clicks(ious, 0.99, max_clicks=20) == 20  # never: capped at max_clicks
    assert number_of_clicks([0.9], 0.9, max_clicks=20) == 1  # reaching it exactly counts
    assert number_of_clicks(ious, 0.90, max_clicks=3) == 3  # a later click beyond the cap does not count


def test_summary_per_click_and_noc_over_targets():
    def trace(ious):
        return ClickTrace("x", np.asarray(ious), np.zeros((0, 2)), np.zeros(0), np.zeros(0))

    traces = [trace([0.5, 0.9, 0.95, 0.95, 0.95]), trace([0.7, 0.8, 0.8, 0.86, 0.88])]
    summary = summarize_traces(traces, thresholds=[0.85, 0.9], max_clicks=5)
    assert summary["n"] == 2
    assert summary["miou"] == pytest.approx([60.0, 85.0, 87.5, 90.5, 91.5])
    assert summary["miou_std"][0] == pytest.approx(10.0)
    assert summary["miou_1"] == pytest.approx(60.0) and summary["miou_5"] == pytest.approx(91.5)
    assert "miou_20" not in summary  # beyond max_clicks
    assert summary["noc85"] == pytest.approx((2 + 4) / 2) and summary["nof85"] == 0
    assert summary["noc90"] == pytest.approx((2 + 5) / 2) and summary["nof90"] == 1


class ScriptedDecoder:
    """Returns the given masks in turn, each with distinct low-res logits; records every prompt."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks
        self.prompts = []

    def __call__(self, prompt):
        k = len(self.prompts)
        self.prompts.append(prompt)
        logits = torch.full((1, 8, 8), float(k + 1))
        return Decoded(self.masks[k][None], None, np.array([0.5 + k / 10], np.float32), logits)


def test_clicks_follow_the_oracle_and_the_previous_logits_are_fed_back():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True  # 100 pixels
    left = gt.copy()
    left[:, 10:] = False  # IoU 0.5: the right half is missing
    most = gt.copy()
    most[5:15, 5] = False
    most[5:9, 6] = False  # 86 pixels: IoU 0.86
    superset = gt.copy()
    superset[2:5, 5:15] = True  # false positives above: IoU 100/130
    decoder = ScriptedDecoder([left, most, superset, gt])
    trace = click_trace(decoder, _image(gt), max_clicks=8)
    # After the exact mask there is nothing left to correct: no more calls, the IoU stays.
    assert len(decoder.prompts) == 4
    assert trace.ious == pytest.approx([0.5, 0.86, 100 / 130, 1, 1, 1, 1, 1])
    assert number_of_clicks(trace.ious, 0.85, max_clicks=8) == 2
    assert number_of_clicks(trace.ious, 0.90, max_clicks=8) == 4
    # Clicks: the oracle's, given the previous prediction, never on a clicked pixel.
    not_clicked = np.ones_like(gt)
    for k, pred in enumerate([None, left, most, superset]):
        point, label = oracle_point(gt, pred, not_clicked=not_clicked)
        not_clicked[int(point[1]), int(point[0])] = False
        np.testing.assert_array_equal(trace.points[k], point)
        assert trace.labels[k] == label
    assert trace.labels.tolist() == [1, 1, 1, 0]  # the superset's error is a false positive
    # Every prompt holds all clicks so far; from click 2 on, the previous call's logits.
    assert decoder.prompts[0].mask_input is None
    for k, prompt in enumerate(decoder.prompts):
        np.testing.assert_array_equal(prompt.point_coords, trace.points[: k + 1])
        np.testing.assert_array_equal(prompt.point_labels, trace.labels[: k + 1])
        if k:
            np.testing.assert_array_equal(prompt.mask_input, np.full((8, 8), float(k)))
    assert trace.predicted_iou == pytest.approx([0.5, 0.6, 0.7, 0.8])


def test_a_pixel_is_never_clicked_twice():
    """A prediction that never improves leaves the same error: every click still lands elsewhere."""
    gt = np.zeros((12, 12), bool)
    gt[2:9, 3:10] = True
    trace = click_trace(ScriptedDecoder([np.zeros_like(gt)] * 6), _image(gt), max_clicks=6)
    assert len({tuple(p) for p in trace.points.tolist()}) == 6
    assert trace.labels.tolist() == [1] * 6


def test_no_feedback_sends_no_mask_input():
    gt = np.zeros((12, 12), bool)
    gt[2:9, 3:10] = True
    decoder = ScriptedDecoder([gt[::-1].copy()] * 3)
    click_trace(decoder, _image(gt), max_clicks=3, mask_feedback=False)
    assert all(p.mask_input is None for p in decoder.prompts)


def test_clicks_are_scaled_into_the_model_frame_like_samppredictor():
    gt = np.zeros((100, 200), bool)
    image = PreparedImage("t", 0, np.zeros((32, 64, 3), np.uint8), gt[::3, ::3], gt, (32, 64), "longest_side")
    np.testing.assert_allclose(
        frame_points(np.array([[100.0, 50.0], [199.0, 0.0]]), image), [[32, 16], [63.68, 0]]
    )


@pytest.fixture(scope="module")
def tiny():
    """A tiny Stable-SAM with non-trivial plug-ins, the untouched SAM, a 64 x 64 image and a GT."""
    model, vanilla = random_stable_sam("tiny", seed=6)
    perturb_plugins(model, seed=7, scale=0.5)
    rgb = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    gt = np.zeros((64, 64), bool)
    gt[10:40, 20:50] = True
    rgb[gt] = (240, 200, 10)
    image = _image(gt, rgb=rgb)
    (embedding,) = embed_images(model.eval(), [image], progress=False)
    return model, vanilla.eval(), image, embedding


def test_with_plugins_off_the_protocol_is_samppredictors_interactive_loop(tiny):
    """SAM's own predictor with the same clicks, multimask, best score, logits fed back: same IoUs."""
    model, vanilla, image, embedding = tiny
    with model.plugins_disabled():
        trace = click_trace(
            model_decoder(model, embedding, image, multimask_output=True), image, max_clicks=6
        )
    predictor = SamPredictor(vanilla)
    predictor.set_image(image.input_image)
    logits = None
    for k in range(len(trace.points)):
        masks, scores, low_res = predictor.predict(
            trace.points[: k + 1], trace.labels[: k + 1], mask_input=logits, multimask_output=True
        )
        best = int(np.argmax(scores))
        logits = low_res[best][None]
        assert mask_iou(image.mask, masks[best]) == pytest.approx(trace.ious[k], abs=1e-6)


def test_stable_sam_and_feedback_change_the_trace(tiny):
    model, _, image, embedding = tiny
    decode = model_decoder(model, embedding, image, multimask_output=True)
    stable = click_trace(decode, image, max_clicks=6)
    without = click_trace(decode, image, max_clicks=6, mask_feedback=False)
    with model.plugins_disabled():
        sam = click_trace(decode, image, max_clicks=6)
    assert not np.allclose(stable.ious, sam.ious)
    assert not np.allclose(stable.ious, without.ious)
    np.testing.assert_array_equal(stable.points[0], sam.points[0])  # click 1 depends on the GT only


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    project = make_project(tmp_path_factory.mktemp("interactive_project"))
    params = repo_params(data={"val": ["embedded"]}, tracking={"enabled": False})
    embed(
        params,
        EmbedPaths(project["base"], project["raw"], project["root"] / "emb", project["root"] / "e.json"),
    )
    return project


def _paths(project: dict[str, Path], out: Path) -> InteractivePaths:
    return InteractivePaths(
        project["base"], project["plugin"], project["raw"], project["root"] / "emb",
        out / "interactive.json", out / "metrics.json", out / "interactive.csv", out / "interactive.png",
    )  # fmt: skip


def test_stage_writes_results_metrics_curves_and_figure_without_the_encoder(project, tmp_path, monkeypatch):
    params = repo_params(interactive={"max_clicks": 5}, tracking={"enabled": False})
    paths = _paths(project, tmp_path)
    counter = EncoderCounter(monkeypatch)
    tracker = RecordingTracker()  # checks each call against the real tracker's signature
    results = interactive(params, paths, tracker=tracker)
    (dataset,) = [(args, kwargs) for what, args, kwargs in tracker.calls if what == "log_dataset"]
    assert dataset[0][0].name == "val" and dataset[1] == {"context": "evaluation"}  # the split, not the root
    assert counter.images == 0 and results["embedding_cache"] == {"hits": N_IMAGES, "computed_here": 0}
    entry = results["sets"]["embedded"]
    assert entry["targets"] == N_IMAGES
    for model in ("sam", "stable_sam"):
        row = entry["models"][model]
        assert set(row) == set(results["columns"]) == {"noc85", "noc90", "nof85", "nof90", "miou_1", "miou_5"}
        assert 1 <= row["noc85"] <= row["noc90"] <= 5 and 0 <= row["nof85"] <= row["nof90"] <= N_IMAGES
        assert row["miou_5"] == pytest.approx(entry["curves"][model]["miou"][4], abs=1e-4)
    assert entry["curves"]["sam"] != entry["curves"]["stable_sam"]
    for metric, winner in entry["better"].items():  # fewer clicks / failures, higher mIoU
        sam, stable = entry["models"]["sam"][metric], entry["models"]["stable_sam"][metric]
        lower = metric.startswith(("noc", "nof"))
        expected = "tie" if sam == stable else "stable_sam" if (stable < sam) == lower else "sam"
        assert winner == expected, metric
    metrics = json.loads(paths.metrics.read_text())
    assert metrics == headline_metrics(results)
    assert set(metrics["embedded"]["sam"]) == {"noc85", "noc90", "miou_1", "miou_5"}
    rows = list(csv.DictReader(paths.plot.open()))
    assert [int(r["click"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[0]["stable_sam"]) == pytest.approx(entry["curves"]["stable_sam"]["miou"][0], abs=1e-4)
    assert Image.open(paths.figure).size[0] > 300


def test_stage_runs_a_user_folder_in_the_hqseg_layout(project, tmp_path):
    folder = project["raw"] / "embedded" / "val"  # im/ + gt/: what a converted GrabCut/DAVIS folder holds
    params = repo_params(
        interactive={"sets": ["embedded", str(folder)], "max_clicks": 3, "max_images": 2},
        tracking={"enabled": False},
    )
    results = interactive(params, _paths(project, tmp_path))
    assert list(results["sets"]) == ["embedded", "val"]
    assert results["sets"]["val"]["targets"] == 2
    # The folder's images are the embedded ones, but another set: the same clicks give the same IoUs.
    assert results["sets"]["val"]["models"] == results["sets"]["embedded"]["models"]
    assert json.loads((tmp_path / "metrics.json").read_text()).keys() == {"embedded", "val"}


@pytest.mark.slow
def test_stage_on_the_small_model_and_the_embedded_val_split(tmp_path):
    """The committed default (small SAM, trained plug-in, 64 embedded val images, 20 clicks); needs
    the DVC outputs models/, data/raw and data/embeddings of a `dvc repro` (skipped without them)."""
    root = Path(__file__).resolve().parent.parent
    needed = [
        root / "models" / "stable_sam" / "plugin.pt",
        root / "data" / "raw",
        root / "data" / "embeddings",
    ]
    if not all(p.exists() for p in needed):
        pytest.skip("needs models/, data/raw and data/embeddings from `dvc repro`")
    paths = InteractivePaths(root / "models" / "base", root / "models" / "stable_sam", root / "data" / "raw",
                             root / "data" / "embeddings", *(tmp_path / n for n in ("r.json", "m.json", "p.csv", "f.png")))  # fmt: skip
    results = interactive(repo_params(tracking={"enabled": False}), paths)
    entry = results["sets"]["embedded"]
    assert entry["targets"] == 64 and results["embedding_cache"]["computed_here"] == 0
    for row in entry["models"].values():
        assert 1 <= row["noc85"] <= row["noc90"] <= 20
