"""The embed and evaluate stages (run): tiny data, a random tiny SAM, a perturbed plug-in.

``make_project`` (also used by the ablate and report stage tests) writes, under a folder:
raw/ (an embedded-layout val split of 64 x 64 images with gt/, instances/ and a COCO
instances.json, plus the raw-data manifest), base/ (a tiny SAM checkpoint and sam.json) and
plugin/ (a plug-in checkpoint moved away from its identity initialisation).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_plugins, repo_params
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.modeling import ImageEncoderViT

from pipeline.effect import effect_numbers
from pipeline.embed import EmbedPaths
from pipeline.embed import run as embed
from pipeline.evaluate import EvaluatePaths
from pipeline.evaluate import run as evaluate
from pipeline.params import Params
from pipeline.raw_data import write_raw_manifest
from pipeline.sam_source import SamSource, write_sam_source
from stable_sam.atomic_write import AtomicFileSet
from stable_sam.build import build_sam, build_stable_sam
from stable_sam.checkpoint import file_sha256, save_plugin_checkpoint
from stable_sam.config import PluginConfig, TuningConfig

N_IMAGES = 4
SIZE = 64
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
EFFECT_KEYS = {"gt_box", "noisy_box", "point_1", "point_3", "point_10"}


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background with 3 objects (rectangles, an ellipse); returns (image, instance ids)."""
    image = rng.integers(0, 90, size=(SIZE, SIZE, 3), dtype=np.uint8)
    ids = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for k in range(1, 4):
        y0, x0 = rng.integers(2, SIZE // 2, size=2)
        h, w = rng.integers(12, SIZE // 2, size=2)
        if k == 3:
            mask = ((yy - y0 - h / 2) / (h / 2)) ** 2 + ((xx - x0 - w / 2) / (w / 2)) ** 2 <= 1
        else:
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        image[mask] = rng.integers(110, 255, size=3, dtype=np.uint8)
        ids[mask] = k
    return image, ids


def write_val_split(root: Path, *, count: int = N_IMAGES, seed: int = 0) -> Path:
    """<root>/val/{im,gt,instances}/ + instances.json (COCO, RLE), the embedded dataset's layout."""
    val = root / "val"
    for sub in ("im", "gt", "instances"):
        (val / sub).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        image, ids = _scene(rng)
        present = [k for k in range(1, 4) if (ids == k).sum() >= 20]
        target = present[0]
        name = f"val_{i:05d}"
        Image.fromarray(image).save(val / "im" / f"{name}.jpg", quality=95)
        Image.fromarray(((ids == target) * 255).astype(np.uint8)).save(val / "gt" / f"{name}.png")
        Image.fromarray(ids).save(val / "instances" / f"{name}.png")
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": SIZE, "width": SIZE})
        for k in present:
            rle = mask_utils.encode(np.asfortranarray((ids == k).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1 + (k == 3),
                    "segmentation": rle,
                    "area": float((ids == k).sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]
    (val / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return val


def make_project(
    root: Path, *, tuning: TuningConfig | None = None, plugin: PluginConfig | None = None
) -> dict[str, Path]:
    """raw/, base/ and plugin/ under ``root`` (see the module docstring)."""
    raw = root / "raw"
    write_val_split(raw / "embedded")
    write_raw_manifest(raw, {"source": "embedded", "datasets": {"embedded": {"root": "embedded"}}})
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sam, _ = build_sam("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    checkpoint = base / "sam_tiny.pth"
    torch.save(sam.state_dict(), checkpoint)
    write_sam_source(base, SamSource("tiny", str(checkpoint), file_sha256(checkpoint), "trained"))
    plugin_dir = root / "plugin"
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_stable_sam(
            sam_type="tiny", sam_checkpoint=checkpoint, plugin_config=plugin, tuning=tuning
        )
    perturb_plugins(model, seed=2, scale=0.3)
    save_plugin_checkpoint(model, plugin_dir / "plugin.pt")
    return {"root": root, "raw": raw, "base": base, "plugin": plugin_dir}


def tiny_params(**eval_kwargs) -> Params:
    cfg = {"draws": 3, "num_figures": 1, **eval_kwargs}
    return repo_params(data={"val": ["embedded"]}, eval=cfg, tracking={"enabled": False})


def eval_paths(project: dict[str, Path], out: Path, *, plugin: Path | None = None) -> EvaluatePaths:
    return EvaluatePaths(
        base=project["base"],
        plugin=plugin or project["plugin"],
        raw=project["raw"],
        embeddings=project["root"] / "embeddings",
        results=out / "reports" / "evaluation.json",
        metrics=out / "metrics" / "evaluate.json",
        per_image=out / "reports" / "per_image.csv",
        figures=out / "plots" / "evaluate",
    )


class EncoderCounter:
    """Counts images through every ImageEncoderViT.forward (whatever model instance runs it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        original = ImageEncoderViT.forward

        def counted(module, x):
            self.images += x.shape[0]
            return original(module, x)

        monkeypatch.setattr(ImageEncoderViT, "forward", counted)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    project = make_project(tmp_path_factory.mktemp("project"))
    embed(
        tiny_params(),
        EmbedPaths(
            project["base"], project["raw"], project["root"] / "embeddings", project["root"] / "embed.json"
        ),
    )
    return project


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("evaluated")
    return evaluate(tiny_params(), eval_paths(project, out)), out


def test_embed_writes_one_entry_per_image(project):
    metrics = json.loads((project["root"] / "embed.json").read_text())
    # 4 HQ images + the same 4 images as the COCO view: 4 encoder passes, 4 reuses
    assert (metrics["images"], metrics["encoder_passes"], metrics["reused"]) == (
        2 * N_IMAGES,
        N_IMAGES,
        N_IMAGES,
    )
    assert len(list((project["root"] / "embeddings").rglob("*.pt"))) == N_IMAGES
    index = json.loads((project["root"] / "embeddings" / "index.json").read_text())
    assert index["datasets"] == {"embedded": {"images": N_IMAGES, "coco_images": N_IMAGES}}


def test_effect_numbers_have_exactly_the_headline_shape(evaluated):
    metrics, _ = evaluated
    effect = effect_numbers(metrics["mean"])
    assert set(effect) == {"base", "stable_sam"}
    assert set(effect["base"]) == EFFECT_KEYS and set(effect["stable_sam"]) == EFFECT_KEYS
    for kind in EFFECT_KEYS:
        assert set(effect["base"][kind]) == {"miou", "mbiou", "st"}
        assert set(effect["stable_sam"][kind]) == {"miou", "mbiou", "st", "alpha1"}
        for value in [*effect["base"][kind].values(), *effect["stable_sam"][kind].values()]:
            assert isinstance(value, float)
        assert 0.0 <= effect["stable_sam"][kind]["miou"] <= 100.0  # percent
    assert effect["base"]["gt_box"]["st"] == effect["stable_sam"]["gt_box"]["st"] == 100.0
    assert 0.0 < effect["stable_sam"]["point_1"]["alpha1"] < 1.0
    assert effect["base"]["noisy_box"]["miou"] == pytest.approx(
        metrics["mean"]["sam"]["noisy_box"]["miou"], abs=1e-4
    )


def test_metrics_are_the_mean_summary_and_sam_differs_from_stable_sam(evaluated):
    metrics, out = evaluated
    mean = metrics["mean"]
    assert mean["sam"] != mean["stable_sam"]
    assert metrics["baseline"] == "same model with the plug-ins disabled"
    assert metrics["embedding_cache"] == {
        "hits": 2 * N_IMAGES,
        "computed_here": 0,
        "bypassed": [],
        "encoder_passes": 0,
    }
    results = json.loads((out / "reports" / "evaluation.json").read_text())
    assert results["mean"] == json.loads(json.dumps(mean))
    assert "seconds" not in results and metrics["seconds"]["total"] > 0  # timings: returned, not written
    compact = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert set(compact) == {"mean", "coco"}  # what DVC compares: no timings, no counts
    assert set(compact["mean"]) == {"sam", "stable_sam"}
    assert set(compact["mean"]["sam"]) == set(metrics["prompts"])
    assert compact["mean"]["sam"]["noisy_box"] == {
        k: pytest.approx(mean["sam"]["noisy_box"][k], abs=1e-3) for k in ("miou", "mbiou", "st")
    }
    assert set(compact["mean"]["stable_sam"]["point_1"]) == {"miou", "mbiou", "st", "alpha1"}
    assert set(compact["coco"]["embedded"]) == {"sam_map", "sam_map50", "stable_sam_map", "stable_sam_map50"}
    coco = metrics["coco"]["embedded"]
    assert coco["images"] == N_IMAGES and coco["prompted"] == coco["instances"] > N_IMAGES
    for setting in ("sam", "stable_sam"):
        assert 0.0 <= coco[setting]["map"] <= coco[setting]["map50"] <= 100.0


def test_csv_and_figures_and_no_markdown(evaluated):
    _, out = evaluated
    assert not list(out.rglob("*.md"))  # the report stage alone renders markdown
    with open(out / "reports" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_IMAGES * 6  # 6 prompt types
    row = next(r for r in rows if r["kind"] == "noisy_box")
    assert float(row["delta_iou"]) == pytest.approx(
        float(row["iou_stable_sam"]) - float(row["iou_sam"]), abs=1e-4
    )
    pngs = sorted(p.name for p in (out / "plots" / "evaluate").glob("*.png"))
    assert pngs == ["embedded_val_00000_offsets.png", "embedded_val_00000_sam_vs_stable_sam.png"]
    assert Image.open(out / "plots" / "evaluate" / pngs[1]).size[0] > 100


def test_evaluate_never_runs_the_encoder_after_embed(project, tmp_path, monkeypatch):
    counter = EncoderCounter(monkeypatch)
    evaluate(tiny_params(num_figures=0, prompts=["gt_box"]), eval_paths(project, tmp_path))
    assert counter.images == 0


def test_decoder_tuned_checkpoint_is_compared_with_a_plain_sam(tmp_path, evaluated):
    reference, _ = evaluated
    project = make_project(tmp_path / "p", tuning=TuningConfig(decoder="full"))
    embed(
        tiny_params(),
        EmbedPaths(project["base"], project["raw"], project["root"] / "embeddings", tmp_path / "e.json"),
    )
    metrics = evaluate(tiny_params(num_figures=0), eval_paths(project, tmp_path / "out"))
    assert metrics["baseline"].startswith("a separate plain SAM")
    # The same SAM weights and prompts: the baseline equals the frozen project's "plug-ins off" SAM.
    assert metrics["mean"]["sam"] == reference["mean"]["sam"]


def test_lora_checkpoint_bypasses_the_cache_and_says_so(tmp_path, monkeypatch):
    project = make_project(
        tmp_path / "p",
        plugin=PluginConfig(variant="none"),
        tuning=TuningConfig(encoder="lora", decoder="prediction_head"),
    )
    embed(
        tiny_params(),
        EmbedPaths(project["base"], project["raw"], project["root"] / "embeddings", tmp_path / "e.json"),
    )
    counter = EncoderCounter(monkeypatch)
    metrics = evaluate(tiny_params(num_figures=0, prompts=["gt_box"]), eval_paths(project, tmp_path / "out"))
    # Only the LoRA model embeds (HQ view + COCO view); the plain-SAM baseline reads the cache.
    assert counter.images == 2 * N_IMAGES
    (line,) = metrics["embedding_cache"]["bypassed"]
    assert "lora" in line and f"{2 * N_IMAGES} images" in line
    results = json.loads((tmp_path / "out" / "reports" / "evaluation.json").read_text())
    assert results["embedding_cache"]["encoder_passes"] == 2 * N_IMAGES
    assert effect_numbers(metrics["mean"])["stable_sam"]["gt_box"]["alpha1"] is None  # no routing
    compact = json.loads((tmp_path / "out" / "metrics" / "evaluate.json").read_text())
    assert "alpha1" not in compact["mean"]["stable_sam"]["gt_box"]


def _output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_outputs_are_replaced_as_one_set(project, tmp_path, monkeypatch):
    out = tmp_path / "out"
    evaluate(tiny_params(draws=1), eval_paths(project, out))
    old = _output_files(out)
    assert set(old) >= {"reports/evaluation.json", "metrics/evaluate.json", "reports/per_image.csv"}
    assert any(name.startswith("plots/evaluate/") for name in old)

    # A failure after the first new file was written (disk full, a kill): nothing old is replaced.
    original, calls = AtomicFileSet.write_text, []

    def fail_after_first(self, path, text):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        original(self, path, text)

    monkeypatch.setattr(AtomicFileSet, "write_text", fail_after_first)
    with pytest.raises(OSError, match="No space left"):
        evaluate(tiny_params(draws=2), eval_paths(project, out))
    assert len(calls) == 2
    assert _output_files(out) == old  # every old file unchanged, no temporary left

    monkeypatch.setattr(AtomicFileSet, "write_text", original)
    evaluate(tiny_params(draws=2), eval_paths(project, out))
    new = _output_files(out)
    assert set(new) == set(old)
    assert json.loads(new["reports/evaluation.json"])["draws"] == 2
    changed = {name for name in old if new[name] != old[name]}
    assert {"reports/evaluation.json", "metrics/evaluate.json", "reports/per_image.csv"} <= changed
    # The same inputs again: every output byte for byte (no timings in any of them).
    evaluate(tiny_params(draws=2), eval_paths(project, out))
    assert _output_files(out) == new


def test_a_folder_with_an_undecodable_image_is_evaluated_once_per_distinct_image(project, tmp_path):
    """A plain folder as data.val: the broken pair is skipped and named in evaluation.json, never
    replaced by another image (which would count that image twice and bias mIoU)."""
    folder = write_val_split(tmp_path / "folder", count=N_IMAGES + 1, seed=3)
    (folder / "instances.json").unlink()  # a plain HQSeg-layout folder (im/ + gt/), no COCO part
    broken = sorted((folder / "im").glob("*.jpg"))[1]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG: the header reads, pixels do not
    params = tiny_params(prompts=["gt_box"])
    params.data = dataclasses.replace(params.data, val=[str(folder)])
    metrics = evaluate(params, eval_paths(project, tmp_path / "eval"))
    (name,) = metrics["images"]
    assert metrics["images"][name] == N_IMAGES
    assert metrics["skipped"][name]["count"] == 1
    (record,) = metrics["skipped"][name]["files"]
    assert record["path"] == str(broken) and "corrupt image" in record["reason"]
    assert metrics["datasets"][name]["stable_sam"]["gt_box"]["n"] == N_IMAGES
