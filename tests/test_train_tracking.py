"""What one execution of the train stage leaves in MLflow (a sqlite store in tmp_path).

Slow: the stage trains with Ray Train (the session's local Ray instance, see test_train_stage).
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_project import (
    TINY_TRAIN_OVERRIDES,
    local_ray_session,
    random_tiny_sam_checkpoint,
    train_cli_args,
    train_paths,
    write_hqseg_folder,
    write_tiny_base,
)

from pipeline.train import main
from stable_sam.build import build_stable_sam
from stable_sam.checkpoint import file_sha256

pytestmark = pytest.mark.slow

local_ray = pytest.fixture(scope="session")(local_ray_session)

STEPS = 8
EXPERIMENT = "train-tracking-test"
MODEL = "stable-sam-plugin-test"


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_mlflow_run_holds_params_metrics_dataset_checkpoint_and_model_version(
    local_ray, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    # The stage runs in a git + DVC repo of its own: the tags are checkable, nothing lands in ours.
    project = tmp_path / "project"
    project.mkdir()
    _git("init", "-q", "-b", "main", cwd=project)
    (project / "README").write_text("tracking test\n")
    occluded = write_hqseg_folder(project / "data" / "occluded", count=16)
    from dvc.repo import Repo

    with Repo.init(str(project)) as repo:  # data/occluded is a DVC output, as in the pipeline
        repo.add(str(occluded))
    expected_digest = yaml.safe_load((project / "data" / "occluded.dvc").read_text())["outs"][0]["md5"]
    _git("add", "-A", cwd=project)
    _git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init", cwd=project)
    commit = _git("rev-parse", "HEAD", cwd=project)
    monkeypatch.chdir(project)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("STABLE_SAM_RUN_GROUP", raising=False)
    # As `ray job submit` passes it (MLflow finds no commit from pytest's main script).
    monkeypatch.setenv("STABLE_SAM_GIT_COMMIT", commit)

    sam_checkpoint = random_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth")
    base = write_tiny_base(project / "models" / "base", sam_checkpoint)
    paths = train_paths(project, occluded, base)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *TINY_TRAIN_OVERRIDES,
        f"train.steps={STEPS}",
        "train.checkpoint_every=4",
        "train.lr=0.002",
        "plugin.placements=[block2,final]",
        f"ray.storage_path={tmp_path / 'ray'}",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model={MODEL}",
    ]
    metrics = main(train_cli_args(paths, overrides))
    assert expected_digest.endswith(".dir")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])  # standalone: no parent run
    run_id = run.info.run_id
    tags = run.data.tags
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in tags
    # Named by what differs from the committed params.yaml (the tiny overrides).
    assert run.info.run_name.startswith("train | ") and "train.lr=0.002" in tags["params.changed"]
    assert tags["dvc.stage"] == "train" and tags["mlflow.source.git.commit"] == commit
    assert tags["git.dirty"] == "false"
    assert tags["ray.run_name"].startswith("stable-sam-train-")

    # Params: the resolved config, flattened to dot keys, every section.
    params = run.data.params
    assert params["train.lr"] == "0.002" and params["train.steps"] == str(STEPS)
    assert params["sam.type"] == "tiny" and params["ray.num_workers"] == "2"
    assert params["plugin.placements"] == '["block2", "final"]' and params["train.prompts.noisy_box"] == "1.0"
    assert {k.split(".")[0] for k in params} >= {
        "sam",
        "plugin",
        "tuning",
        "data",
        "train",
        "ray",
        "tracking",
    }
    assert "params/resolved_params.yaml" in {a.path for a in client.list_artifacts(run_id, "params")}

    # Metrics: the per-step curve (the same numbers as plots/train.csv) and the final figures.
    with open(paths.plot) as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == STEPS
    for key in ("loss", "bce", "dice", "alpha1"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in curve], rel=1e-12), key
    logged = run.data.metrics
    for key in ("final_loss", "final_alpha1", "steps", "trainable_parameters", "workers"):
        assert logged[key] == pytest.approx(metrics[key]), key

    # The training set as a dataset input whose digest is its DVC hash.
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert dataset.name == "data/occluded" and dataset.digest == expected_digest
    assert input_tags == {"mlflow.data.context": "training", "digest.kind": "dvc"}

    # The plug-in checkpoint as an artifact, byte for byte, plus the stage's metrics and curve.
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert artifacts == {"checkpoints/plugin.pt"}
    downloaded = Path(client.download_artifacts(run_id, "checkpoints/plugin.pt", str(tmp_path / "dl")))
    assert downloaded.read_bytes() == (paths.out / "plugin.pt").read_bytes()
    assert {a.path for a in client.list_artifacts(run_id, "metrics")} == {"metrics/train.json"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/train.csv"}

    # The registered model version: points at the run's checkpoints, tagged for provenance.
    (version,) = client.search_model_versions(f"name='{MODEL}'")
    assert version.run_id == run_id and version.source == f"{run.info.artifact_uri}/checkpoints"
    assert version.tags["sam_type"] == "tiny"
    assert version.tags["dataset_version"] == expected_digest
    assert version.tags["git.commit"] == commit
    assert version.tags["sam_checkpoint_sha256"] == file_sha256(sam_checkpoint)
    assert version.tags["checkpoint.file"] == "plugin.pt" and version.tags["dvc.stage"] == "train"
    assert version.tags["checkpoint.sha256"] == file_sha256(paths.out / "plugin.pt")
    assert run.data.tags["model.version"] == str(version.version)
    # ... and what it points at is a usable plug-in checkpoint.
    model = build_stable_sam(sam_type="tiny", sam_checkpoint=sam_checkpoint, plugin_checkpoint=downloaded)
    reference = torch.load(paths.out / "plugin.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, reference[k]) for k, v in model.trainable_state_dict().items())
