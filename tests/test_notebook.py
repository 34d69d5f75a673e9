"""The walkthrough notebook runs top to bottom on pipeline artefacts (so it never rots).

The artefacts are made here at tiny size, the way the stages make them: the fetch stage's
embedded dataset, a base pointer to a (random) tiny SAM checkpoint, a plug-in checkpoint and an
MLflow store holding one stage run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import perturb_plugins, random_stable_sam

from pipeline.params import load_params
from stable_sam import save_plugin_checkpoint

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "stable_sam_walkthrough.ipynb"


def _make_artefacts(root: Path) -> None:
    from pipeline.fetch import FetchPaths
    from pipeline.fetch import run as fetch
    from pipeline.sam_source import SamSource, write_sam_source
    from pipeline.tracking import stage_run
    from stable_sam.build import build_stable_sam
    from stable_sam.checkpoint import file_sha256

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    overrides = [
        "sam.type=tiny",
        "embedded.num_train=4",
        "embedded.num_val=6",
        "embedded.image_size=64",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]
    params_file = root / "params.yaml"
    params = load_params(params_file, overrides)
    fetch(params, FetchPaths(out=root / "data" / "raw"))

    _, vanilla = random_stable_sam("tiny")
    checkpoint = root / "models" / "base" / "sam_tiny.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(vanilla.state_dict(), checkpoint)
    write_sam_source(
        checkpoint.parent, SamSource("tiny", str(checkpoint), file_sha256(checkpoint), "trained")
    )
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=checkpoint, plugin_config=params.plugin)
    perturb_plugins(model)
    save_plugin_checkpoint(model, root / "models" / "stable_sam" / "plugin.pt")

    with stage_run("train", params, params_path=params_file) as tracker:
        tracker.log_metrics_series([{"step": s, "loss": 1.0 / s} for s in range(1, 4)])
        tracker.log_metrics({"final_loss": 0.33})


@pytest.mark.slow
def test_walkthrough_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    _make_artefacts(tmp_path)
    monkeypatch.setenv("STABLE_SAM_ROOT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "outputs kept in git"
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # 6 validation images shown 4 at a time, the offsets figure and the α1 curves.
    assert len(images) == 6
    text = "".join(o.get("text", "") for o in outputs)
    assert "SAM: tiny (trained)" in text
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("final_loss" in t["data"]["text/html"] for t in tables), (
        "the MLflow train run was not read back"
    )
    assert "evaluate runs: none yet" in text  # an empty kind says so instead of an empty table
