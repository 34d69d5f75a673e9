"""Automatic mask generation: segment-anything's generator runs Stable-SAM's plug-ins; COCO AP / AR;
``stable-sam amg``; the ``automatic`` stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordingTracker, perturb_plugins, random_stable_sam, repo_params
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from test_evaluate_stage import N_IMAGES, EncoderCounter, make_project

from pipeline.automatic import AutomaticPaths, headline_metrics
from pipeline.automatic import run as automatic
from pipeline.outputs import without_seconds
from pipeline.params_annotator import AutomaticConfig, InteractiveConfig
from stable_sam import save_plugin_checkpoint
from stable_sam.build import build_stable_sam
from stable_sam.cli import main
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import CachedSamPredictor, amg_coco_eval, amg_detections, mask_generator
from stable_sam.modeling import PromptTensors

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

# Every candidate mask is kept (a random SAM's scores are meaningless): the outputs compare in full.
KEEP_ALL = {
    "points_per_side": 4,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}


@pytest.fixture(scope="module")
def plugged():
    """A tiny Stable-SAM with non-trivial plug-in weights, the untouched SAM, and an image."""
    model, vanilla = random_stable_sam("tiny", seed=3)
    perturb_plugins(model, seed=4, scale=0.5)
    image = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return model.eval(), vanilla.eval(), image


def _signature(records: list[dict]) -> list[tuple]:
    """What identifies an automatic mask: its RLE, score, stability and prompt point."""
    return [
        (r["segmentation"]["counts"], round(r["predicted_iou"], 6), round(r["stability_score"], 6))
        for r in records
    ]


def test_segment_anything_generator_runs_the_plugins_and_disabling_them_gives_sam(plugged):
    model, vanilla, image = plugged
    generator = mask_generator(model, output_mode="coco_rle", **KEEP_ALL)
    assert isinstance(generator, SamAutomaticMaskGenerator) and generator.predictor.model is model.sam
    stable = generator.generate(image)
    with model.plugins_disabled():
        sam = generator.generate(image)
    with model.forced_alpha1(0.0):
        alpha0 = generator.generate(image)
    reference = SamAutomaticMaskGenerator(vanilla, output_mode="coco_rle", **KEEP_ALL).generate(image)
    assert len(reference) > 3
    assert _signature(sam) == _signature(reference)
    assert _signature(alpha0) == _signature(reference)
    assert _signature(stable) != _signature(reference)  # the plug-ins change the masks


def test_the_drp_reads_its_output_token_in_segment_anythings_own_predictor(plugged):
    """SamPredictor (what the generator uses) calls sam.mask_decoder directly: the routing and the
    masks equal StableSam.decode's for the same prompts, and α varies per prompt (a hook set by
    decode would leave α constant, or stale, in that path)."""
    model, _, image = plugged
    predictor = SamPredictor(model.sam)
    predictor.set_image(image)
    points = torch.tensor([[[5.0, 6.0]], [[30.0, 40.0]], [[60.0, 10.0]], [[33.0, 33.0]]])
    labels = torch.ones(4, 1, dtype=torch.int)
    with torch.no_grad():
        _, _, low_res = predictor.predict_torch(points, labels, multimask_output=True)
        routed = model.main_site.last_routing.clone()
        out = model.decode(predictor.features, PromptTensors(points, labels), multimask_output=True)
    assert torch.equal(low_res, out.low_res_logits)
    assert torch.equal(routed, out.routing)
    assert routed.shape == (4, 2) and routed[:, 0].std() > 1e-4


def test_cached_predictor_embeds_each_image_once_and_matches_the_uncached_generator(plugged, monkeypatch):
    model, _, image = plugged
    plain = mask_generator(model, output_mode="coco_rle", **KEEP_ALL).generate(image)
    cached = mask_generator(model, cache=EmbeddingCache(), output_mode="coco_rle", **KEEP_ALL)
    assert isinstance(cached.predictor, CachedSamPredictor)
    counter = EncoderCounter(monkeypatch)
    first = cached.generate(image)
    with model.plugins_disabled():
        cached.generate(image)
    assert counter.images == 1  # SAM and Stable-SAM shared one encoder pass
    assert _signature(first) == _signature(plain)


def _gt(masks: list[np.ndarray], categories: list[int]) -> dict:
    annotations = []
    for i, (mask, category) in enumerate(zip(masks, categories), start=1):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        annotations.append(
            {"id": i, "image_id": 7, "category_id": category, "segmentation": rle, "area": float(mask.sum())}
            | {"bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}
        )
    return {
        "images": [{"id": 7, "height": 32, "width": 32}],
        "annotations": annotations,
        "categories": [{"id": 2, "name": "a"}, {"id": 3, "name": "b"}],
    }


def test_coco_eval_is_class_agnostic_and_counts_recall_at_100():
    a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    a[2:12, 2:12] = True
    b[18:30, 15:31] = True
    gt = _gt([a, b], [2, 3])
    rle = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    records = [{"segmentation": rle, "predicted_iou": 0.9, "stability_score": 0.4, "area": 100}]
    detections = amg_detections(records, image_id=7)
    assert detections[0]["category_id"] == 1  # no GT category: matched only class-agnostically
    scores = amg_coco_eval(gt, detections)
    assert scores["ar100"] == pytest.approx(0.5)  # one of the two objects, at every IoU threshold
    assert scores["ap"] == pytest.approx(51 / 101, abs=1e-6)  # precision 1 up to recall 0.5 (101 points)
    assert amg_detections(records, image_id=7, score="stability_score")[0]["score"] == 0.4
    assert amg_coco_eval(gt, []) == dict.fromkeys(scores, 0.0)


def test_params_sections_have_no_defaults_and_map_onto_the_generator():
    for section in (AutomaticConfig, InteractiveConfig):
        for f in dataclasses.fields(section):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
    options = repo_params().automatic.generator_options()
    SamAutomaticMaskGenerator(random_stable_sam("tiny")[1], **options)  # every key is the generator's
    assert options["output_mode"] == "coco_rle"


@pytest.fixture
def cli_files(tmp_path, plugged):
    """A tiny SAM checkpoint and a non-trivial plug-in checkpoint for it, and an image."""
    _, vanilla, image = plugged
    torch.save(vanilla.state_dict(), tmp_path / "sam_tiny.pth")
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=tmp_path / "sam_tiny.pth")
    perturb_plugins(model, seed=4, scale=0.5)
    save_plugin_checkpoint(model, tmp_path / "plugin.pt")
    Image.fromarray(image[:48]).save(tmp_path / "scene.png")  # not square: SAM's longest-side frame
    return tmp_path


def _amg_cli(files: Path, out: str, *extra: str) -> list[str]:
    return [
        "amg", str(files / "scene.png"), "--sam-type", "tiny", "--sam-checkpoint", str(files / "sam_tiny.pth"),
        "--plugin", str(files / "plugin.pt"), "--points-per-side", "4", "--pred-iou-thresh", "0",
        "--stability-score-thresh", "0", "--out-dir", str(files / out), *extra,
    ]  # fmt: skip


def test_cli_amg_writes_coco_rle_and_an_overlay(cli_files, capsys):
    assert main(_amg_cli(cli_files, "stable")) == 0
    summary = json.loads(capsys.readouterr().out)
    records = json.loads((cli_files / "stable" / "scene_masks.json").read_text())
    assert summary["masks"] == len(records) > 0 and summary["model"] == "Stable-SAM"
    for record in records:
        mask = mask_utils.decode(record["segmentation"])
        assert mask.shape == (48, 64) and record["area"] == int(mask.sum())
        x, y, w, h = record["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max(), rows.max())
        assert {"predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(record)
    overlay = Image.open(cli_files / "stable" / "scene_amg.png")
    assert overlay.size == (64, 48)
    assert not np.array_equal(np.asarray(overlay), np.asarray(Image.open(cli_files / "scene.png")))
    assert main(_amg_cli(cli_files, "sam", "--no-plugin")) == 0
    sam = json.loads((cli_files / "sam" / "scene_masks.json").read_text())
    assert _signature(sam) != _signature(records)


def test_cli_amg_plugin_needs_the_sam_checkpoint(cli_files):
    args = _amg_cli(cli_files, "x")
    del args[args.index("--sam-checkpoint") : args.index("--sam-checkpoint") + 2]
    with pytest.raises(SystemExit, match="needs --sam-checkpoint"):
        main(args)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    return make_project(tmp_path_factory.mktemp("amg_project"))


def test_stage_writes_results_metrics_and_figure(project, tmp_path, monkeypatch):
    params = repo_params(
        automatic={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        tracking={"enabled": False},
    )
    paths = AutomaticPaths(
        project["base"],
        project["plugin"],
        project["raw"],
        tmp_path / "r.json",
        tmp_path / "m.json",
        tmp_path / "f.png",
    )
    counter = EncoderCounter(monkeypatch)
    tracker = RecordingTracker()  # checks each call against the real tracker's signature
    results = automatic(params, paths, tracker=tracker)
    (dataset,) = [(args, kwargs) for what, args, kwargs in tracker.calls if what == "log_dataset"]
    assert dataset[0][0].name == "val" and dataset[1] == {"context": "evaluation"}  # the split, not the root
    assert counter.images == N_IMAGES  # one encoder pass per image for both models
    entry = results["sets"]["embedded"]
    assert entry["images"] == N_IMAGES and entry["instances"] > N_IMAGES
    assert set(entry["models"]) == {"sam", "stable_sam"}
    for row in entry["models"].values():
        assert set(row) == set(results["columns"]) and 0 <= row["ar100"] <= 100 and 0 <= row["ap"] <= 100
        assert row["masks_per_image"] > 0
    assert entry["delta"]["ap"] == pytest.approx(
        entry["models"]["stable_sam"]["ap"] - entry["models"]["sam"]["ap"]
    )
    assert set(entry["better"]) == set(results["columns"]) - {"masks_per_image"}
    for metric, winner in entry["better"].items():
        sam, stable = entry["models"]["sam"][metric], entry["models"]["stable_sam"][metric]
        assert winner == ("tie" if sam == stable else "stable_sam" if stable > sam else "sam")
    assert json.loads(paths.metrics.read_text()) == headline_metrics(results)
    assert json.loads(paths.results.read_text())["sets"] == without_seconds(results["sets"])  # no wall times
    assert Image.open(paths.figure).size[0] > 3 * 64


def test_stage_refuses_a_set_without_coco_instances(project, tmp_path):
    (project["root"] / "folder" / "im").mkdir(parents=True)
    (project["root"] / "folder" / "gt").mkdir()
    params = repo_params(automatic={"sets": [str(project["root"] / "folder")]}, tracking={"enabled": False})
    paths = AutomaticPaths(project["base"], project["plugin"], project["raw"], *(tmp_path / n for n in "abc"))
    with pytest.raises(ValueError, match="no COCO instance annotations"):
        automatic(params, paths)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_stage_on_the_small_model_and_the_embedded_val_split(tmp_path):
    """The committed default (small SAM, trained plug-in, 64 embedded val images); needs the DVC
    outputs models/ and data/raw of a `dvc repro` (skipped without them)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "models" / "stable_sam" / "plugin.pt").is_file() or not (root / "data" / "raw").is_dir():
        pytest.skip("needs models/ and data/raw from `dvc repro`")
    paths = AutomaticPaths(root / "models" / "base", root / "models" / "stable_sam", root / "data" / "raw",
                           tmp_path / "r.json", tmp_path / "m.json", tmp_path / "f.png")  # fmt: skip
    results = automatic(repo_params(tracking={"enabled": False}), paths)
    rows = results["sets"]["embedded"]["models"]
    assert results["sets"]["embedded"]["images"] == 64
    assert all(0 < rows[m]["ar100"] < 100 for m in rows)
