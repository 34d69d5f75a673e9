"""The README's Python example runs as written, on the files a fresh ``make repro`` leaves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_sam import build_stable_sam, save_plugin_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


def test_the_readme_python_example_runs_on_the_default_models(tmp_path, monkeypatch, capsys):
    code = _readme_example()
    # What `make repro` leaves: the committed base, a plug-in trained on it, the embedded val images.
    # (The plug-in here is untrained: this checks the API calls, not the numbers.)
    shutil.copytree(REPO / "base" / "release", tmp_path / "base" / "release")
    model = build_stable_sam(sam_type="small", sam_checkpoint=tmp_path / "base/release/sam_small.pth")
    (tmp_path / "models/stable_sam").mkdir(parents=True)
    save_plugin_checkpoint(model, tmp_path / "models/stable_sam/plugin.pt")
    image_path = tmp_path / "data/raw/embedded/val/im/val_00042.jpg"
    image_path.parent.mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(image).save(image_path)
    for path in re.findall(r'"((?:base|models|data)/[^"]+)"', code):
        assert (tmp_path / path).is_file(), (
            f"the README example reads {path}, which the test does not provide"
        )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    masks = namespace["masks"]
    assert masks.shape == (1, 128, 128) and masks.dtype == bool
    # The printed routing is numpy (an untrained DRP routes 0.5 / 0.5); plain SAM has none.
    assert "(1, 128, 128) [[0.5 0.5]]" in capsys.readouterr().out
    assert namespace["sam_masks"].shape[-2:] == (128, 128) and namespace["predictor"].routing is None


def test_the_readme_example_names_only_files_that_exist_after_make_repro():
    # The base is committed; the others are outputs declared in dvc.yaml.
    code = _readme_example()
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    for path in re.findall(r'"((?:base|models|data)/[^"]+)"', code):
        if path.startswith("base/"):
            assert (REPO / path).is_file(), path
        else:
            top = "/".join(path.split("/")[:2])
            assert re.search(rf"^\s+- {re.escape(top)}\b", dvc_yaml, flags=re.M), (
                f"{path}: no dvc.yaml out {top}"
            )


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_readme_job_upload_excludes_keep_every_source_file():
    # `ray job submit --working-dir .` with the README's excludes (gitignore patterns, matched the
    # way Ray matches them): the outputs stay behind, no module of the project does ("data/"
    # unanchored would also have dropped stable_sam/data/, which the cluster rehearsal found).
    import json
    import subprocess

    from ray._private.thirdparty.pathspec import PathSpec

    excludes = json.loads(re.search(r'"excludes": (\[[^\]]*\])', (REPO / "README.md").read_text()).group(1))
    spec = PathSpec.from_lines("gitwildmatch", excludes)
    tracked = subprocess.run(
        ["git", "ls-files", "stable_sam", "pipeline", "configs", "params.yaml"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert tracked and [f for f in tracked if spec.match_file(f)] == []
    for output in ("data/raw/manifest.json", "models/stable_sam/plugin.pt", ".venv/bin/python", "mlflow.db"):
        assert spec.match_file(output), output
