"""pipeline.tracking, checked through MLflow's public read API on a sqlite store in tmp_path.

One store per module (creating and migrating a database costs about a second); every test has its
own experiment and works in its own project folder (cwd and DVC_ROOT), so nothing lands in the repo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml

from pipeline import tracking
from pipeline.params import load_params
from pipeline.tracking import Tracker, dataset_digest, stage_run, tracking_uri

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")  # inside DVC

REPO = Path(__file__).resolve().parents[1]
_CONTEXT_ENV = (
    "DVC_STAGE",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "MLFLOW_TRACKING_URI",
    "STABLE_SAM_RUN_GROUP",
    "STABLE_SAM_GIT_COMMIT",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_store') / 'mlflow.db'}"


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder without git (cwd and DVC_ROOT) and no DVC/MLflow/group variables inherited.

    MLflow finds the git commit from the main script: here one outside any repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for name in _CONTEXT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "stage.py")])
    return tmp_path


def _full_params(text: str) -> str:
    """The committed params.yaml with the nested changes of ``text`` (params files list every key)."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())

    def merge(into: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(tree, yaml.safe_load(text))
    return yaml.safe_dump(tree, sort_keys=False)


@pytest.fixture
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _params(store: str, experiment: str, params_file: Path | None = None, *overrides: str):
    """Params of ``params_file`` (default: a new ./params.yaml) tracked to ``store``, ``experiment``
    (which also names the registered model)."""
    if params_file is None:
        params_file = Path("params.yaml")
        params_file.write_text(_full_params("train:\n  lr: 0.001\n"))
    tracking_set = [f"tracking.uri={store}", f"tracking.experiment={experiment}"]
    return load_params(params_file, [*tracking_set, "tracking.registered_model=" + experiment, *overrides])


def _runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def _git(*args: str, cwd: Path) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _dataset(folder: Path, seed: int = 0) -> Path:
    (folder / "im").mkdir(parents=True)
    (folder / "gt").mkdir()
    (folder / "im" / "0.jpg").write_bytes(b"jpeg%d" % seed)
    (folder / "gt" / "0.png").write_bytes(b"png!")
    return folder


def _dvc_project(root: Path) -> None:
    """A DVC project without git (DVC's own `dvc add` is what the digests are checked against)."""
    from dvc.repo import Repo

    Repo.init(str(root), no_scm=True).close()


def test_stage_run_logs_params_metrics_datasets_and_artifacts(
    project: Path, store: str, experiment: str, client: MlflowClient
) -> None:
    from dvc.repo import Repo

    _dvc_project(project)
    occluded = _dataset(project / "data" / "occluded")
    with Repo(str(project)) as repo:
        repo.add("data/occluded")
    recorded = yaml.safe_load((project / "data" / "occluded.dvc").read_text())["outs"][0]["md5"]
    figure = project / "examples.png"
    figure.write_bytes(b"png")
    params = _params(store, experiment, None, "plugin.placements=[block2,final]")

    with stage_run("train", params, params_path=Path("params.yaml")) as tracker:
        tracker.log_metrics_series([{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5}])
        tracker.log_metrics({"final_loss": 0.5, "val": {"miou": 71.25}, "note": "text", "ok": True})
        tracker.log_dataset(occluded, context="training")
        tracker.log_artifact(occluded, artifact_path="data")
        tracker.log_figure(figure)
        tracker.set_tags({"ray.run_name": "r1"})

    (run,) = _runs(client, experiment)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    assert "mlflow.parentRunId" not in run.data.tags  # no group variables: standalone
    tags = run.data.tags
    assert tags["dvc.stage"] == "train" and tags["pipeline.stage"] == "train" and tags["ray.run_name"] == "r1"
    assert tags["stable_sam.version"] and tags["mlflow.user"]  # the latter resolved by MLflow itself
    assert "git.dirty" not in tags and "params.changed" not in tags  # no git here: nothing to say
    params_logged = run.data.params
    assert (
        params_logged["train.lr"] == "0.001" and params_logged["plugin.placements"] == '["block2", "final"]'
    )
    assert params_logged["tracking.enabled"] == "true" and params_logged["train.steps"] == "null"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.9), (2, 0.5)]
    assert run.data.metrics == {"loss": 0.5, "final_loss": 0.5, "val.miou": 71.25}
    assert client.get_metric_history(run_id, "final_loss")[0].step == 2  # the end of the curves

    (dataset_input,) = run.inputs.dataset_inputs
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert dataset_input.dataset.name == "data/occluded"
    assert dataset_input.dataset.digest == recorded and recorded.endswith(".dir")  # DVC's own hash
    assert input_tags == {"mlflow.data.context": "training", "digest.kind": "dvc"}

    def listed(path: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, path)}

    assert listed("params") == {"params/params.yaml", "params/resolved_params.yaml"}
    assert listed("figures") == {"figures/examples.png"} and listed("data") == {"data/gt", "data/im"}
    resolved = yaml.safe_load(
        Path(client.download_artifacts(run_id, "params/resolved_params.yaml")).read_text()
    )
    assert resolved["train"]["lr"] == 0.001 and resolved["plugin"]["placements"] == ["block2", "final"]
    kind = client.get_experiment_by_name(experiment).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI opens it as model training, not GenAI


def test_one_name_and_digest_per_dataset_version(project: Path) -> None:
    from dvc.repo import Repo

    _dvc_project(project)
    raw = project / "data" / "raw"
    train, val = _dataset(raw / "train"), _dataset(raw / "val", seed=1)
    with Repo(str(project)) as repo:
        repo.add("data/raw")
    recorded = yaml.safe_load((project / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert dataset_digest(raw) == (recorded, "dvc")
    # Splits inside one DVC output get a hash of their own content: train and val never share one.
    (train_digest, kind), (val_digest, _) = dataset_digest(train), dataset_digest(val)
    assert kind == "content" and train_digest != val_digest
    copy = _dataset(project / "elsewhere" / "train")  # the same files elsewhere: the same digest
    assert dataset_digest(copy) == (train_digest, "content")
    (train / "gt" / "0.png").write_bytes(b"another mask")
    assert dataset_digest(train)[0] != train_digest
    assert dataset_digest(raw)[0] != recorded  # DVC hashes what is on disk now, as dvc.lock will
    with pytest.raises(FileNotFoundError, match="missing"):
        dataset_digest(project / "missing")


def test_stages_log_each_split_once_under_one_name(
    project: Path, store: str, experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch and synthesize stages (their own main) in one group: each split is its own input."""
    from pipeline import fetch, synthesize

    monkeypatch.setenv("STABLE_SAM_RUN_GROUP", "repro-stages")
    params = [
        "--params",
        "params.yaml",
        "--set",
        f"tracking.uri={store}",
        "--set",
        f"tracking.experiment={experiment}",
    ]
    Path("params.yaml").write_text(
        _full_params("embedded:\n  num_train: 2\n  num_val: 1\n  image_size: 32\n")
    )
    fetch.main([*params, "--out", "data/raw"])
    synthesize.main(
        [*params, "--raw", "data/raw", "--out", "data/occluded", "--set", "occlusion.num_examples=1"]
    )

    inputs = {
        r.data.tags["pipeline.stage"]: {
            i.dataset.name: (i.dataset.digest, i.tags) for i in r.inputs.dataset_inputs
        }
        for r in _runs(client, experiment)
        if r.data.tags["pipeline.role"] == "stage"
    }
    assert set(inputs["fetch"]) == {"data/raw/embedded/train", "data/raw/embedded/val"}
    assert set(inputs["synthesize"]) == {"data/occluded"}
    for name, (digest, tags) in {**inputs["fetch"], **inputs["synthesize"]}.items():
        context = "evaluation" if name.endswith("/val") else "training"
        assert (
            digest == dataset_digest(name)[0]
            and {t.key: t.value for t in tags}["mlflow.data.context"] == context
        )


def _git_project(root: Path) -> str:
    """A git repo whose committed params.yaml has train.lr 0.001; returns the commit."""
    _git("init", "-q", "-b", "main", cwd=root)
    (root / "params.yaml").write_text(_full_params("train:\n  lr: 0.001\n  steps: 8\n"))
    (root / "src.py").write_text("print('stage')\n")
    _git("add", ".", cwd=root)
    _git("commit", "-q", "-m", "init", cwd=root)
    return _git("rev-parse", "HEAD", cwd=root)


def test_stages_of_one_experiment_share_a_parent_with_its_changes_and_headline(
    project: Path, store: str, experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = _git_project(project)
    (project / "params.yaml").write_text(
        _full_params("train:\n  lr: 0.002\n  steps: 8\n")
    )  # what `dvc exp run -S` does
    monkeypatch.setenv("DVC_EXP_NAME", "fussy-bean")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    params = _params(store, experiment, project / "params.yaml")
    with stage_run("train", params, params_path="params.yaml") as tracker:
        tracker.log_metrics({"final_loss": 0.25})
    monkeypatch.setenv("DVC_STAGE", "ablate@points")
    with stage_run("ablate", params, params_path="params.yaml") as tracker:
        tracker.log_metrics(
            {"headline": {"noisy_box": {"sam": 54.0, "stable_sam": 56.5, "delta": 2.5}}}, headline=True
        )

    runs = {
        r.data.tags["pipeline.role"] + r.data.tags.get("pipeline.stage", ""): r
        for r in _runs(client, experiment)
    }
    parent, train, ablate = runs["group"], runs["stagetrain"], runs["stageablate"]
    assert parent.info.run_name == "fussy-bean | train.lr=0.002" and parent.info.status == "FINISHED"
    assert parent.data.params == {"train.lr": "0.002"}  # what this experiment changed
    assert parent.data.metrics == {
        f"headline.noisy_box.{k}": v for k, v in [("sam", 54.0), ("stable_sam", 56.5), ("delta", 2.5)]
    }
    for child in (train, ablate):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["params.changed"] == "train.lr=0.002"
        assert child.data.tags["dvc.exp_name"] == "fussy-bean"
    assert train.info.run_name == "train | fussy-bean | train.lr=0.002"
    assert ablate.info.run_name == "ablate@points | fussy-bean | train.lr=0.002"
    assert ablate.data.tags["dvc.stage"] == "ablate@points" and "final_loss" not in parent.data.metrics


def test_a_repro_group_without_changes_and_a_standalone_stage(
    project: Path, store: str, experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _git_project(project)
    params = _params(store, experiment, project / "params.yaml")
    monkeypatch.setenv("STABLE_SAM_RUN_GROUP", "repro-20261201-120000")
    for stage in ("fetch", "synthesize"):
        with stage_run(stage, params, params_path="params.yaml"):
            pass
    monkeypatch.delenv("STABLE_SAM_RUN_GROUP")
    with stage_run("evaluate", params, params_path="params.yaml"):
        pass

    runs = {r.data.tags.get("pipeline.stage", "group"): r for r in _runs(client, experiment)}
    parent, fetch, synthesize, standalone = (runs[k] for k in ("group", "fetch", "synthesize", "evaluate"))
    assert parent.info.run_name == "repro-20261201-120000 | params as committed" and not parent.data.params
    assert fetch.info.run_name == "fetch | repro-20261201-120000"
    assert {fetch.data.tags["mlflow.parentRunId"], synthesize.data.tags["mlflow.parentRunId"]} == {
        parent.info.run_id
    }
    assert standalone.info.run_name == "evaluate" and "mlflow.parentRunId" not in standalone.data.tags
    assert standalone.data.tags["params.changed"] == "none"


def test_git_dirty_counts_source_files_not_what_the_pipeline_writes(
    project: Path, store: str, experiment: str, client: MlflowClient
) -> None:
    from dvc.repo import Repo

    _git_project(project)
    Repo.init(str(project)).close()
    (project / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python src.py\n    params: [train.lr]\n    outs: [out]\n"
        "    metrics:\n      - metrics/m.json:\n          cache: false\n"
    )
    (project / "metrics").mkdir()
    (project / "metrics" / "m.json").write_text("{}")
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    _git("add", ".", cwd=project)
    _git("commit", "-q", "-m", "dvc", cwd=project)
    params = _params(store, experiment, project / "params.yaml")

    def dirty() -> str:
        with stage_run("s", params, params_path="params.yaml"):
            pass
        return _runs(client, experiment)[-1].data.tags["git.dirty"]

    (project / "metrics" / "m.json").write_text('{"miou": 1}')  # what stages write
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (project / "params.yaml").write_text(
        _full_params("train:\n  lr: 0.5\n  steps: 8\n")
    )  # recorded as params
    assert dirty() == "false"
    (project / "src.py").write_text("print('changed')\n")
    assert dirty() == "true"


def test_a_checkpoint_is_registered_once_and_evaluate_names_its_version(
    project: Path, store: str, experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = project / "plugin.pt"
    checkpoint.write_bytes(b"weights v1")
    sha256 = hashlib.sha256(b"weights v1").hexdigest()
    monkeypatch.setenv("STABLE_SAM_GIT_COMMIT", "c0ffee")  # `ray job submit`: no .git in the working dir
    params = _params(store, experiment)
    data = _dataset(project / "data" / "occluded")
    versions, run_ids = [], []
    for _ in range(2):  # the second time: a resubmitted, identical job
        with stage_run("train", params, params_path="params.yaml") as tracker:
            tracker.log_dataset(data, context="training")
            versions.append(tracker.register_checkpoint(checkpoint, tags={"sam_type": "tiny"}))
        run_ids.append(tracker.run_id)
    checkpoint.write_bytes(b"weights v2")
    with stage_run("train", params, params_path="params.yaml") as tracker:
        versions.append(tracker.register_checkpoint(checkpoint))
    checkpoint.write_bytes(b"weights v1")
    with stage_run("evaluate", params, params_path="params.yaml") as tracker:
        tracker.log_evaluated_checkpoint(checkpoint)

    assert versions == ["1", "1", "2"]
    first, again, evaluate = (client.get_run(run_id) for run_id in (*run_ids, tracker.run_id))
    assert len(client.search_model_versions(f"name = '{experiment}'")) == 2
    version = client.get_model_version(experiment, "1")
    assert version.run_id == first.info.run_id and version.source == f"{first.info.artifact_uri}/checkpoints"
    assert version.tags == {
        "git.commit": "c0ffee",
        "dvc.stage": "train",
        "checkpoint.file": "plugin.pt",
        "checkpoint.sha256": sha256,
        "dataset_version": dataset_digest(data)[0],
        "sam_type": "tiny",
    }
    assert again.data.tags["model.version"] == "1" and first.data.tags["mlflow.source.git.commit"] == "c0ffee"
    assert {a.path for a in client.list_artifacts(again.info.run_id, "checkpoints")} == {
        "checkpoints/plugin.pt"
    }
    assert evaluate.data.tags["model.version"] == "1" and evaluate.data.tags["checkpoint.sha256"] == sha256


def test_a_dead_server_costs_one_warning_and_seconds(
    project: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    params = _params(uri, experiment)
    data = _dataset(project / "data")
    started = time.monotonic()
    with mock.patch.dict(os.environ), caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        for key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]:
            del os.environ[key]
        with stage_run("train", params, params_path="params.yaml") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.log_dataset(data, context="training")
            assert tracker.register_checkpoint(data / "im" / "0.jpg") is None
            tracker.log_artifact(data)
            ran_on = True
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # lowered, as setdefault
    assert ran_on and time.monotonic() - started < 30
    warnings = [r for r in caplog.records if r.name == "pipeline.tracking"]
    assert len(warnings) == 1 and uri in warnings[0].getMessage() and "untracked" in warnings[0].getMessage()


def test_a_failure_mid_run_turns_tracking_off_and_ends_the_run_failed(
    project: Path, store: str, experiment: str, client: MlflowClient, caplog: pytest.LogCaptureFixture
) -> None:
    params = _params(store, experiment)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with stage_run("train", params, params_path="params.yaml") as tracker:
            tracker.log_metrics({"before": 1.0})
            tracker.set_tags({"x" * 300: "a tag key MLflow refuses"})
            tracker.log_metrics({"after": 1.0})
            assert not tracker.enabled
    (run,) = _runs(client, experiment)
    assert run.info.status == "FAILED" and set(run.data.metrics) == {"before"}
    assert len([r for r in caplog.records if r.name == "pipeline.tracking"]) == 1


def test_a_failing_stage_fails_its_run_and_parent(
    project: Path, store: str, experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STABLE_SAM_RUN_GROUP", "g-fail")
    params = _params(store, experiment)
    with pytest.raises(ValueError, match="stage bug"), stage_run("train", params, params_path="params.yaml"):
        raise ValueError("stage bug")
    parent, run = _runs(client, experiment)
    assert run.info.status == "FAILED" and parent.info.status == "FAILED"


def test_disabled_tracking_does_nothing_and_never_imports_mlflow(tmp_path: Path) -> None:
    script = """
import sys
from pathlib import Path
from types import SimpleNamespace
from pipeline.tracking import stage_run
params = SimpleNamespace(tracking=SimpleNamespace(enabled=False))  # all a disabled tracker reads
with stage_run("train", params, params_path="params.yaml") as tracker:
    tracker.log_metrics({"loss": 1.0}, step=1, headline=True)
    tracker.log_metrics_series([{"step": 1, "loss": 1.0}])
    tracker.log_dataset(Path("missing"), context="training")
    tracker.log_artifact("missing")
    tracker.log_figure("missing.png")
    tracker.set_tags({"a": 1})
    tracker.log_evaluated_checkpoint("missing.pt")
    assert tracker.register_checkpoint("missing.pt") is None
print(sorted(m for m in ("mlflow", "dvc") if m in sys.modules))
"""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]" and not (tmp_path / "mlflow.db").exists()


def test_tracker_refuses_to_travel_to_ray_workers() -> None:
    with pytest.raises(TypeError, match="driver"):
        pickle.dumps(Tracker(enabled=False))


def test_tracking_uri_precedence(project: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    params = load_params(_write(project / "params.yaml", "tracking:\n  uri: null\n"))
    assert tracking_uri(params) == f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(params) == "http://127.0.0.1:5000"
    params.tracking.uri = "sqlite:///runs/other.db"  # relative: to the repo root, not the cwd
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    assert tracking_uri(params) == f"sqlite:///{project / 'runs' / 'other.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.main(["uri", "--params", str(project / "params.yaml")]) == 0
    assert capsys.readouterr().out.strip() == f"sqlite:///{project / 'mlflow.db'}"


def _write(path: Path, text: str) -> Path:
    path.write_text(_full_params(text))
    return path


def test_importing_the_stages_turns_telemetry_off_unless_the_user_chose():
    """`dvc repro` by hand (no Makefile exports) runs the stages without telemetry; a user's own value wins."""
    from pipeline import OFFLINE_ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    env["DO_NOT_TRACK"] = "false"  # the user's explicit choice
    script = "import json, os, pipeline; print(json.dumps({k: os.environ.get(k) for k in pipeline.OFFLINE_ENVIRONMENT}))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == {**OFFLINE_ENVIRONMENT, "DO_NOT_TRACK": "false"}
