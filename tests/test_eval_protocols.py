"""The evaluation protocols a set brings with it, through the embed and evaluate stages:

- the resize of each set (``data.eval_resize``: "auto" = each set's protocol, stretch for the HQ
  sets like HQ-SAM, longest side for COCO val2017 like SAM's and HQ-SAM's COCO numbers; a mode or a
  mapping overrides it), the same for the embedding cache's keys and the decoding;
- COCO with a detector's boxes (``eval.coco_detections``, HQ-SAM's COCO protocol).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARAMS_FILE
from PIL import Image
from pycocotools import mask as mask_utils
from test_evaluate_stage import eval_paths, make_project, tiny_params

from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.eval_inputs import set_resize
from pipeline.evaluate import run as evaluate
from pipeline.params import Overlay, Params, load_params
from pipeline.raw_data import write_raw_manifest
from pipeline.sam_source import SamSource, write_sam_source
from pipeline.sources import generate_split
from stable_sam.build import build_stable_sam
from stable_sam.checkpoint import file_sha256, save_plugin_checkpoint
from stable_sam.evaluation import DetectionsError

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
COCO_IMAGES = 3


# ------------------------------------------------------------------------------------------------
# The resize of each set


def test_each_set_gets_its_protocol_resize_and_the_setting_overrides_it():
    for spec in ("DIS-VD", "COIFT", "HR-SOD", "ThinObject5K-TE", "embedded", "/data/my_folder"):
        assert set_resize("auto", spec) == "stretch", spec  # HQ-SAM's evaluation
    assert set_resize("auto", "coco_val2017") == "longest_side"  # SAM's and HQ-SAM's COCO protocols
    assert set_resize("stretch", "coco_val2017") == "stretch"  # a mode is every set's
    assert set_resize("longest_side", "DIS-VD") == "longest_side"
    mapping = {"coco_val2017": "stretch", "my_folder": "longest_side"}
    assert set_resize(mapping, "coco_val2017") == "stretch"
    assert set_resize(mapping, "/data/my_folder") == "longest_side"  # by the name reports show
    assert set_resize(mapping, "DIS-VD") == "stretch"  # not named: its protocol


def test_the_committed_params_keep_every_default_set_at_stretch_and_the_cluster_gets_coco_longest_side():
    params = load_params(PARAMS_FILE)
    assert params.data.eval_resize == "auto"
    assert {spec: set_resize(params.data.eval_resize, spec) for spec in params.data.val} == {
        "embedded": "stretch"
    }
    cluster = load_params(PARAMS_FILE, [Overlay(str(REPO / "configs" / "vit_l_hqseg44k.yaml"))])
    modes = {spec: set_resize(cluster.data.eval_resize, spec) for spec in cluster.data.val}
    assert modes == {
        "DIS-VD": "stretch",
        "COIFT": "stretch",
        "HR-SOD": "stretch",
        "ThinObject5K-TE": "stretch",
        "coco_val2017": "longest_side",
    }


def write_coco_layout(root: Path, *, count: int = COCO_IMAGES, shape: tuple[int, int] = (48, 64)) -> Path:
    """``root/val2017/*.jpg`` + ``root/annotations/instances_val2017.json`` (COCO val2017's layout),
    wide images with 2 rectangles each (RLE)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([9, i])
        image = rng.integers(0, 90, size=(*shape, 3), dtype=np.uint8)
        for k in range(2):
            mask = np.zeros(shape, bool)
            y0, x0 = rng.integers(2, shape[0] // 2), rng.integers(2, shape[1] // 2)
            mask[y0 : y0 + rng.integers(8, shape[0] // 2), x0 : x0 + rng.integers(8, shape[1] // 2)] = True
            image[mask] = rng.integers(110, 255, size=3, dtype=np.uint8)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 100 + i,
                    "category_id": k + 1,
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        Image.fromarray(image).save(root / "val2017" / f"{100 + i:012d}.jpg", quality=95)
        images.append(
            {"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "height": shape[0], "width": shape[1]}
        )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def _with(params: Params, **data) -> Params:
    params.data = dataclasses.replace(params.data, **data)
    return params


def _coco_params(**eval_kwargs) -> Params:
    return _with(tiny_params(**eval_kwargs), val=["embedded", "coco_val2017"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """The tiny project with COCO val2017 beside the embedded set, embedded under auto."""
    project = make_project(tmp_path_factory.mktemp("project"))
    write_coco_layout(project["raw"] / "coco")
    write_raw_manifest(
        project["raw"],
        {
            "source": "embedded",
            "datasets": {"embedded": {"root": "embedded"}, "coco_val2017": {"root": "coco"}},
        },
    )
    project["embed_json"] = project["root"] / "embed.json"
    embed(
        _coco_params(),
        EmbedPaths(project["base"], project["raw"], project["root"] / "embeddings", project["embed_json"]),
    )
    return project


def test_each_set_is_embedded_and_evaluated_with_its_own_resize(project, tmp_path):
    modes = {"embedded": "stretch", "coco_val2017": "longest_side"}
    assert json.loads(project["embed_json"].read_text())["resize"] == modes
    assert json.loads((project["root"] / "embeddings" / "index.json").read_text())["resize"] == modes
    metrics = evaluate(_coco_params(prompts=["gt_box"], num_figures=0), eval_paths(project, tmp_path))
    results = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert results["resize"] == metrics["resize"] == modes  # recorded per set
    assert metrics["embedding_cache"]["computed_here"] == 0  # evaluate found every embedding
    coco = metrics["coco"]["coco_val2017"]
    assert coco["images"] == COCO_IMAGES and coco["instances"] == 2 * COCO_IMAGES
    assert "detections" not in coco and "coco_detections" not in json.loads(
        (tmp_path / "metrics" / "evaluate.json").read_text()
    )


def test_the_setting_overrides_the_protocol_and_the_cache_tells_the_modes_apart(project, tmp_path):
    params = _with(_coco_params(prompts=["gt_box"], num_figures=0), eval_resize="stretch")
    metrics = evaluate(params, eval_paths(project, tmp_path / "stretch"))
    assert metrics["resize"] == {"embedded": "stretch", "coco_val2017": "stretch"}
    # COCO's stretched images are not the cached longest-side ones: computed here, and said so.
    assert metrics["embedding_cache"]["computed_here"] == COCO_IMAGES
    params = _with(_coco_params(prompts=["gt_box"], num_figures=0), eval_resize={"embedded": "longest_side"})
    metrics = evaluate(params, eval_paths(project, tmp_path / "mapping"))
    assert metrics["resize"] == {"embedded": "longest_side", "coco_val2017": "longest_side"}


# ------------------------------------------------------------------------------------------------
# COCO with a detector's boxes


def _detections(annotations: Path, path: Path, **changes) -> Path:
    """Every GT box of a COCO annotation file as a detection (score 1, the GT category)."""
    gt = json.loads(annotations.read_text())
    entries = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
            **changes,
        }
        for a in gt["annotations"]
    ]
    path.write_text(json.dumps(entries))
    return path


def test_a_bad_detections_file_or_set_stops_evaluate_before_any_work(project, tmp_path, monkeypatch):
    annotations = project["raw"] / "coco" / "annotations" / "instances_val2017.json"
    bad = _detections(annotations, tmp_path / "dets.json", image_id=5)
    params = _coco_params(coco_detections={"coco_val2017": str(bad)})
    monkeypatch.setattr("pipeline.evaluate._evaluate_set", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(
        DetectionsError, match=rf"^{bad}: detection 0 image_id 5 is not an image of the annotations"
    ):
        evaluate(params, eval_paths(project, tmp_path / "out"))
    params = tiny_params(coco_detections={"DIS-VD": str(bad)})
    with pytest.raises(ValueError, match=r"eval.coco_detections names \['DIS-VD'\]: not a COCO-format set"):
        evaluate(params, eval_paths(project, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_project(tmp_path_factory) -> dict[str, Path]:
    """The released small base SAM (it segments what a box points at) with an identity plug-in
    (Stable-SAM = SAM at step 0), on a folder of the embedded generator's 128 px scenes."""
    root = tmp_path_factory.mktemp("small")
    folder = root / "scenes"
    generate_split(folder, num_images=8, image_size=128, generator_seed=11, split="val")
    raw = root / "raw"
    write_raw_manifest(raw, {"source": "local", "datasets": {}})
    base = root / "base"
    checkpoint = REPO / "base" / "release" / "sam_small.pth"
    write_sam_source(base, SamSource("small", str(checkpoint), file_sha256(checkpoint), "released"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_stable_sam(sam_type="small", sam_checkpoint=checkpoint)
    save_plugin_checkpoint(model, root / "plugin" / "plugin.pt")
    return {"root": root, "raw": raw, "base": base, "plugin": root / "plugin", "folder": folder}


def test_detector_boxes_that_are_the_gt_boxes_beat_the_noisy_boxes(small_project, tmp_path):
    folder = small_project["folder"]
    dets = _detections(folder / "instances.json", tmp_path / "gt_boxes.json")
    shutil.copy(dets, tmp_path / "copy.json")
    params = _with(
        tiny_params(prompts=["gt_box"], draws=1, num_figures=0, coco_detections={"scenes": str(dets)}),
        val=[str(folder)],
    )
    metrics = evaluate(params, eval_paths(small_project, tmp_path / "out"))
    entry = metrics["coco"]["scenes"]
    boxed = entry["detections"]
    assert boxed["prompted"] == boxed["in_file"] == entry["instances"]
    assert (boxed["below_min_score"], boxed["outside"], boxed["score"]) == (0, 0, "detection_x_iou")
    assert boxed["sha256"] == file_sha256(tmp_path / "copy.json") and boxed["file"] == str(dets)
    for setting in ("sam", "stable_sam"):
        # the GT boxes (mAP 19 on these scenes) vs boxes of IoU 0.5-0.6 with them (mAP 8)
        assert boxed[setting]["map"] > entry[setting]["map"] + 5, (boxed, entry)
        assert boxed[setting]["map50"] > entry[setting]["map50"], (boxed, entry)
    compact = json.loads((tmp_path / "out" / "metrics" / "evaluate.json").read_text())
    assert set(compact["coco_detections"]["scenes"]) == {
        "sam_map",
        "sam_map50",
        "stable_sam_map",
        "stable_sam_map50",
    }
    assert compact["coco_detections"]["scenes"]["sam_map"] == pytest.approx(boxed["sam"]["map"], abs=1e-3)
    # A score floor above every detection leaves none: AP 0, and the file's count says why.
    params.eval = dataclasses.replace(params.eval, coco_detection_min_score=1.5)
    boxed = evaluate(params, eval_paths(small_project, tmp_path / "none"))["coco"]["scenes"]["detections"]
    assert (boxed["prompted"], boxed["below_min_score"], boxed["sam"]["map"]) == (0, entry["instances"], 0.0)
