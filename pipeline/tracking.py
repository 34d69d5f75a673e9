"""MLflow tracking for the pipeline stages: a thin layer over MLflow's public API.

One stage execution is one ``mlflow.start_run`` run, owned by the driver (a tracker refuses to be
pickled into Ray workers): ``with stage_run("train", params, params_path=...) as tracker:``. The runs
of one ``dvc exp run`` (``DVC_EXP_NAME``) or ``make repro`` (``STABLE_SAM_RUN_GROUP``) share a parent
run. The first tracking error logs one warning and turns the tracker off: DVC's files are the record,
MLflow is the view. README.md (MLflow) has the rest."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml  # PyYAML, which omegaconf (pipeline.params) needs too

if TYPE_CHECKING:
    from pipeline.params import Params

logger = logging.getLogger(__name__)
_Tree = Mapping[str, Any]  # params, metrics, tags: nested or flat

ENV_RUN_GROUP = "STABLE_SAM_RUN_GROUP"
ENV_GIT_COMMIT = "STABLE_SAM_GIT_COMMIT"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # else the UI opens it as GenAI


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Output of ``git <args>`` in ``cwd``; None without git or outside a repository."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def repo_root() -> Path:
    """The project root: env ``DVC_ROOT``, else the git toplevel of the cwd, else the cwd."""
    top = os.environ.get("DVC_ROOT") or _git(["rev-parse", "--show-toplevel"], Path.cwd())
    return Path(top or Path.cwd()).resolve()


def _sqlite_path(uri: str) -> Path | None:
    path = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def tracking_uri(params: Params | None = None, root: Path | None = None) -> str:
    """``tracking.uri``, env ``MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db`` (:func:`repo_root`)."""
    root = repo_root() if root is None else root
    uri = (params.tracking.uri if params is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    db = _sqlite_path(uri or "")
    if db is not None and not db.is_absolute():  # from the root: a queued `dvc exp run` runs in a copy
        return uri.replace(str(db), str(root / db), 1)
    return uri or f"sqlite:///{root / 'mlflow.db'}"


def run_group(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(id, label)`` of the ``dvc exp run`` or ``make repro`` a stage is part of; None: standalone."""
    env = os.environ if env is None else env
    label = env.get("DVC_EXP_NAME") or env.get(ENV_RUN_GROUP)
    if not label:
        return None
    # DVC reuses experiment names on other baselines: the baseline is part of the id.
    gid = f"exp-{label}-{env.get('DVC_EXP_BASELINE_REV', '')[:7]}" if env.get("DVC_EXP_NAME") else label
    return re.sub(r"[^A-Za-z0-9_.:@+-]", "_", gid)[:200], label  # the id goes into a search filter


def _flatten(tree: _Tree, prefix: str = "", text: bool = False) -> dict[str, Any]:
    """Nested mappings -> ``{"train.lr": 0.001, ...}``; ``text``: values as in YAML (``null``, ``[1, 2]``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = re.sub(r"[^A-Za-z0-9_\-. /:]", "_", f"{prefix}{key}")  # what MLflow accepts in names
        if isinstance(value, Mapping) and value:  # an empty mapping is a leaf
            flat |= _flatten(value, f"{name}.", text)
        else:
            flat[name] = json.dumps(value, default=str) if text and not isinstance(value, str) else value
    return flat


def _numbers(metrics: _Tree) -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict; strings, None and booleans are left out."""
    flat = {k: v.item() if getattr(v, "ndim", None) == 0 else v for k, v in _flatten(metrics).items()}
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _changed_params(tree: _Tree, flat: dict[str, str], params_path: Path | None) -> dict[str, str] | None:
    """Params differing from the committed params file (at the baseline, else HEAD); None: not in git."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    text = params_path and _git(["show", f"{rev}:./{params_path.name}"], params_path.parent)
    if text is None:
        return None
    committed = _flatten(yaml.safe_load(text) or {})  # values compared, not their text: 1 == 1.0
    run = {
        k: v for k, v in _flatten(tree).items() if not k.startswith("tracking.")
    }  # where runs go: no change
    return {k: flat[k] for k, v in run.items() if committed.get(k, v) != v}


def _describe(changed: Mapping[str, str], limit: int = 120) -> str:
    return ", ".join(f"{k}={v}" for k, v in changed.items())[:limit]  # run names short, tags in full


def _git_dirty(root: Path) -> str | None:
    """Whether tracked files differ from HEAD, but for DVC's outputs and params files; None without git."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import SCMError

    outputs: set[Path] = set()
    with contextlib.suppress(NotDvcRepoError, SCMError), Repo(str(root)) as repo:  # no DVC or git
        outputs = {Path(out.fs_path) for out in (*repo.index.outs, *repo.index.params)}  # metrics, plots too
    own = [":(glob,exclude)**/dvc.lock", ":(glob,exclude)**/*.dvc"]
    own += sorted(f":(exclude){p.relative_to(root)}" for p in outputs if p.is_relative_to(root))
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", ".", *own], root)
    return None if status is None else str(bool(status)).lower()


def _file_digest(path: Path, algorithm: str) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def dataset_digest(path: Path | str) -> tuple[str, str]:
    """``(digest, kind)`` of a dataset folder or file: ``"dvc"``, DVC's md5 of an output it tracks (what
    dvc.lock records), else ``"content"``, the md5 of the files' relative paths and md5s."""
    from dvc.exceptions import NotDvcRepoError, OutputNotFoundError
    from dvc.repo import Repo
    from dvc.scm import SCMError  # a DVC project without git (a `ray job submit` working dir)

    path = Path(os.path.abspath(path))
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")  # a bug of the stage
    with contextlib.suppress(NotDvcRepoError, OutputNotFoundError, SCMError), Repo(str(path.parent)) as repo:
        return str(repo.find_outs_by_path(str(path))[0].get_hash().value), "dvc"
    digest = hashlib.md5()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file, 'md5')}\n".encode())
    return digest.hexdigest(), "content"


def common_folder(files: Iterable[Path | str]) -> Path:
    """The deepest folder holding all of ``files``: a dataset split given by its image and mask files."""
    return Path(os.path.commonpath([os.path.abspath(f) for f in files]))


def _tracked(method: Callable[..., Any]) -> Callable[..., Any]:
    """A tracker method: nothing once tracking is off; the first tracking error turns it off."""

    @functools.wraps(method)
    def call(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        from dvc.exceptions import DvcException
        from mlflow.exceptions import MlflowException

        errors = (MlflowException, DvcException, OSError)  # a store, a network, DVC; not our bugs
        try:
            return method(self, *args, **kwargs)
        except errors as err:
            self.enabled = False
            logger.warning("MLflow tracking at %s failed (%s: %s); the stage goes on untracked", self.uri,
                           type(err).__name__, err)  # fmt: skip
            if self.run_id is not None:  # end it FAILED if the store still answers; not active either way
                with contextlib.suppress(*errors):
                    self._mlflow.end_run("FAILED")
            return None

    return call


class Tracker:
    """One stage execution's MLflow run (from :func:`stage_run`); does nothing unless ``enabled``."""

    def __init__(self, *, enabled: bool, uri: str = "", model: str = "", root: Path | None = None) -> None:
        self.enabled, self.uri, self.root, self._model = enabled, uri, root or Path.cwd(), model
        self.run_id: str | None = None
        self.parent_id: str | None = None  # the group's run
        self._mlflow, self._client = None, None  # the mlflow module and a client, once the run is open
        self._tags: dict[str, str] = {}
        self._last_step, self._training_digests = 0, []

    @_tracked
    def log_metrics(self, metrics: _Tree, step: int | None = None, headline: bool = False) -> None:
        """Log the numbers in ``metrics`` at ``step`` (None: the last one so far, ending the curves);
        ``headline``: on the group's parent run too, where comparisons of pipeline executions find them."""
        step = self._last_step if step is None else int(step)
        self._last_step = max(self._last_step, step)
        now = int(time.time() * 1000)
        entries = [self._mlflow.entities.Metric(k, v, now, step) for k, v in _numbers(metrics).items()]
        for run_id in filter(None, (self.run_id, self.parent_id if headline else None)):
            self._client.log_batch(run_id, metrics=entries)

    @_tracked
    def log_metrics_series(self, rows: Sequence[_Tree], step_key: str = "step") -> None:
        """Log curves: one mapping per step, e.g. ``[{"step": 1, "loss": 0.9}, ...]``."""
        now, entries = int(time.time() * 1000), []
        for index, row in enumerate(rows):
            step = index if row.get(step_key) is None else int(row[step_key])
            self._last_step = max(self._last_step, step)
            values = _numbers({k: v for k, v in row.items() if k != step_key})
            entries += [self._mlflow.entities.Metric(k, v, now, step) for k, v in values.items()]
        self._client.log_batch(self.run_id, metrics=entries)  # MLflow splits it into requests

    @_tracked
    def log_dataset(self, path: Path | str, *, context: str) -> None:
        """Log a dataset input named by its path (from the repo root), digest :func:`dataset_digest`,
        role ``context`` ("training", "evaluation"). One split each: train + val together read as leakage."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        path = Path(os.path.abspath(path))
        digest, kind = dataset_digest(path)
        name = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        dataset = MetaDataset(LocalArtifactDatasetSource(str(path)), name=name, digest=digest)
        self._mlflow.log_input(dataset, context=context, tags={"digest.kind": kind})
        if context == "training":
            self._training_digests.append(digest)

    @_tracked
    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's contents, under ``artifact_path``."""
        path = Path(path)
        if not path.exists():
            logger.warning("not logged to MLflow: %s does not exist", path)
        elif path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path)

    log_figure = functools.partialmethod(log_artifact, artifact_path="figures")  # an image file

    @_tracked
    def set_tags(self, tags: _Tree, on_parent: bool = False) -> None:
        """Set tags (values as strings) on the run, and on the group's parent run if ``on_parent``."""
        entries = [self._mlflow.entities.RunTag(str(k), str(v)) for k, v in tags.items()]
        for run_id in filter(None, (self.run_id, self.parent_id if on_parent else None)):
            self._client.log_batch(run_id, tags=entries)

    @_tracked
    def register_checkpoint(self, path: Path | str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Log a checkpoint under ``checkpoints/``; return its version of ``tracking.registered_model``: the
        one of its sha256 (a resubmitted job), else a new one tagged with provenance and ``tags``."""
        path = Path(path)
        sha256 = _file_digest(path, "sha256")
        self._mlflow.log_artifact(str(path), "checkpoints")
        version = self._model_version(sha256)
        if version is None:
            if not self._client.search_registered_models(f"name = '{self._model}'"):
                self._client.create_registered_model(self._model, description="Stable-SAM plug-ins")
            provenance = {k: v for k, v in self._tags.items() if k in ("dvc.stage", "pipeline.group")}
            provenance |= {"git.commit": self._tags[GIT_COMMIT_TAG], "checkpoint.file": path.name}
            provenance |= {"checkpoint.sha256": sha256, "dataset_version": ",".join(self._training_digests)}
            provenance |= {str(k): str(v) for k, v in (tags or {}).items()}
            # mlflow.register_model needs a logged model in MLflow 3; a version can point at a folder.
            source = f"{self._mlflow.get_artifact_uri()}/checkpoints"
            made = self._client.create_model_version(self._model, source, self.run_id, tags=provenance)
            version = made.version
        self.set_tags({"model.name": self._model, "model.version": version, "checkpoint.sha256": sha256})
        return str(version)

    @_tracked
    def log_evaluated_checkpoint(self, path: Path | str) -> None:
        """Tag the run and its parent with the checkpoint measured: its sha256 and model version."""
        sha256 = _file_digest(Path(path), "sha256")
        tags = {"checkpoint.sha256": sha256, "model.name": self._model}
        self.set_tags(tags | {"model.version": self._model_version(sha256) or "unregistered"}, True)

    def _model_version(self, sha256: str) -> str | None:
        query = f"name = '{self._model}' and tags.`checkpoint.sha256` = '{sha256}'"
        found = self._client.search_model_versions(query)
        return str(min(int(v.version) for v in found)) if found else None

    def __reduce__(self) -> Any:
        raise TypeError("pipeline.tracking.Tracker stays on the driver: Ray workers report to Ray")

    @_tracked
    def _open(self, stage: str, params: Params, params_path: Path | None) -> None:
        """Start the run (under its group's parent) and log the params; called by :func:`stage_run`."""
        import mlflow

        from pipeline.params import resolved_params_dict
        from stable_sam import __version__

        tree = resolved_params_dict(params)
        flat = _flatten(tree, text=True)
        changed, group = _changed_params(tree, flat, params_path), run_group()
        dvc_stage = os.environ.get("DVC_STAGE") or stage
        # What MLflow's own run context cannot know (it records the commit, not whether it was clean).
        tags = {"dvc.stage": dvc_stage, "pipeline.stage": stage, "pipeline.role": "stage"}
        tags |= {"stable_sam.version": __version__, "git.dirty": _git_dirty(self.root)}
        tags |= {"pipeline.group": group and group[0], "dvc.exp_name": os.environ.get("DVC_EXP_NAME")}
        tags |= {"dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV")}
        tags["params.changed"] = None if changed is None else _describe(changed, 8000) or "none"
        self._tags = tags = {k: v for k, v in tags.items() if v}
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file, not its folder
        mlflow.set_tracking_uri(self.uri)
        self._mlflow, self._client = mlflow, mlflow.MlflowClient()
        eid = _experiment_id(self._client, params.tracking.experiment, db)
        if group is not None:
            self.parent_id = _parent_run(self._client, eid, group, changed)
        label = stage + (f"@{dvc_stage.split('@', 1)[1]}" if "@" in dvc_stage else "")
        name = " | ".join(filter(None, [label, group and group[1], _describe(changed or {})]))
        run = mlflow.start_run(experiment_id=eid, run_name=name, parent_run_id=self.parent_id, tags=tags)
        self.run_id, commit = run.info.run_id, run.data.tags.get(GIT_COMMIT_TAG)
        if commit is None and ENV_GIT_COMMIT in os.environ:  # no .git (ray job submit): the submitter's
            mlflow.set_tag(GIT_COMMIT_TAG, commit := os.environ[ENV_GIT_COMMIT])
        self._tags[GIT_COMMIT_TAG] = commit or "unknown"
        mlflow.log_params(flat)
        mlflow.log_text(yaml.safe_dump(tree, sort_keys=False), "params/resolved_params.yaml")
        if params_path is not None and params_path.is_file():
            mlflow.log_artifact(str(params_path), "params")

    @_tracked
    def _end(self, status: str) -> None:
        self._mlflow.end_run(status)
        if self.parent_id is not None:
            self._client.set_terminated(self.parent_id, status)


def _experiment_id(client: Any, name: str, db: Path | None) -> str:
    """The experiment's id (created if missing), tagged so that the UI opens it in classic ML mode."""
    found = client.get_experiment_by_name(name)
    # MLflow's default location is ./mlruns of the cwd: a temporary copy under `dvc exp run --queue`.
    location = (db.parent / "mlruns" / name).as_uri() if db is not None else None
    eid = found.experiment_id if found else client.create_experiment(name, artifact_location=location)
    client.set_experiment_tag(eid, *EXPERIMENT_KIND)  # also on experiments made before it was set
    return eid


def _parent_run(client: Any, experiment_id: str, group: tuple[str, str], changed: dict | None) -> str:
    """The group's parent run, found by its tag or created, with the changed params logged on it."""
    from mlflow.entities import Param

    query = f"tags.`pipeline.group` = '{group[0]}' and tags.`pipeline.role` = 'group'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:  # RUNNING again while this stage runs
        client.update_run((parent := found[0]).info.run_id, status="RUNNING")
    else:  # the group's first stage (the stages of one dvc repro run one after another)
        what = "params as committed" if changed == {} else _describe(changed or {})
        tags = {"pipeline.group": group[0], "pipeline.role": "group"}
        name = " | ".join(filter(None, [group[1], what]))
        parent = client.create_run(experiment_id, run_name=name, tags=tags)
    # A logged param cannot change: a stage run with other --set values keeps them on its own run.
    new = [Param(k, v) for k, v in (changed or {}).items() if k not in parent.data.params]
    client.log_batch(parent.info.run_id, params=new)
    return parent.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params, *, params_path: Path | str | None = None) -> Iterator[Tracker]:
    """Track one stage execution: a run of ``stage`` holding all of ``params`` and the file ``params_path``;
    it ends FINISHED, or FAILED / KILLED when the body raises (the exception propagates unchanged)."""
    if not params.tracking.enabled:
        yield Tracker(enabled=False)
        return
    root, uri = repo_root(), tracking_uri(params)
    if uri.startswith(("http://", "https://")):  # MLflow's defaults: minutes per call to a dead server
        for key, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "10")):
            os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{key}", value)
    tracker = Tracker(enabled=True, uri=uri, model=params.tracking.registered_model, root=root)
    tracker._open(stage, params, Path(params_path) if params_path is not None else None)
    status = "FINISHED"
    try:
        yield tracker
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        tracker._end(status)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.tracking uri [--params FILE]``: the tracking URI the stages would use."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=main.__doc__)
    parser.add_argument("command", choices=["uri"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: params.yaml")
    args = parser.parse_args(argv)
    from pipeline.params import load_params

    print(tracking_uri(load_params(args.params) if args.params.is_file() else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
