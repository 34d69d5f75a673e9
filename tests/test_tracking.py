"""pipeline.tracking: what one stage run puts into MLflow, grouping, disabled mode, failures.

All runs go to one sqlite store per module (creating and migrating a DB costs about 1 s); every
test works in its own tmp_path (cwd and DVC_ROOT), so nothing is written into the repository.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import repo_params

from pipeline import tracking
from pipeline.params import Params, resolved_params_dict
from pipeline.tracking import (
    ENV_RUN_GROUP,
    Tracker,
    dataset_digest,
    replay_failure_file,
    run_group,
    stage_run,
    tracking_uri,
)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# md5 values written by a real `dvc add` (dvc 3.67) for the tiny tree made by _make_tree.
DVC_DIR_MD5 = "3ccabac68ff12f7672d6f8e3bb43c241.dir"
DVC_FILE_MD5 = "1b26352878b4ebb7a0cdc8ef486faf5a"
_GROUP_ENV = ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI", ENV_RUN_GROUP)


def _make_tree(root: Path) -> tuple[Path, Path]:
    """A folder {a.txt, sub/b.txt} and a file whose DVC md5s are DVC_DIR_MD5 / DVC_FILE_MD5."""
    folder = root / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a\n")
    (folder / "sub" / "b.txt").write_text("bb\n")
    single = root / "f.txt"
    single.write_text("single\n")
    return folder, single


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the module (its artifacts land next to it in mlruns/)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_store') / 'mlflow.db'}"


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean project folder: cwd and DVC_ROOT, no DVC/MLflow env leaking in, its own group."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for name in _GROUP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_RUN_GROUP, f"test-{uuid.uuid4().hex[:8]}")
    return tmp_path


def _params(uri: str, experiment: str = "stable-sam-test") -> Params:
    params = repo_params()
    params.tracking.uri = uri
    params.tracking.experiment = experiment
    return params


def _write_lock(project: Path, entries: dict[str, dict]) -> None:
    (project / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": entries}))


# --------------------------------------------------------------------------------------------
# The test: everything one stage run holds
# --------------------------------------------------------------------------------------------


def test_stage_run_holds_params_metrics_inputs_checkpoint_and_model_version(
    project: Path, store: str, client: MlflowClient
) -> None:
    params = _params(store)
    params.train.lr = 3e-4
    params_file = project / "params.yaml"
    params_file.write_text("train:\n  lr: 3.0e-4\n")
    data = project / "data" / "occluded"
    (data / "im").mkdir(parents=True)
    (data / "gt").mkdir()
    (data / "im" / "0.jpg").write_bytes(b"jpeg")
    (data / "gt" / "0.png").write_bytes(b"png!")
    lock_md5 = "0123456789abcdef0123456789abcdef.dir"
    _write_lock(
        project,
        {
            "synthesize": {
                "cmd": "x",
                "outs": [{"path": "data/occluded", "md5": lock_md5, "size": 8, "nfiles": 2}],
            },
            "train": {"cmd": "y", "deps": [{"path": "data/occluded", "md5": "stale" * 6 + "ab.dir"}]},
        },
    )
    checkpoint = project / "models" / "stable_sam" / "plugin.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"offsets.weight": torch.zeros(4, 4)}, checkpoint)
    metrics_json = project / "metrics" / "train.json"
    metrics_json.parent.mkdir()
    metrics_json.write_text(json.dumps({"miou": 71.2}))
    figure = project / "figures" / "curve.png"
    figure.parent.mkdir()
    figure.write_bytes(b"\x89PNG fake")

    with stage_run("train", params, params_path=params_file) as tracker:
        tracker.log_metrics_series(
            [{"step": s, "loss": 1.0 / (s + 1), "note": "x"} for s in range(0, 50, 10)]
        )
        tracker.log_metrics({"loss": 0.01}, step=60)
        tracker.log_metrics({"miou": 71.2, "val": {"boundary_iou": 60.5}, "count": True})
        tracker.log_dataset(data, name="occluded-train", context="training")
        tracker.log_artifact(metrics_json, artifact_path="metrics")
        tracker.log_figure(figure)
        version = tracker.register_checkpoint(
            checkpoint, tags={"sam_type": "vit_l", "dataset_version": lock_md5}
        )
        tracker.set_tags({"custom.tag": 7})
        run_id = tracker.run_id

    assert run_id is not None and version is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    # Params: the resolved config, flattened, every leaf (more than one log_batch of 100).
    flat = tracking._flatten_params(resolved_params_dict(params))
    assert len(flat) > 100
    assert run.data.params == flat
    assert run.data.params["train.lr"] == "0.0003"
    assert run.data.params["data.train"] == '["embedded"]'
    assert run.data.params["train.prompts.point_counts"] == "[1, 3, 5, 10]"
    # Metrics: final figures (at the last step, so they are also the latest values) and a curve.
    assert run.data.metrics["miou"] == pytest.approx(71.2)
    assert run.data.metrics["val.boundary_iou"] == pytest.approx(60.5)
    assert run.data.metrics["loss"] == pytest.approx(0.01)
    assert "count" not in run.data.metrics and "note" not in run.data.metrics
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 10, 20, 30, 40, 60]
    assert client.get_metric_history(run_id, "miou")[0].step == 60
    # Dataset input: digest = the producing stage's out in dvc.lock (not the stale dep).
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "occluded-train"
    assert dataset_input.dataset.digest == lock_md5
    input_tags = {t.key: t.value for t in dataset_input.tags}
    assert input_tags["mlflow.data.context"] == "training"
    assert input_tags["dvc.hash_source"] == "dvc.lock:synthesize:outs"
    assert json.loads(dataset_input.dataset.profile)["dvc_hash"] == lock_md5
    assert json.loads(dataset_input.dataset.source)["uri"] == "data/occluded"
    # Tags.
    tags = run.data.tags
    assert tags["dvc.stage"] == "train" and tags["pipeline.stage"] == "train"
    assert tags["git.commit"] == "unknown" and tags["git.dirty"] == "unknown"  # tmp_path is no repo
    assert "stable_sam.version" in tags and tags["custom.tag"] == "7"
    # Artifacts: checkpoint, resolved params (+ raw file), metrics file, figure.
    listed = {
        a.path
        for folder in ("checkpoints", "params", "metrics", "figures")
        for a in client.list_artifacts(run_id, folder)
    }
    assert listed == {
        "checkpoints/plugin.pt",
        "params/resolved_params.yaml",
        "params/params.yaml",
        "metrics/train.json",
        "figures/curve.png",
    }
    resolved = yaml.safe_load(
        Path(client.download_artifacts(run_id, "params/resolved_params.yaml", str(project))).read_text()
    )
    assert resolved["train"]["lr"] == pytest.approx(3e-4)
    # Registered model version, pointing at the run's checkpoints folder.
    model_version = client.get_model_version(params.tracking.registered_model, version)
    assert model_version.run_id == run_id
    assert model_version.source == f"{run.info.artifact_uri}/checkpoints"
    assert model_version.tags["sam_type"] == "vit_l"
    assert model_version.tags["dataset_version"] == lock_md5
    assert model_version.tags["git.commit"] == tags["git.commit"]
    assert model_version.tags["checkpoint.file"] == "plugin.pt"
    # The store is the configured one: nothing written into the project folder.
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert "mlflow_store" in run.info.artifact_uri


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------


def test_run_group_from_env_vars() -> None:
    assert run_group({ENV_RUN_GROUP: "sweep 1", "DVC_EXP_NAME": "x"}) == tracking.RunGroup(
        "sweep_1", "sweep 1", "env"
    )
    group = run_group({"DVC_EXP_NAME": "lucky-owl", "DVC_EXP_BASELINE_REV": "abcdef1234"})
    assert group == tracking.RunGroup("exp-lucky-owl-abcdef1", "lucky-owl", "dvc_exp")


def _fake_process(proc: Path, pid: int, ppid: int, start: int, argv: list[str], comm: str = "x") -> None:
    folder = proc / str(pid)
    folder.mkdir(parents=True)
    # Real stat lines: "pid (comm) state ppid pgrp session tty tpgid flags ... starttime(22) ..."
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30
    (folder / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_run_group_from_fake_process_tree(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    _fake_process(proc, 1, 0, 1, ["/sbin/init"])
    _fake_process(proc, 90, 1, 500, ["/usr/bin/python3", "/repo/.venv/bin/dvc", "exp", "run"])
    _fake_process(proc, 100, 90, 777, ["/repo/.venv/bin/python", "-u", "/repo/.venv/bin/dvc", "repro", "-f"])
    _fake_process(proc, 200, 100, 800, ["/bin/sh", "-c", "python -m pipeline.train"], comm="sh) (odd")
    _fake_process(proc, 300, 200, 801, ["python", "-m", "pipeline.train", "--set", "train.lr=1"])
    _fake_process(proc, 400, 1, 900, ["bash"])
    _fake_process(proc, 401, 400, 901, ["python3", "-m", "dvc", "repro"])
    _fake_process(proc, 402, 401, 902, ["python", "-m", "pipeline.fetch"])

    group = run_group({}, pid=300, proc=proc)
    assert group.source == "dvc_process" and group.id == "dvc-100-777"  # the nearest dvc ancestor
    assert group.name.startswith("dvc repro ") and group.name.endswith("(pid 100)")
    assert run_group({}, pid=402, proc=proc).id == "dvc-401-901"
    assert run_group({"DVC_EXP_NAME": "e"}, pid=300, proc=proc).source == "dvc_exp"  # env wins
    standalone = run_group({}, pid=400, proc=proc)
    assert standalone.source == "standalone" and not standalone.has_parent
    assert run_group({}, pid=400, proc=proc).id != standalone.id  # fresh each time
    assert run_group({}, pid=300, proc=tmp_path / "no_proc").source == "standalone"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux procfs")
def test_run_group_under_a_real_dvc_process(tmp_path: Path) -> None:
    """A script named `dvc` runs two `sh -c python ...` stages: same group within, new group per call."""
    fake_dvc = tmp_path / "bin" / "dvc"
    fake_dvc.parent.mkdir()
    probe = "from pipeline.tracking import run_group; print(run_group().id)"
    fake_dvc.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import subprocess, sys
            for _ in range(2):
                subprocess.run(["/bin/sh", "-c", {f"{sys.executable} -c '{probe}'"!r}], check=True)
            """
        )
    )
    fake_dvc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_ENV}
    env["PYTHONPATH"] = str(REPO)
    outputs = [
        subprocess.run(
            [str(fake_dvc), "repro"], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    for ids in outputs:
        assert len(ids) == 2 and ids[0] == ids[1] and ids[0].startswith("dvc-")
    assert outputs[0][0] != outputs[1][0]


def test_stage_runs_of_one_group_share_a_parent(
    project: Path, store: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    group_id = os.environ[ENV_RUN_GROUP]
    params = _params(store)
    with stage_run("synthesize", params) as first:
        first.log_metrics({"n": 3})
    monkeypatch.setenv("DVC_STAGE", "sweep@0.1-8")
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-owl")  # the group still comes from STABLE_SAM_RUN_GROUP
    with pytest.raises(RuntimeError, match="boom"), stage_run("sweep", params) as second:
        raise RuntimeError("boom")

    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`pipeline.group` = '{group_id}'"
    )
    parents = [r for r in runs if r.data.tags["pipeline.role"] == "group"]
    children = {r.info.run_name: r for r in runs if r.data.tags["pipeline.role"] == "stage"}
    assert len(parents) == 1 and set(children) == {"synthesize", "sweep@0.1-8"}
    parent = client.get_run(parents[0].info.run_id)
    assert parent.info.run_name == group_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert children["sweep@0.1-8"].data.tags["dvc.stage"] == "sweep@0.1-8"
    assert children["sweep@0.1-8"].data.tags["dvc.exp_name"] == "lucky-owl"
    assert "dvc.exp_name" not in children["synthesize"].data.tags
    assert children["synthesize"].info.status == "FINISHED"
    assert children["sweep@0.1-8"].info.run_id == second.run_id
    assert client.get_run(second.run_id).info.status == "FAILED"
    assert parent.info.status == "FAILED"  # one failed stage marks the whole execution


def test_standalone_stage_has_no_parent(
    project: Path, store: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_RUN_GROUP)
    monkeypatch.setattr(tracking, "_find_dvc_ancestor", lambda pid, proc: None)
    with stage_run("evaluate", _params(store)) as tracker:
        pass
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["pipeline.group"].startswith("standalone-") and "mlflow.parentRunId" not in tags


def test_a_killed_stage_run_is_marked_killed_when_the_stage_starts_again(
    project: Path, store: str, client: MlflowClient, caplog: pytest.LogCaptureFixture
) -> None:
    experiment = "stable-sam-killed"
    script = textwrap.dedent(
        f"""
        import time
        from pipeline.tracking import stage_run
        import pipeline
        from pathlib import Path
        from pipeline.params import load_params
        params = load_params(Path(pipeline.__file__).parents[1] / "params.yaml")
        params.tracking.uri, params.tracking.experiment = {store!r}, {experiment!r}
        with stage_run("evaluate", params) as tracker:
            print(tracker.run_id, flush=True)
            time.sleep(300)
        """
    )
    # An earlier pipeline execution (its own group) whose evaluate stage is killed outright.
    env = {**os.environ, ENV_RUN_GROUP: f"killed-{uuid.uuid4().hex[:8]}"}
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) as proc:
        killed = proc.stdout.readline().strip()
        proc.kill()
    assert client.get_run(killed).info.status == "RUNNING"
    killed_parent = client.get_run(killed).data.tags["mlflow.parentRunId"]

    identity = tracking._process_identity()
    assert identity is not None
    boot, namespace, pid, start = identity.split("|")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id

    def running(stage: str, process: str) -> str:
        tags = {"pipeline.role": "stage", "pipeline.stage": stage, "host": socket.gethostname()}
        return client.create_run(experiment_id, tags={**tags, tracking.PROCESS_TAG: process}).info.run_id

    alive = running("evaluate", identity)  # this very process: still running
    reused = running("evaluate", f"{boot}|{namespace}|{pid}|{int(start) - 1}")  # PID reused since
    other_namespace = running("evaluate", f"{boot}|pid:[1]|999999|1")  # cannot tell: left alone
    other_stage = running("train", f"{boot}|{namespace}|{pid}|{int(start) - 1}")

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        with stage_run("evaluate", _params(store, experiment)) as tracker:
            pass
    status = {
        run: client.get_run(run).info.status for run in (killed, reused, alive, other_namespace, other_stage)
    }
    assert status == {
        killed: "KILLED",
        reused: "KILLED",
        alive: "RUNNING",
        other_namespace: "RUNNING",
        other_stage: "RUNNING",
    }
    assert client.get_run(killed_parent).info.status == "KILLED"  # nothing of that execution runs
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert f"MLflow run {killed} (evaluate, started " in caplog.text
    assert "was still RUNNING but its process (pid" in caplog.text and "is gone: marked KILLED" in caplog.text
    for run in (alive, other_namespace, other_stage):  # leave the shared store clean
        client.set_terminated(run, status="FINISHED")


# --------------------------------------------------------------------------------------------
# Disabled mode, URIs, hashes
# --------------------------------------------------------------------------------------------


def test_disabled_tracking_does_nothing_and_never_imports_mlflow(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import pipeline
        from pipeline.params import load_params
        from pipeline.tracking import stage_run

        params = load_params(Path(pipeline.__file__).parents[1] / "params.yaml")
        params.tracking.enabled = False
        Path("ck.pt").write_bytes(b"x")
        with stage_run("train", params, params_path="params.yaml") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=3)
            tracker.log_metrics_series([{"step": 0, "loss": 1.0}])
            tracker.log_dataset(Path("missing"), name="d", context="training")
            tracker.log_artifact(Path("ck.pt"), artifact_path="x")
            tracker.log_figure(Path("ck.pt"))
            tracker.set_tags({"a": "b"})
            assert tracker.register_checkpoint(Path("ck.pt"), tags={"sam_type": "vit_b"}) is None
            assert tracker.run_id is None and not tracker.enabled
        assert "mlflow" not in sys.modules, "mlflow was imported"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in _GROUP_ENV}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_tracking_uri_precedence(project: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    params = repo_params()
    assert tracking_uri(params) == f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(params) == "http://127.0.0.1:5000"
    params.tracking.uri = "sqlite:///runs/other.db"  # relative: to the repo root, not the cwd
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    assert tracking_uri(params) == f"sqlite:///{project / 'runs' / 'other.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.main(["uri", "--params", "missing.yaml"]) == 0
    assert capsys.readouterr().out.strip() == f"sqlite:///{project / 'mlflow.db'}"


def test_tracker_refuses_to_travel_to_ray_workers() -> None:
    with pytest.raises(TypeError, match="driver"):
        pickle.dumps(Tracker(stage="train", enabled=False))


def test_dataset_digest_matches_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, single = _make_tree(tmp_path)
    computed = dataset_digest(folder)
    assert (computed.value, computed.source, computed.nfiles, computed.size) == (
        DVC_DIR_MD5,
        "dvc_data",
        2,
        5,
    )
    assert dataset_digest(single).value == DVC_FILE_MD5

    # The fallback re-implements DVC's manifest: identical values when dvc is not importable.
    def no_dvc(path: Path) -> str:
        raise ImportError("No module named 'dvc_data'")

    monkeypatch.setattr(tracking, "_dvc_data_hash", no_dvc)
    fallback = dataset_digest(folder)
    assert fallback.value == DVC_DIR_MD5 and fallback.source.startswith("fallback-md5")
    assert dataset_digest(single).value == DVC_FILE_MD5
    with pytest.raises(FileNotFoundError):
        dataset_digest(tmp_path / "nope")


def test_dataset_digest_from_lock_dot_dvc_and_stale_entries(tmp_path: Path) -> None:
    folder, single = _make_tree(tmp_path)
    (tmp_path / "f.txt.dvc").write_text(yaml.safe_dump({"outs": [{"path": "f.txt", "md5": "f" * 32}]}))
    assert (dataset_digest(single).value, dataset_digest(single).source) == ("f" * 32, "f.txt.dvc")
    _write_lock(tmp_path, {"prep": {"cmd": "c", "deps": [{"path": "d", "md5": "e" * 32 + ".dir"}]}})
    assert dataset_digest(folder).source == "dvc.lock:prep:deps"
    _write_lock(
        tmp_path, {"prep": {"cmd": "c", "outs": [{"path": "d", "md5": "e" * 32 + ".dir", "nfiles": 9}]}}
    )
    stale = dataset_digest(folder)  # the lock describes other data than what is on disk
    assert (stale.value, stale.source) == (DVC_DIR_MD5, "dvc_data")


def test_long_param_values_are_truncated() -> None:
    flat = tracking._flatten_params({"a": {"b": "x" * 7000, "c": None, "d": True, "e": {}}})
    assert len(flat["a.b"]) == 6000 and flat["a.b"].endswith("[truncated]")
    assert (flat["a.c"], flat["a.d"], flat["a.e"]) == ("null", "true", "{}")


def test_git_state(tmp_path: Path) -> None:
    assert tracking._git_state(tmp_path) == ("unknown", "unknown")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a").write_text("1")
    subprocess.run([*git, "add", "a"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], cwd=tmp_path, check=True)
    commit, dirty = tracking._git_state(tmp_path)
    assert len(commit) == 40 and dirty == "false"
    (tmp_path / "untracked").write_text("x")
    assert tracking._git_state(tmp_path)[1] == "false"
    (tmp_path / "a").write_text("2")
    assert tracking._git_state(tmp_path) == (commit, "true")


# --------------------------------------------------------------------------------------------
# Failure policy
# --------------------------------------------------------------------------------------------


def _failure_records(project: Path) -> list[Path]:
    return sorted((project / tracking.FAILURES_DIR).glob("*.json"))


def test_dead_tracking_server_never_costs_the_stage(
    project: Path,
    store: str,
    client: MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No retries in the test (the module's own default is 2 retries, 10 s timeout).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = _free_port()
    params = _params(f"http://127.0.0.1:{port}")
    folder, _ = _make_tree(project)
    checkpoint = project / "plugin.pt"
    checkpoint.write_bytes(b"state")
    outputs = project / "metrics.json"
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")

    with stage_run("train", params) as tracker:
        tracker.log_metrics_series([{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)])
        tracker.log_metrics({"miou": 71.2})
        tracker.log_dataset(folder, name="d", context="training")
        tracker.log_figure(checkpoint)
        assert tracker.register_checkpoint(checkpoint, tags={"sam_type": "vit_l"}) is None
        assert tracker.run_id is None and not tracker.enabled
        outputs.write_text(json.dumps({"miou": 71.2}))  # the stage's own outputs still happen

    assert json.loads(outputs.read_text()) == {"miou": 71.2}
    warned = [r for r in caplog.records if r.name == "pipeline.tracking" and r.levelno >= logging.WARNING]
    assert len(warned) == 1
    assert (
        f"http://127.0.0.1:{port}" in warned[0].getMessage()
        and "Connection refused" in warned[0].getMessage()
    )
    (record_file,) = _failure_records(project)
    assert record_file.name.endswith("_train.json")
    assert (project / tracking.FAILURES_DIR / ".gitignore").read_text() == "*\n"
    record = json.loads(record_file.read_text())
    assert record["uri"] == f"http://127.0.0.1:{port}" and record["status"] == "FINISHED"
    assert [op["op"] for op in record["ops"]][:2] == ["start_run", "log_params"]
    curve = [m for op in record["ops"] if op["op"] == "log_metrics" for m in op["metrics"]]
    assert [(k, s) for k, _, _, s in curve] == [("loss", s) for s in range(5)] + [("miou", 4)]
    assert curve[-1][1] == pytest.approx(71.2)

    # Nothing is lost: the record replays into a working store.
    run_id = replay_failure_file(record_file, uri=store)
    run = client.get_run(run_id)
    assert run.data.metrics["miou"] == pytest.approx(71.2) and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "loss")) == 5
    assert run.data.params["train.lr"] == str(params.train.lr)
    assert run.inputs.dataset_inputs[0].dataset.digest == DVC_DIR_MD5
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    assert len(versions) == 1 and versions[0].tags["sam_type"] == "vit_l"
    assert not record_file.exists() and record_file.with_suffix(".json.replayed").exists()


def test_failure_mid_run_warns_once_and_replays_into_the_same_run(
    project: Path,
    store: str,
    client: MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.exceptions import MlflowException

    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    with stage_run("train", _params(store)) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        real_log_batch = tracker._client.log_batch

        def dead(*args, **kwargs):
            raise MlflowException("server went away")

        monkeypatch.setattr(tracker._client, "log_batch", dead)
        monkeypatch.setattr(tracker._client, "set_terminated", dead)
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_metrics({"loss": 0.25}, step=2)
        run_id = tracker.run_id
    assert len([r for r in caplog.records if r.name == "pipeline.tracking"]) == 1
    monkeypatch.setattr(tracker._client, "log_batch", real_log_batch)
    assert client.get_run(run_id).info.status == "RUNNING"

    (record_file,) = _failure_records(project)
    assert replay_failure_file(record_file) == run_id  # same URI: back into the original run
    assert [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [
        1.0,
        0.5,
        0.25,
    ]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_importing_the_stages_turns_telemetry_off_unless_the_user_chose():
    """`dvc repro` by hand (no Makefile exports) runs the stages without telemetry; a user's own value wins."""
    from pipeline import OFFLINE_ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    env["DO_NOT_TRACK"] = "false"  # the user's explicit choice
    script = "import json, os, pipeline.params; print(json.dumps({k: os.environ.get(k) for k in pipeline.OFFLINE_ENVIRONMENT}))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    seen = json.loads(out)
    assert seen == {**OFFLINE_ENVIRONMENT, "DO_NOT_TRACK": "false"}
