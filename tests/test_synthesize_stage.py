"""The synthesize stage (run): a versioned, deterministic occlusion dataset with provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS_FILE, repo_params
from PIL import Image

from pipeline.fetch import FetchPaths
from pipeline.fetch import run as fetch
from pipeline.params import Params
from pipeline.raw_data import write_raw_manifest
from pipeline.synthesize import SynthesisError, SynthesizePaths, main, run, worker_count
from stable_sam.config import ConfigError, check_config


def _params(workers: int | None = 0, train: dict | None = None, **occlusion) -> Params:
    return repo_params(
        fetch={"source": "embedded"},
        embedded=dict(num_train=12, num_val=2, image_size=64, min_objects=2, max_objects=4, seed=2),
        occlusion=occlusion,
        synthesize={"workers": workers},
        **({"train": train} if train else {}),
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    fetch(_params(), FetchPaths(out))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_occluded_dataset_layout_and_provenance(raw, tmp_path):
    out = tmp_path / "occluded"
    metrics = run(_params(probability=1.0), SynthesizePaths(raw, out))
    assert metrics["source_images"] == 12 and metrics["outputs"] == 12
    assert metrics["occluded"] + metrics["unchanged"] == 12 and metrics["occluded"] >= 9
    assert 0.1 <= metrics["mean_visible_fraction"] < 1.0
    for sub in ("im", "gt", "instances"):
        assert len(list((out / sub).iterdir())) == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["seed"] == 0
        and manifest["config"]["probability"] == 1.0
        and len(manifest["dataset_id"]) == 16
    )
    assert manifest["totals"]["occluded"] == metrics["occluded"]
    for entry in manifest["outputs"]:
        assert (raw / entry["source_image"]).is_file()
        if not entry["occluded"]:
            continue
        assert entry["occluder"]["image"] != entry["source_image"]  # another image
        assert (raw / entry["occluder"]["image"]).is_file() and entry["occluder"]["instance"] >= 1
        assert {"centre_x", "centre_y", "scale", "flip"} <= entry["placement"].keys()
        assert 0.1 <= entry["visible_fraction"] < 1.0
        name = entry["name"]
        gt = np.asarray(Image.open(out / "gt" / f"{name}.png")) == 255
        inst = np.asarray(Image.open(out / "instances" / f"{name}.png"))
        source_gt = np.asarray(Image.open(raw / "embedded/train/gt" / f"{name}.png")) == 255
        # The GT is the visible part of the original target, and one of the instances.
        assert not (gt & ~source_gt).any()
        assert gt.sum() == pytest.approx(entry["visible_fraction"] * source_gt.sum(), abs=1)
        assert any(np.array_equal(gt, inst == k) for k in np.unique(inst) if k)
        occluder_id = inst.max()  # the pasted occluder is the topmost instance
        assert not (gt & (inst == occluder_id)).any()
    png = (out / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_deterministic_by_seed(raw, tmp_path):
    run(_params(), SynthesizePaths(raw, tmp_path / "a"))
    run(_params(), SynthesizePaths(raw, tmp_path / "b"))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    run(_params(seed=1), SynthesizePaths(raw, tmp_path / "c"))
    manifest = lambda d: json.loads((tmp_path / d / "manifest.json").read_text())  # noqa: E731
    assert manifest("a")["dataset_id"] == manifest("b")["dataset_id"] != manifest("c")["dataset_id"]
    # Rerunning into the same folder is idempotent.
    run(_params(), SynthesizePaths(raw, tmp_path / "a"))
    assert _files(tmp_path / "a") == a


def test_unchanged_images_are_hard_links_and_copies_multiply(raw, tmp_path):
    out = tmp_path / "occluded"
    metrics = run(_params(probability=0.0), SynthesizePaths(raw, out))
    assert metrics["unchanged"] == 12 and metrics["occluded"] == 0
    src = raw / "embedded/train/im/train_00000.jpg"
    assert os.stat(out / "im/train_00000.jpg").st_ino == os.stat(src).st_ino
    metrics = run(_params(copies=2, probability=0.5), SynthesizePaths(raw, tmp_path / "two"))
    assert metrics["outputs"] == 24
    assert (tmp_path / "two/im/train_00000__c1.jpg").is_file()


def _user_folder(folder: Path, names: list[str], *, empty: int | None = None) -> Path:
    """A user folder in the HQSeg layout (GT masks only): random images, one rectangle each."""
    rng = np.random.default_rng(0)
    for sub in ("im", "gt"):
        (folder / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "im" / f"{name}.jpg")
        mask = np.zeros((40, 48), np.uint8)
        if i != empty:
            mask[10:30, 8 + i : 30 + i] = 255
        Image.fromarray(mask).save(folder / "gt" / f"{name}.png")
    return folder


def _user_params(folder: Path, workers: int = 0) -> Params:
    return repo_params(
        data={"train": [str(folder)]}, occlusion={"probability": 1.0}, synthesize={"workers": workers}
    )


def test_bad_files_are_skipped_and_recorded(tmp_path):
    """A user folder in the HQSeg layout (GT masks only) with a corrupt image and an empty mask."""
    folder = _user_folder(tmp_path / "mine", [f"x{i}" for i in range(5)], empty=3)
    (folder / "im" / "x1.jpg").write_bytes(b"broken")
    raw = tmp_path / "raw"
    write_raw_manifest(raw, {"source": "local", "datasets": {}})
    params = _user_params(folder)
    metrics = run(params, SynthesizePaths(raw, tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"x1.jpg", "x3.jpg"} and "empty mask" in reasons["x3.jpg"]
    assert metrics["skipped"] == 2 and metrics["outputs"] == 3
    assert not (tmp_path / "out" / "instances").exists()  # no instance maps in the source
    assert sorted(p.name for p in (tmp_path / "out" / "im").iterdir()) == ["x0.jpg", "x2.jpg", "x4.jpg"]


def test_a_pool_of_workers_writes_the_very_same_folder(raw, tmp_path):
    """Every file (images, masks, instance maps, manifest, examples figure) byte for byte, also
    with copies and with unusable files met as sources and as occluders (the skipped list's order)."""
    run(_params(workers=1, probability=0.7, copies=2), SynthesizePaths(raw, tmp_path / "one"))
    metrics = run(_params(workers=2, probability=0.7, copies=2), SynthesizePaths(raw, tmp_path / "pool"))
    assert metrics["workers"] == 2 and metrics["outputs"] == 24
    one = _files(tmp_path / "one")
    assert len(one) == 3 * 24 + 2 and _files(tmp_path / "pool") == one
    assert not list(tmp_path.glob(".pool.tmp-*"))

    folder = _user_folder(tmp_path / "mine", [f"x{i}" for i in range(8)], empty=5)
    (folder / "im" / "x2.jpg").write_bytes(b"broken")
    user_raw = tmp_path / "raw"
    write_raw_manifest(user_raw, {"source": "local", "datasets": {}})
    run(_user_params(folder, workers=0), SynthesizePaths(user_raw, tmp_path / "user_one"))
    run(_user_params(folder, workers=2), SynthesizePaths(user_raw, tmp_path / "user_pool"))
    one = _files(tmp_path / "user_one")
    assert len(json.loads(one["manifest.json"])["skipped"]) == 2
    assert _files(tmp_path / "user_pool") == one


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_image_is_named_and_nothing_is_left_behind(tmp_path, workers):
    """A real failure inside a worker: names so long that the occluded output's temporary file
    name exceeds the file system's limit (255 bytes). The error names the image."""
    names = [f"{i}{'n' * 240}" for i in range(3)]
    folder = _user_folder(tmp_path / "long", names)
    raw = tmp_path / "raw"
    write_raw_manifest(raw, {"source": "local", "datasets": {}})
    message = r"occlusion synthesis of .*:[0-2]n{240} \(.*\.jpg\) failed: OSError"
    with pytest.raises(SynthesisError, match=message):
        run(_user_params(folder, workers=workers), SynthesizePaths(raw, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long", "raw"]  # no output, no work folder


def test_worker_count():
    assert worker_count(0) == 0 and worker_count(3) == 3
    assert worker_count(None) >= 1  # every core this process may use


def test_missing_raw_manifest_and_bad_config(tmp_path):
    with pytest.raises(Exception, match="run the fetch stage"):
        run(_params(), SynthesizePaths(tmp_path / "nothing", tmp_path / "out"))
    # Validated once, where params are loaded (stable_sam.config.check_config).
    with pytest.raises(ConfigError, match=r"occlusion\.probability = 1\.5"):
        check_config(_params(probability=1.5))
    with pytest.raises(ConfigError, match=r"synthesize\.workers = -1: must be null or an integer >= 0"):
        check_config(_params(workers=-1))


def test_main_runs_offline_without_tracking(raw, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("tracking:\n  enabled: false\n")
    main(
        [
            "--params",
            str(PARAMS_FILE),
            "--overlay",
            str(overlay),
            "--raw",
            str(raw),
            "--out",
            str(tmp_path / "occ"),
            "--set",
            "occlusion.seed=3",
        ]
    )
    assert json.loads((tmp_path / "occ" / "manifest.json").read_text())["seed"] == 3


def test_without_occlusion_the_training_set_is_every_image_once_as_it_is(raw, tmp_path):
    # train.use_occlusion=false (the no_occlusion variant): the train stage still reads this
    # folder only, so it depends on data/occluded and not on all of data/raw.
    params = _params(probability=1.0, copies=3, train={"use_occlusion": False})
    out = tmp_path / "plain"
    metrics = run(params, SynthesizePaths(raw, out))
    assert metrics["outputs"] == 12 and metrics["occluded"] == 0 and metrics["unchanged"] == 12
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["outputs"]:
        image = out / "im" / f"{entry['name']}.jpg"
        assert image.read_bytes() == (raw / entry["source_image"]).read_bytes()
