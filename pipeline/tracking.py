"""MLflow tracking for the pipeline stages: the only module of the project that imports mlflow.

Every stage wraps its body in :func:`stage_run`::

    with stage_run("train", params, params_path=Path("params.yaml")) as tracker:
        ...
        tracker.log_metrics({"loss": 0.3}, step=10)
        tracker.register_checkpoint(Path("models/stable_sam/plugin.pt"), tags={"sam_type": "vit_l"})

What one stage execution records (one MLflow run, driver side only: Ray workers report to Ray and
the driver forwards to the tracker; the tracker refuses to be pickled so it cannot leak into them):

- params: the resolved config flattened to dot keys (``train.lr``), plus the resolved params file
  as the artifact ``params/resolved_params.yaml`` (and the raw params file next to it);
- metrics: per-step curves and final figures (the numbers the stage also writes for DVC);
- inputs: datasets as MLflow dataset inputs whose digest is the DVC hash of their folder/file;
- artifacts: checkpoints (``checkpoints/``), figures (``figures/``), anything else the stage logs;
- a model version of ``TrackingConfig.registered_model`` per registered checkpoint;
- tags: ``dvc.stage``, ``git.commit``, ``git.dirty``, ``dvc.exp_name``, ``stable_sam.version``,
  ``pipeline.group`` (see below).

Grouping. All stage runs of one ``dvc repro`` / ``dvc exp run`` become children (tag
``mlflow.parentRunId``) of one parent run named after the group, and carry the tag
``pipeline.group``. DVC runs each stage as its own process, so the group id is derived, in order:

1. env ``STABLE_SAM_RUN_GROUP`` (set it yourself to group anything, e.g. a queue of experiments);
2. env ``DVC_EXP_NAME`` (set by ``dvc exp run``, workspace or queued), combined with
   ``DVC_EXP_BASELINE_REV`` so a reused experiment name does not join an old group;
3. the nearest ancestor process whose command line is a ``dvc`` invocation (found by walking
   ``/proc/<pid>/stat`` parent links; ``dvc`` itself, ``python .../dvc`` or ``python -m dvc``):
   its PID and start time (``/proc/<pid>/stat`` field 22), which together identify that one
   ``dvc repro`` even after PIDs are reused;
4. otherwise the stage runs standalone: a fresh id and no parent run.

The first stage run of a group creates the parent run; later ones find it by a tag search. The
parent is RUNNING while one of its stages runs and ends FAILED as soon as one stage failed.

Killed stages. A stage killed outright (SIGKILL, the OOM killer) cannot end its run. Each stage
run carries the tag ``pipeline.process`` (boot id, PID namespace, PID and start time of its
process); when a stage run starts, earlier runs of the same stage on the same host that are still
RUNNING and whose process is gone are set to KILLED (with a warning naming them), and so is their
parent run when it belongs to another group and none of its stage runs is RUNNING any more.

Where runs go. ``TrackingConfig.uri`` if set, else env ``MLFLOW_TRACKING_URI``, else the embedded
store ``sqlite:///<repo root>/mlflow.db`` (no server). The repo root is env ``DVC_ROOT`` (DVC sets
it; queued ``dvc exp run`` executes in a temporary copy, where a cwd-relative DB would vanish),
else the git toplevel, else the cwd. A relative ``sqlite:///x.db`` is taken relative to the repo
root for the same reason. For sqlite stores, the experiment's artifacts live in
``<db folder>/mlruns/<experiment>/`` (both ``mlflow.db`` and ``mlruns/`` are gitignored).
``python -m pipeline.tracking uri`` prints the URI the stages would use.

Failure policy. Tracking never costs a training run. Every tracker call catches MLflow,
HTTP/connection, database and OS errors; the first one logs ONE warning naming the URI and the
error, and the tracker turns into a recorder: what could not be logged (metrics included) goes to
``<repo root>/.tracking_failures/<timestamp>_<stage>.json``, which
``python -m pipeline.tracking replay <file>`` sends to a tracking server later. For http(s)
URIs, MLflow's retry/timeout defaults (7 retries with backoff, 120 s timeout: minutes per call) are
lowered with ``os.environ.setdefault`` (your own settings win) to ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``, so a dead server
costs a few seconds once. The stage's own outputs never depend on tracking.

``TrackingConfig.enabled = False`` gives a tracker whose methods do nothing; mlflow is then not
even imported.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import json
import logging
import numbers
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.params import Params

__all__ = [
    "DatasetDigest",
    "RunGroup",
    "Tracker",
    "dataset_digest",
    "main",
    "replay_failure_file",
    "repo_root",
    "run_group",
    "stage_run",
    "tracking_uri",
]

logger = logging.getLogger(__name__)

ENV_RUN_GROUP = "STABLE_SAM_RUN_GROUP"
FAILURES_DIR = ".tracking_failures"
RESOLVED_PARAMS_ARTIFACT = "params/resolved_params.yaml"

# MLflow's defaults retry for minutes per call; a dead server must cost one short wait per run.
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow limits (mlflow.utils.validation, 3.17).
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE_LENGTH = 6000
_MAX_TAG_VALUE_LENGTH = 8000
_MAX_DATASET_DIGEST_LENGTH = 36
_TRUNCATED = "...[truncated]"
# Metric/param names: alphanumerics, _ - . space / : (anything else, e.g. "@", is replaced).
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


# --------------------------------------------------------------------------------------------
# Where things go: repo root, tracking URI
# --------------------------------------------------------------------------------------------


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """Output of ``git <args>`` in ``cwd``, or None when git or the repo is unavailable."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def repo_root(cwd: Path | None = None) -> Path:
    """The project root: env ``DVC_ROOT``, else the git toplevel of ``cwd``, else ``cwd``."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    return Path(top).resolve() if top else cwd.resolve()


def _sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other URIs and in-memory DBs."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _absolute_sqlite(uri: str, root: Path) -> str:
    """Make a relative ``sqlite:///x.db`` relative to the repo root, not to the stage's cwd."""
    db = _sqlite_db_path(uri)
    if db is None or db.is_absolute():
        return uri
    rest = uri[len("sqlite:///") + len(str(db)) :]
    return f"sqlite:///{root / db}{rest}"


def tracking_uri(params: Params | None = None, root: Path | None = None) -> str:
    """The tracking URI the stages use: ``tracking.uri``, env ``MLFLOW_TRACKING_URI``, or the
    embedded default ``sqlite:///<repo root>/mlflow.db`` (``root`` defaults to :func:`repo_root`)."""
    root = repo_root() if root is None else root
    configured = params.tracking.uri if params is not None else None
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute_sqlite(uri, root)
    return f"sqlite:///{root / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------
# Grouping of the stage runs of one dvc repro / dvc exp run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunGroup:
    """Which pipeline execution a stage run belongs to.

    Attributes:
      id: the value of the ``pipeline.group`` tag (also used to find the parent run).
      name: the parent run's name.
      source: ``"env"``, ``"dvc_exp"``, ``"dvc_process"`` or ``"standalone"``.
    """

    id: str
    name: str
    source: str

    @property
    def has_parent(self) -> bool:
        """A standalone stage is a group of one: it gets no parent run."""
        return self.source != "standalone"


def _clean_group_id(value: str) -> str:
    # The id goes into a search filter string: keep it to characters that need no quoting.
    return re.sub(r"[^A-Za-z0-9_.:@+-]", "_", value)[:200]


def _read_proc_stat(proc: Path, pid: int) -> tuple[int, int]:
    """(ppid, start time in clock ticks since boot) from ``/proc/<pid>/stat``."""
    text = (proc / str(pid) / "stat").read_text()
    # The command name (field 2) is in parentheses and may itself contain spaces or ")".
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])  # fields 4 (ppid) and 22 (starttime)


def _read_proc_cmdline(proc: Path, pid: int) -> list[str]:
    raw = (proc / str(pid) / "cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _dvc_subcommand(argv: Sequence[str]) -> str | None:
    """The dvc subcommand (``"repro"``, ``"exp"``...) if ``argv`` is a dvc invocation, else None.

    Recognised: ``dvc ...``, ``python [opts] /path/to/dvc ...`` and ``python [opts] -m dvc ...``.
    """
    if not argv:
        return None
    args = list(argv)
    if Path(args[0]).name.startswith("python"):
        rest = args[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        if len(rest) >= 2 and rest[0] == "-m" and rest[1] == "dvc":
            args = rest[1:]
        elif rest and Path(rest[0]).name == "dvc":
            args = rest
        else:
            return None
    elif Path(args[0]).name not in ("dvc", "dvc.exe"):
        return None
    sub = next((a for a in args[1:] if not a.startswith("-")), "")
    return sub or "dvc"


def _find_dvc_ancestor(pid: int, proc: Path) -> tuple[int, int, str] | None:
    """(pid, start ticks, subcommand) of the nearest ancestor of ``pid`` that is a dvc process."""
    seen: set[int] = set()
    current = pid
    while current > 1 and current not in seen:
        seen.add(current)
        try:
            ppid, start = _read_proc_stat(proc, current)
            sub = _dvc_subcommand(_read_proc_cmdline(proc, current))
        except (OSError, ValueError, IndexError):
            return None  # no /proc (macOS), a process that just exited, or another user's
        if sub is not None and current != pid:
            return current, start, sub
        current = ppid
    return None


def _process_start_label(proc: Path, start_ticks: int) -> str:
    """Wall-clock start time of a process, from the boot time in /proc/stat ('' if unknown)."""
    try:
        btime = next(
            int(line.split()[1])
            for line in (proc / "stat").read_text().splitlines()
            if line.startswith("btime")
        )
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(btime + start_ticks / hz))


PROCESS_TAG = "pipeline.process"


def _process_identity(proc: Path = Path("/proc")) -> str | None:
    """``<boot id>|<PID namespace>|<pid>|<start ticks>`` of this process; None without a Linux /proc."""
    try:
        boot = (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        namespace = os.readlink(proc / "self" / "ns" / "pid")  # "pid:[4026531836]"
        start = _read_proc_stat(proc, os.getpid())[1]
    except (OSError, ValueError, IndexError):
        return None
    return f"{boot}|{namespace}|{os.getpid()}|{start}"


def _process_gone(identity: str, proc: Path = Path("/proc")) -> bool:
    """True when the process named by ``identity`` ran in this boot and PID namespace and has exited
    (or its PID now belongs to a younger process); False when it runs or that cannot be told."""
    mine = _process_identity(proc)
    parts = identity.split("|")
    if mine is None or len(parts) != 4 or mine.split("|")[:2] != parts[:2]:
        return False
    try:
        return _read_proc_stat(proc, int(parts[2]))[1] != int(parts[3])
    except (FileNotFoundError, ProcessLookupError):
        return True
    except (OSError, ValueError, IndexError):
        return False


def run_group(
    env: Mapping[str, str] | None = None,
    *,
    pid: int | None = None,
    proc: Path = Path("/proc"),
) -> RunGroup:
    """The group of the current stage execution (see the module docstring for the rule).

    Args:
      env: the environment (default ``os.environ``).
      pid: the process whose ancestors are searched (default: this process).
      proc: the procfs root (tests pass a fake tree).
    """
    env = os.environ if env is None else env
    if env.get(ENV_RUN_GROUP):
        value = env[ENV_RUN_GROUP]
        return RunGroup(id=_clean_group_id(value), name=value, source="env")
    if env.get("DVC_EXP_NAME"):
        name = env["DVC_EXP_NAME"]
        baseline = env.get("DVC_EXP_BASELINE_REV", "")[:7]
        gid = f"exp-{name}-{baseline}" if baseline else f"exp-{name}"
        return RunGroup(id=_clean_group_id(gid), name=name, source="dvc_exp")
    found = _find_dvc_ancestor(os.getpid() if pid is None else pid, proc)
    if found is not None:
        dvc_pid, start, sub = found
        when = _process_start_label(proc, start)
        name = f"dvc {sub} {when} (pid {dvc_pid})" if when else f"dvc {sub} (pid {dvc_pid})"
        return RunGroup(id=f"dvc-{dvc_pid}-{start}", name=name, source="dvc_process")
    gid = f"standalone-{uuid.uuid4().hex[:12]}"
    return RunGroup(id=gid, name=gid, source="standalone")


# --------------------------------------------------------------------------------------------
# DVC hashes of datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetDigest:
    """The DVC hash of a dataset path.

    Attributes:
      value: the md5 exactly as DVC writes it (directories end in ``.dir``).
      source: where it came from: ``"dvc.lock:<stage>:outs"`` / ``"...:deps"``, ``"<file>.dvc"``,
        ``"dvc_data"`` (computed with DVC's own hashing) or ``"fallback-md5 (dvc not importable)"``.
      nfiles: number of files (directories only).
      size: total size in bytes.
    """

    value: str
    source: str
    nfiles: int | None
    size: int


def _walk_stats(path: Path) -> tuple[int | None, int]:
    """(nfiles, total size) of a directory (nfiles None for a file): cheap, stat only."""
    if path.is_file():
        return None, path.stat().st_size
    nfiles, size = 0, 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            nfiles += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return nfiles, size


def _find_dvc_project(path: Path) -> Path | None:
    """The nearest ancestor folder of ``path`` that holds a ``dvc.lock`` or a ``.dvc`` folder."""
    for folder in path.parents:
        if (folder / "dvc.lock").is_file() or (folder / ".dvc").is_dir():
            return folder
    return None


def _lock_entry(path: Path) -> tuple[dict[str, Any], str] | None:
    """The dvc.lock / ``.dvc`` entry recorded for ``path`` (absolute), with a label of its origin.

    Outs win over deps: a stage's deps in dvc.lock are only refreshed when that stage finishes,
    while the producing stage's outs are up to date as soon as it ran.
    """
    import yaml  # PyYAML: a dependency of omegaconf and dvc

    target = os.path.normpath(path)
    dot_dvc = path.with_name(path.name + ".dvc")
    if dot_dvc.is_file():
        with contextlib.suppress(OSError, yaml.YAMLError):
            for out in (yaml.safe_load(dot_dvc.read_text()) or {}).get("outs", []) or []:
                if os.path.normpath(path.parent / str(out.get("path", ""))) == target and out.get("md5"):
                    return out, dot_dvc.name
    project = _find_dvc_project(path)
    lock = project / "dvc.lock" if project else None
    if lock is None or not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
    except (OSError, yaml.YAMLError) as err:
        logger.debug("cannot read %s: %s", lock, err)
        return None
    for kind in ("outs", "deps"):
        for stage, body in stages.items():
            for entry in (body or {}).get(kind, []) or []:
                if not isinstance(entry, dict) or not entry.get("md5"):
                    continue
                if os.path.normpath(project / str(entry.get("path", ""))) == target:
                    return entry, f"dvc.lock:{stage}:{kind}"
    return None


def _dvc_data_hash(path: Path) -> str:
    """The md5 DVC itself computes for ``path`` (``dvc add`` / dvc.lock value), via dvc_data."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem
    from dvc_objects.fs.local import LocalFileSystem

    # dry_run: hash only; the in-memory staging DB stores nothing on disk.
    odb = HashFileDB(MemoryFileSystem(), "memory://stable-sam-tracking")
    _, _, obj = build(odb, str(path), LocalFileSystem(), "md5", dry_run=True)
    return str(obj.hash_info.value)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fallback_hash(path: Path) -> str:
    """DVC's hash without DVC: a file's md5; for a folder, the md5 of the JSON list
    ``[{"md5": <file md5>, "relpath": <posix relative path>}, ...]`` sorted by relpath and
    dumped with ``sort_keys=True`` (DVC 3's ``.dir`` manifest), plus the ``.dir`` suffix."""
    if path.is_file():
        return _file_md5(path)
    entries = []
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = Path(dirpath) / name
            entries.append({"md5": _file_md5(full), "relpath": full.relative_to(path).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest).hexdigest() + ".dir"


def dataset_digest(path: Path | str) -> DatasetDigest:
    """The DVC hash of a dataset file or folder.

    Read from the matching ``dvc.lock`` out/dep (or ``<path>.dvc``) when present and consistent
    with the files on disk (same file count and size where recorded); otherwise computed with DVC's
    own hashing (``dvc_data``), or, only when DVC is not importable, with the same manifest format
    re-implemented here (:func:`_fallback_hash`).

    Raises:
      FileNotFoundError: ``path`` does not exist.
    """
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    nfiles, size = _walk_stats(path)
    found = _lock_entry(path)
    if found is not None:
        entry, origin = found
        stale = ("nfiles" in entry and entry["nfiles"] != nfiles) or (
            "size" in entry and entry["size"] != size
        )
        if not stale:
            return DatasetDigest(str(entry["md5"]), origin, nfiles, size)
        logger.info("%s records another version of %s than is on disk: hashing it", origin, path)
    try:
        return DatasetDigest(_dvc_data_hash(path), "dvc_data", nfiles, size)
    except ImportError:
        return DatasetDigest(_fallback_hash(path), "fallback-md5 (dvc not importable)", nfiles, size)


# --------------------------------------------------------------------------------------------
# Small helpers: flattening, git, versions
# --------------------------------------------------------------------------------------------


def _param_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if len(text) > _MAX_PARAM_VALUE_LENGTH:  # the full value is in params/resolved_params.yaml
        text = text[: _MAX_PARAM_VALUE_LENGTH - len(_TRUNCATED)] + _TRUNCATED
    return text


def _flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"train.lr": "0.001", ...}`` (lists JSON-encoded, values truncated)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten_params(value, prefix=f"{name}."))
        else:
            flat[_BAD_NAME_CHARS.sub("_", name)] = _param_value(value)
    return flat


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Number):
        return float(value)  # type: ignore[arg-type]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        item = value.item()
        return None if isinstance(item, bool) else float(item)
    return None


def _flatten_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"val.miou": 71.2}``; other leaves skipped."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, prefix=f"{name}."))
            continue
        number = _as_number(value)
        if number is not None:
            flat[_BAD_NAME_CHARS.sub("_", name)] = number
    return flat


def _truncate_tag(value: Any) -> str:
    text = str(value)
    if len(text) > _MAX_TAG_VALUE_LENGTH:
        text = text[: _MAX_TAG_VALUE_LENGTH - len(_TRUNCATED)] + _TRUNCATED
    return text


def _git_state(cwd: Path) -> tuple[str, str]:
    """(commit, dirty) of the code being run; ``("unknown", "unknown")`` outside a git repo.

    Dirty means modified tracked files (untracked files are ignored: data and outputs would
    otherwise mark every run dirty).
    """
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return "unknown", "unknown"
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    dirty = "unknown" if status is None else ("true" if status else "false")
    return commit, dirty


def _project_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("stable-sam")
    except PackageNotFoundError:
        package = sys.modules.get("stable_sam")
        return str(getattr(package, "__version__", "unknown"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "tracking failed" (never a bug in the stage itself)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]  # OSError covers ConnectionError
    from mlflow.exceptions import MlflowException

    errors.append(MlflowException)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.RequestException)
    with contextlib.suppress(ImportError):
        import urllib3.exceptions

        errors.append(urllib3.exceptions.HTTPError)
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    return tuple(errors)


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """The MLflow run of one stage execution (see the module docstring).

    Use :func:`stage_run` to get one. Every method returns normally whatever happens to the
    tracking server; after the first tracking failure the methods record instead of logging.
    A disabled tracker (``TrackingConfig.enabled = False``) does nothing at all.
    """

    def __init__(
        self,
        *,
        stage: str,
        enabled: bool,
        uri: str | None = None,
        root: Path | None = None,
        experiment: str = "stable-sam",
        registered_model: str = "stable-sam-plugin",
        run_name: str | None = None,
        group: RunGroup | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        self._stage = stage
        self._enabled = enabled
        self._uri = uri or ""
        self._root = root or Path.cwd()
        self._experiment = experiment
        self._registered_model = registered_model
        self._run_name = run_name or stage
        self._group = group
        self._tags = dict(tags or {})
        self._params = dict(params or {})
        self._lock = threading.RLock()
        self._client: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._run_id: str | None = None
        self._parent_id: str | None = None
        self._artifact_uri: str | None = None
        self._failed = False
        self._error = ""
        self._pending: list[dict[str, Any]] = []
        self._failure_file: Path | None = None
        self._last_step = 0
        self._training_digests: list[str] = []

    # -- public API ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None when tracking is disabled or the run could not be created."""
        return self._run_id

    @property
    def enabled(self) -> bool:
        """True while calls go to MLflow (False when disabled or after a tracking failure)."""
        return self._enabled and not self._failed

    @property
    def failure_file(self) -> Path | None:
        """Where unlogged calls were recorded, once a tracking failure happened."""
        return self._failure_file

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened to dot keys, non-numbers skipped).

        Args:
          metrics: e.g. ``{"loss": 0.3, "val": {"miou": 71.2}}``.
          step: the training step of a curve point. None (final figures) logs at the largest step
            logged so far in this run, so a final value is also the latest point of its curve.
        """
        if not self._enabled:
            return
        flat = _flatten_metrics(metrics)
        if not flat:
            return
        with self._lock:
            if step is None:
                step = self._last_step
            self._last_step = max(self._last_step, int(step))
            now = _now_ms()
            self._call("log_metrics", {"metrics": [[k, v, now, int(step)] for k, v in flat.items()]})

    def log_metrics_series(self, rows: Sequence[Mapping[str, Any]], step_key: str = "step") -> None:
        """Log many steps at once (batched, at most 1000 metrics per request).

        Args:
          rows: one mapping per step, e.g. ``[{"step": 0, "loss": 1.2}, {"step": 10, "loss": 0.8}]``;
            a row without ``step_key`` uses its index.
          step_key: the column that holds the step.
        """
        if not self._enabled or not rows:
            return
        now = _now_ms()
        entries: list[list[Any]] = []
        with self._lock:
            for index, row in enumerate(rows):
                step = int(row[step_key]) if row.get(step_key) is not None else index
                self._last_step = max(self._last_step, step)
                values = _flatten_metrics({k: v for k, v in row.items() if k != step_key})
                entries.extend([k, v, now, step] for k, v in values.items())
            if entries:
                self._call("log_metrics", {"metrics": entries})

    def log_dataset(self, path: Path | str, name: str, context: str = "training") -> None:
        """Log a dataset input whose digest is the DVC hash of ``path`` (see :func:`dataset_digest`).

        Args:
          path: the dataset folder or file.
          name: the dataset's name in MLflow, e.g. ``"occluded-train"``.
          context: ``"training"``, ``"validation"``, ``"evaluation"``...
        """
        if not self._enabled:
            return
        try:
            digest = dataset_digest(path)
        except OSError as err:  # a caller bug must still not cost the run
            logger.warning("dataset %s not logged to MLflow: %s", path, err)
            return
        absolute = Path(os.path.abspath(path))
        try:
            relative = absolute.relative_to(Path(os.path.abspath(self._project_dir(absolute)))).as_posix()
        except ValueError:
            relative = str(absolute)
        if context == "training":
            self._training_digests.append(digest.value)
        payload = {
            "name": name,
            "context": context,
            "path": relative,
            "absolute_path": str(absolute),
            "digest": digest.value,
            "digest_source": digest.source,
            "nfiles": digest.nfiles,
            "size": digest.size,
        }
        with self._lock:
            self._call("log_dataset", payload)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Log a file or a folder (its contents) under ``artifact_path`` of the run."""
        if not self._enabled:
            return
        path = Path(path)
        if not path.exists():
            logger.warning("artifact %s not logged to MLflow: it does not exist", path)
            return
        with self._lock:
            self._call("log_artifact", {"path": str(path.resolve()), "artifact_path": artifact_path})

    def log_figure(self, path: Path | str) -> None:
        """Log an image file under ``figures/``."""
        self.log_artifact(path, artifact_path="figures")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values converted to strings)."""
        if not self._enabled or not tags:
            return
        with self._lock:
            self._call("set_tags", {"tags": {str(k): _truncate_tag(v) for k, v in tags.items()}})

    def register_checkpoint(self, path: Path | str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Log a checkpoint under ``checkpoints/`` and register it as a model version.

        The version belongs to ``TrackingConfig.registered_model`` and points at the run's
        ``checkpoints`` folder (plain torch state file, no ``mlflow.pytorch`` flavour). Its tags:
        ``git.commit``, ``dvc.stage``, ``pipeline.group``, ``checkpoint.file``, ``dataset_version``
        (default: the DVC hashes of the datasets logged with context ``"training"``) and
        ``sam_type``, plus ``tags`` (which win).

        Returns:
          The model version (e.g. ``"3"``), or None when tracking is disabled or failed.
        """
        if not self._enabled:
            return None
        path = Path(path)
        if not path.is_file():
            logger.warning("checkpoint %s not registered in MLflow: no such file", path)
            return None
        version_tags = {
            "git.commit": self._tags.get("git.commit", "unknown"),
            "dvc.stage": self._tags.get("dvc.stage", self._stage),
            "pipeline.group": self._group.id if self._group else "",
            "checkpoint.file": path.name,
            "dataset_version": ",".join(self._training_digests) or "unknown",
            "sam_type": "unknown",
        }
        version_tags.update({str(k): _truncate_tag(v) for k, v in (tags or {}).items()})
        with self._lock:
            result = self._call("register_checkpoint", {"path": str(path.resolve()), "tags": version_tags})
        return None if result is None else str(result)

    def __reduce__(self) -> Any:
        raise TypeError(
            "pipeline.tracking.Tracker must stay on the driver: Ray workers report to Ray "
            "(ray.train.report) and the driver logs to MLflow"
        )

    # -- dispatch and failure handling --------------------------------------------------------

    def _project_dir(self, path: Path) -> Path:
        return _find_dvc_project(path) or self._root

    def _call(self, op: str, payload: dict[str, Any]) -> Any:
        """Run ``_do_<op>(**payload)``; on a tracking error warn once and record from then on."""
        if self._failed:
            self._pending.append({"op": op, **payload})
            return None
        try:
            return getattr(self, f"_do_{op}")(**payload)
        except self._errors as err:
            self._fail(err, op, payload)
            return None

    def _fail(self, err: BaseException, op: str, payload: dict[str, Any]) -> None:
        self._failed = True
        self._error = f"{type(err).__name__}: {err}"
        self._pending.append({"op": op, **payload})
        self._write_failure_file()
        logger.warning(
            "MLflow tracking at %s failed (%s while doing %s). Tracking is off for the rest of "
            "stage %r, which continues; what was not logged is recorded in %s "
            "(send it later with: python -m pipeline.tracking replay <file>).",
            self._uri,
            self._error,
            op,
            self._run_name,
            self._failure_file or "memory only (the file could not be written)",
        )

    def _failure_record(self, status: str | None = None) -> dict[str, Any]:
        return {
            "stage": self._stage,
            "run_name": self._run_name,
            "uri": self._uri,
            "experiment": self._experiment,
            "registered_model": self._registered_model,
            "error": self._error,
            "run_id": self._run_id,
            "status": status,
            "group": None if self._group is None else vars(self._group),
            "tags": self._tags,
            "params": self._params,
            "ops": self._pending,
        }

    def _write_failure_file(self, status: str | None = None) -> None:
        folder = self._root / FAILURES_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ignore = folder / ".gitignore"
            if not ignore.exists():  # keep the records out of git without touching the repo's files
                ignore.write_text("*\n")
            if self._failure_file is None:
                stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:6]}"
                self._failure_file = folder / f"{stamp}_{_safe_name(self._run_name)}.json"
            tmp = self._failure_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self._failure_record(status), indent=1, default=str))
            os.replace(tmp, self._failure_file)
        except OSError as err:
            logger.error("could not write the tracking failure record under %s: %s", folder, err)

    # -- lifecycle ----------------------------------------------------------------------------

    def _start(self, params_tree: dict[str, Any] | None, params_path: Path | None) -> None:
        """Connect, create the (parent and) stage run, log params and the resolved params file."""
        if self._uri.startswith(("http://", "https://")):
            for key, value in _HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        db = _sqlite_db_path(self._uri)
        if db is not None:
            with contextlib.suppress(OSError):  # sqlite creates the file, not its folder
                db.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._errors = _tracking_errors()
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
        except ImportError as err:
            self._errors = (OSError,)
            self._fail(err, "start_run", {})
            return
        with self._lock:
            self._call("start_run", {})
            self._call("log_params", {"params": self._params})
            if params_tree is not None:
                import yaml

                text = yaml.safe_dump(params_tree, sort_keys=False)
                self._call("log_text", {"text": text, "artifact_file": RESOLVED_PARAMS_ARTIFACT})
            if params_path is not None and Path(params_path).is_file():
                self._call(
                    "log_artifact", {"path": str(Path(params_path).resolve()), "artifact_path": "params"}
                )

    def close(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) and flush any failure record."""
        if not self._enabled:
            return
        with self._lock:
            self._call("end_run", {"status": status, "end_time": _now_ms()})
            if self._failed:
                self._write_failure_file(status)

    # -- the MLflow calls (each one is an "op" that a failure record can replay) ------------

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        experiment = client.get_experiment_by_name(self._experiment)
        if experiment is None:
            location = None
            db = _sqlite_db_path(self._uri)
            if db is not None:
                # Default would be ./mlruns of the *current* cwd (a temp copy under dvc exp queues).
                location = (db.parent / "mlruns" / _safe_name(self._experiment)).as_uri()
            try:
                return client.create_experiment(self._experiment, artifact_location=location)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self._experiment)
        if experiment.lifecycle_stage == "deleted":
            logger.info("restoring deleted MLflow experiment %r", self._experiment)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _parent_run(self, experiment_id: str) -> str | None:
        """The group's parent run: found by tag, created by the group's first stage run."""
        group = self._group
        if group is None or not group.has_parent:
            return None
        client = self._client
        query = f"tags.`pipeline.group` = '{group.id}' and tags.`pipeline.role` = 'group'"

        def find() -> list[Any]:
            return client.search_runs(
                [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
            )

        runs = find()
        if not runs:
            tags = {
                "pipeline.group": group.id,
                "pipeline.group_source": group.source,
                "pipeline.role": "group",
                "mlflow.note.content": f"All stage runs of one pipeline execution ({group.source}: {group.name}).",
            }
            for key in ("git.commit", "git.dirty", "dvc.exp_name", "dvc.exp_baseline", "stable_sam.version"):
                if key in self._tags:
                    tags[key] = self._tags[key]
            created = client.create_run(experiment_id, run_name=group.name, tags=tags)
            runs = find()
            if len(runs) > 1 and runs[0].info.run_id != created.info.run_id:
                client.delete_run(created.info.run_id)  # a concurrent stage won the race
        parent = runs[0]
        if parent.info.status != "FAILED":
            client.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id

    def _do_start_run(self) -> str:
        client = self._client
        experiment_id = self._experiment_id()
        if self._run_id is not None:  # replaying into a run that was created before the failure
            self._parent_id = self._tags.get("mlflow.parentRunId")
            self._artifact_uri = client.get_run(self._run_id).info.artifact_uri
            return self._run_id
        self._parent_id = self._parent_run(experiment_id)
        if self._parent_id is not None:
            self._tags["mlflow.parentRunId"] = self._parent_id
        self._end_runs_of_dead_processes(experiment_id)
        run = client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        return self._run_id

    def _end_runs_of_dead_processes(self, experiment_id: str) -> None:
        """Set to KILLED the RUNNING runs of this stage on this host whose process is gone."""
        client, stage, host = self._client, self._tags.get("pipeline.stage"), self._tags.get("host")
        if not stage or not host or PROCESS_TAG not in self._tags:
            return
        query = (
            f"attributes.status = 'RUNNING' and tags.`pipeline.role` = 'stage' and "
            f"tags.`pipeline.stage` = '{stage}' and tags.host = '{host}'"
        )
        parents = set()
        for run in client.search_runs([experiment_id], filter_string=query):
            identity = run.data.tags.get(PROCESS_TAG)
            if identity is None or not _process_gone(identity):
                continue
            client.set_terminated(run.info.run_id, status="KILLED")
            logger.warning(
                "MLflow run %s (%s, started %s) was still RUNNING but its process (pid %s on %s) is "
                "gone: marked KILLED",
                run.info.run_id, run.info.run_name,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000)),
                identity.split("|")[2], host,
            )  # fmt: skip
            parents.add(run.data.tags.get("mlflow.parentRunId"))
        for parent in parents - {None, self._parent_id}:
            running = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
                max_results=1,
            )
            if not running and client.get_run(parent).info.status == "RUNNING":
                client.set_terminated(parent, status="KILLED")
                logger.warning("MLflow parent run %s had no running stage left: marked KILLED", parent)

    def _require_run(self) -> str:
        if self._run_id is None:
            from mlflow.exceptions import MlflowException

            raise MlflowException("no MLflow run (start_run failed)")
        return self._run_id

    def _do_log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), params=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])

    def _do_set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._tags.update(tags)
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self._require_run(), tags=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])

    def _do_log_metrics(self, metrics: list[list[Any]]) -> None:
        from mlflow.entities import Metric

        items = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in metrics]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._require_run(), metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def _do_log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._require_run(), text, artifact_file)

    def _do_log_artifact(self, path: str, artifact_path: str | None) -> None:
        run_id = self._require_run()
        if Path(path).is_dir():
            self._client.log_artifacts(run_id, path, artifact_path)
        elif Path(path).is_file():
            self._client.log_artifact(run_id, path, artifact_path)
        else:
            logger.warning("artifact %s not logged to MLflow: it no longer exists", path)

    def _do_log_dataset(self, **info: Any) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        profile = {
            "dvc_hash": info["digest"],
            "dvc_hash_source": info["digest_source"],
            "path": info["path"],
            "nfiles": info["nfiles"],
            "size": info["size"],
        }

        class DvcDataset(MetaDataset):
            """A metadata-only dataset whose profile carries the full DVC hash and its origin."""

            @property
            def profile(self) -> dict[str, Any]:
                return profile

            def to_dict(self) -> dict[str, str]:
                config = super().to_dict()
                config["profile"] = json.dumps(self.profile)
                return config

        with warnings.catch_warnings():
            # "" and "file" both resolve to LocalArtifactDatasetSource: MLflow warns about the tie.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(info["path"])
        digest = str(info["digest"])[:_MAX_DATASET_DIGEST_LENGTH]  # md5 + ".dir" is exactly 36
        dataset = DvcDataset(source=source, name=info["name"], digest=digest)
        tags = [
            InputTag("mlflow.data.context", info["context"]),
            InputTag("dvc.hash", str(info["digest"])),
            InputTag("dvc.hash_source", str(info["digest_source"])[:500]),
        ]
        self._client.log_inputs(
            self._require_run(), datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)]
        )

    def _do_register_checkpoint(self, path: str, tags: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException

        run_id = self._require_run()
        client = self._client
        client.log_artifact(run_id, path, "checkpoints")
        name = self._registered_model
        try:
            client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                client.create_registered_model(name, description="Stable-SAM plug-in checkpoints")
            except MlflowException as err2:
                if err2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        # mlflow.register_model("runs:/...") needs a logged model in MLflow 3; a plain artifact
        # folder is registered by pointing a version at it.
        version = client.create_model_version(
            name,
            source=f"{self._artifact_uri}/checkpoints",
            run_id=run_id,
            tags=tags,
            description=f"{Path(path).name} from stage {self._run_name}",
        )
        return str(version.version)

    def _do_end_run(self, status: str, end_time: int) -> None:
        client = self._client
        client.set_terminated(self._require_run(), status=status, end_time=end_time)
        if self._parent_id is not None:
            current = client.get_run(self._parent_id).info.status
            parent_status = "FAILED" if "FAILED" in (status, current) else "FINISHED"
            client.set_terminated(self._parent_id, status=parent_status, end_time=end_time)


def _run_name(stage: str, dvc_stage: str | None) -> str:
    """The stage name, plus the foreach/matrix key of ``DVC_STAGE`` (``train@vit_l``)."""
    if dvc_stage and "@" in dvc_stage:
        return f"{stage}@{dvc_stage.split('@', 1)[1]}"
    return stage


@contextlib.contextmanager
def stage_run(stage: str, params: Params, *, params_path: Path | str | None = None) -> Iterator[Tracker]:
    """One MLflow run for one stage execution (see the module docstring).

    Args:
      stage: the stage name (``"train"``); the run name adds the DVC foreach/matrix key.
      params: the resolved config of the stage.
      params_path: the params file the stage read; logged next to the resolved params.

    Yields:
      The stage's :class:`Tracker`. The run ends FINISHED, or FAILED / KILLED when the body
      raises (the exception propagates unchanged).
    """
    config = params.tracking
    if not config.enabled:
        yield Tracker(stage=stage, enabled=False)
        return
    from pipeline.params import resolved_params_dict

    root = repo_root()
    cwd = Path.cwd()
    commit, dirty = _git_state(cwd)
    dvc_stage = os.environ.get("DVC_STAGE")
    group = run_group()
    tags = {
        "dvc.stage": dvc_stage or stage,
        "pipeline.stage": stage,
        "pipeline.group": group.id,
        "pipeline.group_source": group.source,
        "pipeline.role": "stage",
        "git.commit": commit,
        "git.dirty": dirty,
        "stable_sam.version": _project_version(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"pipeline.{stage}",
        "host": socket.gethostname(),
    }
    identity = _process_identity()
    if identity is not None:
        tags[PROCESS_TAG] = identity
    with contextlib.suppress(KeyError, OSError):
        tags["mlflow.user"] = getpass.getuser()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    tree = resolved_params_dict(params)
    tracker = Tracker(
        stage=stage,
        enabled=True,
        uri=tracking_uri(params, root),
        root=root,
        experiment=config.experiment,
        registered_model=config.registered_model,
        run_name=_run_name(stage, dvc_stage),
        group=group,
        tags=tags,
        params=_flatten_params(tree),
    )
    tracker._start(tree, Path(params_path) if params_path is not None else None)
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.close(status)


# --------------------------------------------------------------------------------------------
# Replay of failure records, CLI
# --------------------------------------------------------------------------------------------


def replay_failure_file(path: Path | str, uri: str | None = None) -> str:
    """Send what a failed stage could not log to a tracking server.

    The ops go to the original run when it was created before the failure, otherwise to a new
    run with the recorded name, tags and params (and parent, for grouped stages). Errors raise
    (this is interactive), and the file is renamed to ``*.replayed`` on success.

    Args:
      path: a ``.tracking_failures/*.json`` record.
      uri: tracking URI (default: the one recorded).

    Returns:
      The run id the ops went to.
    """
    path = Path(path)
    record = json.loads(path.read_text())
    group = RunGroup(**record["group"]) if record.get("group") else None
    tracker = Tracker(
        stage=record["stage"],
        enabled=True,
        uri=uri or record["uri"],
        root=path.parent.parent,
        experiment=record["experiment"],
        registered_model=record.get("registered_model", "stable-sam-plugin"),
        run_name=record["run_name"],
        group=group,
        tags=record.get("tags") or {},
        params=record.get("params") or {},
    )
    from mlflow import MlflowClient

    tracker._client = MlflowClient(tracking_uri=tracker._uri, registry_uri=tracker._uri)
    ops: list[dict[str, Any]] = list(record.get("ops") or [])
    if uri is None or uri == record["uri"]:
        tracker._run_id = record.get("run_id")
    else:
        # Another server: the original run (if any) is not there. Start a new one with the
        # recorded params; what was logged before the failure stays on the original server.
        tracker._tags.pop("mlflow.parentRunId", None)
        ops = [entry for entry in ops if entry["op"] not in ("start_run", "log_params")]
        ops[:0] = [{"op": "start_run"}, {"op": "log_params", "params": tracker._params}]
    if tracker._run_id is None and not any(op["op"] == "start_run" for op in ops):
        ops.insert(0, {"op": "start_run"})
    if not any(op["op"] == "start_run" for op in ops):
        tracker._do_start_run()  # attach to the recorded run
    for entry in ops:
        op = entry["op"]
        payload = {k: v for k, v in entry.items() if k != "op"}
        getattr(tracker, f"_do_{op}")(**payload)
    if not any(op["op"] == "end_run" for op in ops):
        tracker._do_end_run(record.get("status") or "FINISHED", _now_ms())
    path.rename(path.with_suffix(".json.replayed"))
    return str(tracker._run_id)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.tracking uri|replay``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    uri_cmd = sub.add_parser("uri", help="print the tracking URI the stages would use")
    uri_cmd.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    uri_cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    replay_cmd = sub.add_parser("replay", help="send recorded tracking failures to a server")
    replay_cmd.add_argument("files", nargs="+", type=Path)
    replay_cmd.add_argument("--uri", default=None, help="tracking URI (default: the recorded one)")
    args = parser.parse_args(argv)
    if args.command == "uri":
        params = None
        if Path(args.params).is_file():
            from pipeline.params import load_params

            params = load_params(args.params, args.overrides)
        elif args.overrides:
            parser.error(f"--set needs a params file; {args.params} does not exist")
        print(tracking_uri(params))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for file in args.files:
        run_id = replay_failure_file(file, uri=args.uri)
        print(f"{file}: replayed into run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
