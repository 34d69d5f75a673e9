"""The evaluation protocols a set brings with it, through the embed and evaluate stages:
the resize of each set (``data.eval_resize``: "auto" = each set's protocol, stretch for the HQ
  sets like HQ-SAM, longest side for COCO val2017 like SAM's and HQ-SAM's COCO numbers; a mode or a
  mapping overrides it), the same for the embedding cache's keys and the decoding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
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
