"""Tiny inputs for the training-stage tests: an HQSeg-layout folder, a random tiny base SAM, params.

Shared by tests/test_train_stage.py, tests/test_train_tracking.py and tests/test_pipeline_e2e.py
(not a test module itself): inputs, params, the session's Ray instance, process clean-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import torch
from conftest import TEST_ENVIRONMENT

from pipeline.params import Params, load_params
from pipeline.sam_source import SamSource, write_sam_source
from pipeline.sources import generate_split
from pipeline.train import TrainPaths
from stable_sam.checkpoint import file_sha256

REPO = Path(__file__).resolve().parent.parent
PARAMS_FILE = REPO / "params.yaml"

# Environment for every subprocess the slow tests start (stage runs, Ray heads, dvc): the test
# session's own, unbuffered so that failures show their last lines.
OFFLINE_ENV = {**TEST_ENVIRONMENT, "PYTHONUNBUFFERED": "1"}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus :data:`OFFLINE_ENV`, without a Ray address or a DVC/MLflow context
    inherited from whoever runs the tests (a stray ``RAY_ADDRESS`` would send the stage to a cluster)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME")
    }
    env.update(OFFLINE_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def write_hqseg_folder(root: Path, *, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """``count`` scenes of the project's own generator in the HQSeg layout (im/, gt/, instances/)."""
    generate_split(root, num_images=count, image_size=size, generator_seed=seed, split="tiny")
    return root


def random_tiny_sam_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A tiny SAM with random, non-trivial weights saved as a plain state dict."""
    from conftest import random_stable_sam

    _, vanilla = random_stable_sam("tiny", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vanilla.state_dict(), path)
    return path


def write_tiny_base(base_dir: Path, checkpoint: Path) -> Path:
    """``base_dir/sam.json`` (what train_base writes) pointing at ``checkpoint``."""
    write_sam_source(base_dir, SamSource("tiny", str(checkpoint.resolve()), file_sha256(checkpoint), "user"))
    return base_dir


# Overrides that make the train stage tiny; the test's own overrides come after them.
TINY_TRAIN_OVERRIDES = (
    "sam.type=tiny",
    "train.batch_size=4",
    "train.num_points_loss=256",
    "train.log_every=5",
    "train.use_occlusion=true",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1.0",
    "ray.max_failures=1",
    "tracking.enabled=false",
)


def tiny_params(*overrides: str) -> Params:
    return load_params(PARAMS_FILE, [*TINY_TRAIN_OVERRIDES, *overrides])


def train_paths(root: Path, occluded: Path, base: Path) -> TrainPaths:
    return TrainPaths(
        base=base,
        occluded=occluded,
        out=root / "out",
        metrics=root / "metrics" / "train.json",
        plot=root / "plots" / "train.csv",
    )


def train_cli_args(paths: TrainPaths, overrides: Sequence[str], params_file: Path = PARAMS_FILE) -> list[str]:
    args = ["--params", str(params_file)]
    for item in overrides:
        args += ["--set", item]
    for flag, value in [
        ("--base", paths.base),
        ("--occluded", paths.occluded),
        ("--out", paths.out),
        ("--metrics", paths.metrics),
        ("--plot", paths.plot),
    ]:
        args += [flag, str(value)]
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_process_group(proc: subprocess.Popen, *, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
    """Signal the process group that ``proc`` leads (started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_for(predicate, *, timeout: float, interval: float = 0.2, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def state_tensors_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (or exist on one side only); [] when every tensor is bit-identical."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]


# --------------------------------------------------------------------------------------------
# One local Ray instance for the in-process training tests
# --------------------------------------------------------------------------------------------

# The worker-crash test's step: a hook passed to ``pipeline.train.run(step_hook=...)`` kills the
# worker there, once (the marker file records it, so the restarted worker goes on).
FAIL_STEP = 15


class CrashOnce:
    """Picklable step hook: the worker process dies at ``step`` (``os._exit``: a hard crash, as an
    OOM kill or a lost node would be) unless ``marker`` exists; it writes the marker first."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def __call__(self, step: int) -> None:
        if step == self.step and not self.marker.exists():
            self.marker.write_text(f"worker killed at step {step}\n")
            os._exit(1)


class LocalRay:
    """The session's Ray instance: its private temp dir, and worker-crash hooks."""

    def __init__(self, temp_dir: Path, marker: Path) -> None:
        self.temp_dir = temp_dir
        self.marker = marker

    def crash_hook(self) -> CrashOnce:
        """A step hook under which the run that reaches step :data:`FAIL_STEP` loses a worker (once)."""
        import ray.cloudpickle

        # By value: Ray's workers cannot import this test helper module by name.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.marker.unlink(missing_ok=True)
        return CrashOnce(FAIL_STEP, self.marker)

    @property
    def worker_crashed(self) -> bool:
        return self.marker.is_file() and self.marker.read_text().startswith("worker killed")


_LOCAL_RAY: LocalRay | None = None


def local_ray_session(tmp_path_factory):
    """Generator behind the session fixture ``local_ray`` of the test modules (one ``ray.init``
    for all of them: starting Ray costs seconds). The instance is private (``address="local"``,
    its own temp dir), so it neither joins nor disturbs other Ray instances on the machine."""
    global _LOCAL_RAY
    import ray

    if _LOCAL_RAY is not None and ray.is_initialized():
        yield _LOCAL_RAY
        return
    marker = tmp_path_factory.mktemp("fault-injection") / "worker_crash_marker"
    # Short: Ray's unix socket paths live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    ray.init(
        address="local",
        num_cpus=2,
        _temp_dir=str(temp_dir),
        dashboard_port=free_port(),
        log_to_driver=True,
    )
    _LOCAL_RAY = LocalRay(temp_dir, marker)
    try:
        yield _LOCAL_RAY
    finally:
        _LOCAL_RAY = None
        ray.shutdown()
        kill_pids(pids_with_cmdline(str(temp_dir)))  # normally none: shutdown stops them
        shutil.rmtree(temp_dir, ignore_errors=True)


def pids_with_cmdline(fragment: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``fragment`` (e.g. a private
    Ray temp dir), this process excluded."""
    me, found = psutil.Process(), []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        info = proc.info
        if info["pid"] == me.pid or info["uids"] is None or info["uids"].real != me.uids().real:
            continue
        if fragment in " ".join(info["cmdline"] or ()):
            found.append(info["pid"])
    return found


def kill_pids(pids: Sequence[int], *, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout``."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=timeout)
        procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not procs:
            return


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(
    proc: subprocess.Popen, *, extra_fragment: str | None = None, sig: int = signal.SIGKILL
) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``), its process group, every process
    it spawned (Ray workers rename themselves, so only the parent links find them) and, with
    ``extra_fragment``, any process whose command line names it (a private Ray temp dir)."""
    pids = set(descendants(proc.pid))
    if extra_fragment:
        pids.update(pids_with_cmdline(extra_fragment))
    if proc.poll() is None:
        kill_process_group(proc, sig=sig)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    kill_pids(sorted(pids - {os.getpid()}))


def start_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def copy_checkout(dest: Path) -> None:
    """What a clone of the working tree holds: tracked files plus untracked, not ignored ones."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        source = REPO / raw.decode()
        if source.is_file():  # deleted-but-tracked files are not in a clone of the working tree
            target = dest / raw.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def ray_head_port_flags() -> list[str]:
    """``ray start --head`` flags that give every fixed-default port a free one: a session Ray of
    the test run (``ray.init``, the ``local_ray`` fixture) already holds the dashboard agent's
    default 52365, and a second head would start without its job agent ("No available agent")."""
    return [
        f"--port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
