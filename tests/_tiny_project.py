"""Tiny inputs for the training-stage tests: an HQSeg-layout folder, a random tiny base SAM, params.

Shared by tests/test_train_stage.py, tests/test_train_tracking.py and tests/test_pipeline_e2e.py
(not a test module itself): inputs, params, the session's Ray instance, process clean-up.
"""

from __future__ import annotations

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

import numpy as np
import torch
from conftest import TEST_ENVIRONMENT
from PIL import Image

from pipeline.params import Params, load_params
from pipeline.sam_source import SamSource, write_sam_source
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
    """``root/im/NAME.jpg`` + ``root/gt/NAME.png``: one bright ellipse or rectangle per noisy image."""
    rng = np.random.default_rng(seed)
    (root / "im").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        ry, rx = rng.integers(size // 8, size // 4, 2)
        if i % 2:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        background = rng.integers(0, 256, 3)
        colour = (background + 128) % 256
        image = np.where(mask[..., None], colour, background) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / "im" / f"s{i:03d}.jpg", quality=95
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "gt" / f"s{i:03d}.png")
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
        raw=root / "raw-unused",  # read only when train.use_occlusion is false
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
        ("--raw", paths.raw),
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

# The fault-injection step of the worker-crash test (pipeline.train.FAIL_ONCE_ENV). Ray workers get
# their environment when the instance starts, so the variable is set once for the whole session
# and armed per test: the worker only dies while the marker file does not exist.
FAIL_STEP = 15


class LocalRay:
    """The session's Ray instance: its private temp dir and the crash injection switch."""

    def __init__(self, temp_dir: Path, marker: Path) -> None:
        self.temp_dir = temp_dir
        self.marker = marker

    def arm_worker_crash(self) -> None:
        """The next run that reaches step :data:`FAIL_STEP` loses a worker (once)."""
        self.marker.unlink(missing_ok=True)

    def disarm_worker_crash(self) -> None:
        if not self.marker.exists():
            self.marker.write_text("disarmed\n")

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

    from pipeline.train import FAIL_ONCE_ENV

    if _LOCAL_RAY is not None and ray.is_initialized():
        yield _LOCAL_RAY
        return
    marker = tmp_path_factory.mktemp("fault-injection") / "worker_crash_marker"
    marker.write_text("disarmed\n")
    # Short: Ray's unix socket paths live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    ray.init(
        address="local",
        num_cpus=2,
        _temp_dir=str(temp_dir),
        dashboard_port=free_port(),
        log_to_driver=True,
        runtime_env={"env_vars": {FAIL_ONCE_ENV: f"{FAIL_STEP}:{marker}"}},
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
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], *, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
            time.sleep(0.2)
        if not alive:
            return
        pids = alive


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first), from the ppid links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    pids.update(p for p in descendants(proc.pid))
    kill_pids(sorted(pids - {os.getpid()}))
