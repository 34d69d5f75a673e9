"""The Ray Train stage end to end on tiny data: 2 CPU workers, frozen SAM, resume, `ray job submit`.

Slow: every test starts a Ray Train worker group (about 10 s) or a Ray cluster. The in-process
tests share one private Ray instance (session fixture ``local_ray``); the subprocess tests start
their own, in a private temp dir, and leave nothing running.

Resume guarantee proven here: **bit-exact**. A run whose worker is killed after a checkpoint (Ray
restarts the worker group from it), and a job that is SIGKILLed and started again (the rerun
finds the checkpoints of the same Ray run name in ``ray.storage_path``), end with plug-in weights
``torch.equal`` to those of an uninterrupted run with the same seed, and with the same per-step
losses. This holds because every random draw is a function of (seed, step, rank), the checkpoint
carries the optimiser state exactly, each worker runs torch on one thread, and gloo's all-reduce
of two workers sums two numbers (commutative, so the bucket order cannot change the result).
It needs the same number of workers: another worker count shards the batches differently.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from _tiny_project import (
    FAIL_STEP,
    PARAMS_FILE,
    REPO,
    TINY_TRAIN_OVERRIDES,
    free_port,
    http_ok,
    local_ray_session,
    pids_with_cmdline,
    random_tiny_sam_checkpoint,
    ray_head_port_flags,
    start_logged,
    state_tensors_equal,
    stop_process_tree,
    subprocess_env,
    tiny_params,
    train_cli_args,
    train_paths,
    wait_for,
    write_hqseg_folder,
    write_tiny_base,
)

from pipeline.ray_runtime import is_loopback_address
from pipeline.train import run
from stable_sam.build import build_stable_sam
from stable_sam.checkpoint import read_plugin_checkpoint
from stable_sam.data import open_dataset
from stable_sam.losses import dense_mask_loss
from stable_sam.training import (
    AugmentedPromptDataset,
    collate_training,
    robust_prompt_sampler,
    supervised_step,
)

pytestmark = pytest.mark.slow

local_ray = pytest.fixture(scope="session")(local_ray_session)

NUM_IMAGES = 24  # batch 4: 6 steps per epoch

# Loss test: a noise-free objective, so that epoch means are comparable. Same images in every
# epoch (no LSJ, no flip, the GT box as the only prompt), so an epoch's mean loss changes only
# through the weights (and the loss-point sampling). On a random tiny SAM the block-2 attention
# alone barely moves the output; with all three token-to-image attentions plugged the plug-ins
# lower the objective by about 2 % in 8 epochs.
LOSS_OVERRIDES = (
    "train.steps=48",
    "train.lr=0.03",
    "train.checkpoint_every=12",
    "plugin.placements=[block1,block2,final]",
    "train.prompts.noisy_box=0.0",
    "train.prompts.points=0.0",
    "train.prompts.coarse_mask=0.0",
    "train.lsj=false",
    "data.hflip_probability=0.0",
)
LOSS_STEPS, STEPS_PER_EPOCH = 48, NUM_IMAGES // 4

# Resume tests: the full randomness (LSJ, flips, the mixed prompts) so the (seed, step)
# derivation is exercised; checkpoints every 6 steps, the injected crash at step 15 (resume: 12).
RESUME_STEPS, RESUME_EVERY = 36, 6
RESUME_OVERRIDES = (
    f"train.steps={RESUME_STEPS}",
    f"train.checkpoint_every={RESUME_EVERY}",
    "train.lr=0.01",
)
RESUMED = re.compile(r"resuming from the checkpoint of step (\d+)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(training folder, base folder, SAM checkpoint): HQSeg-layout images and a random tiny SAM."""
    root = tmp_path_factory.mktemp("inputs")
    occluded = write_hqseg_folder(root / "occluded", count=NUM_IMAGES, size=64)
    checkpoint = random_tiny_sam_checkpoint(root / "sam_tiny.pth")
    base = write_tiny_base(root / "base", checkpoint)
    return occluded, base, checkpoint


def _history(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _plugin_state(out: Path) -> dict[str, torch.Tensor]:
    return read_plugin_checkpoint(out / "plugin.pt").state_dict


def _dense_loss(model, params, folder: Path) -> float:
    """BCE + dice on every pixel of every training image (epoch-0 draw), no point sampling."""
    dataset = AugmentedPromptDataset(
        open_dataset(str(folder), split="train"),
        image_size=model.img_size,
        prompt_sampler=robust_prompt_sampler(params.train.prompts, mask_input_size=model.mask_input_size),
        seed=params.train.seed,
        lsj=params.train.lsj,
        hflip_probability=params.data.hflip_probability,
    )
    batch = collate_training([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        out = supervised_step(model, model, batch, seed=0, step=0, num_points=16)
        return float(dense_mask_loss(out.low_res_logits, batch.targets)["total"])


# ------------------------------------------------------------------------------------------------
# ray job submit (a head of its own, on free ports: a session Ray may be running)


def test_ray_job_submit_trains_on_a_local_head(inputs, tmp_path):
    occluded, base, _ = inputs
    ray = str(Path(sys.executable).parent / "ray")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    dashboard = f"http://127.0.0.1:{free_port()}"
    env = subprocess_env()
    head = start_logged(
        [
            ray,
            "start",
            "--head",
            *ray_head_port_flags(),
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
            "--block",  # keeps `ray start` as the parent of the head's processes: stopped by PIDs
        ],
        tmp_path / "head.log",
        env,
        tmp_path,
    )
    try:
        wait_for(
            lambda: http_ok(f"{dashboard}/api/version") or head.poll() is not None,
            timeout=120,
            what="the head",
        )
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-4000:]
        # The job's working dir holds the params file only: `pipeline` and `stable_sam` are
        # installed in the cluster's Python (here the venv, editable), as on a real cluster.
        workdir = tmp_path / "job"
        workdir.mkdir()
        shutil.copy(PARAMS_FILE, workdir / "params.yaml")
        paths = train_paths(tmp_path, occluded, base)
        overrides = [
            *TINY_TRAIN_OVERRIDES,
            "train.steps=12",
            "train.checkpoint_every=6",
            f"ray.storage_path={tmp_path / 'ray'}",
        ]
        entrypoint = [
            "python",
            "-m",
            "pipeline.train",
            *train_cli_args(paths, overrides, Path("params.yaml")),
        ]
        runtime_env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "TQDM_DISABLE": "1"}}
        submit_cmd = [
            *(ray, "job", "submit", "--address", dashboard, "--working-dir", str(workdir)),
            *("--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint),
        ]
        deadline = time.monotonic() + 300  # a busy machine starts the agent slowly
        while True:
            submit = subprocess.run(
                submit_cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400
            )
            # The dashboard answers before its job agent has registered: retry that one error.
            if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        job_id = re.search(r"raysubmit_\w+", output).group(0)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(dashboard)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
        assert client.get_job_info(job_id).entrypoint.startswith("python -m pipeline.train")
        # The job joined this head (RAY_ADDRESS), not a Ray of its own.
        assert "Connecting to existing Ray cluster" in output, output[-4000:]
        metrics = json.loads(paths.metrics.read_text())
        assert metrics["steps"] == 12 and metrics["workers"] == 2
        assert read_plugin_checkpoint(paths.out / "plugin.pt").extra["steps"] == 12
    finally:
        stop_process_tree(head, extra_fragment=str(ray_tmp), sig=signal.SIGTERM)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert pids_with_cmdline(str(ray_tmp)) == []


# ------------------------------------------------------------------------------------------------
# Two CPU workers: the loss goes down, SAM stays frozen


def test_two_cpu_workers_lower_the_loss_and_sam_stays_frozen(local_ray, inputs, tmp_path):
    occluded, base, sam_checkpoint = inputs
    params = tiny_params(*LOSS_OVERRIDES, f"ray.storage_path={tmp_path / 'ray'}")
    paths = train_paths(tmp_path, occluded, base)
    metrics = run(params, paths)

    assert metrics["steps"] == LOSS_STEPS and metrics["workers"] == 2
    # The file holds what a rerun reproduces: the wall times are in the returned metrics (MLflow) only.
    timings = {"fit_seconds", "images_per_s"}
    assert timings <= set(metrics)
    assert json.loads(paths.metrics.read_text()) == {k: v for k, v in metrics.items() if k not in timings}
    history = _history(paths.plot)
    assert [int(r["step"]) for r in history] == list(range(1, LOSS_STEPS + 1))
    losses = [r["loss"] for r in history]
    epochs = [
        sum(losses[i : i + STEPS_PER_EPOCH]) / STEPS_PER_EPOCH for i in range(0, LOSS_STEPS, STEPS_PER_EPOCH)
    ]
    # The same 24 images every epoch: the last epoch's mean is below the first one's by more than
    # the loss-point sampling noise (about 0.003 here; the drop is about 0.03).
    assert epochs[-1] < epochs[0] - 0.01, epochs
    half = len(epochs) // 2
    assert sum(epochs[half:]) / half < sum(epochs[:half]) / half, epochs

    # The plug-in checkpoint holds exactly the plug-in's tensors, and no SAM tensor.
    ckpt = read_plugin_checkpoint(paths.out / "plugin.pt")
    sam_state = torch.load(sam_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt.sam_type == "tiny" and ckpt.extra["steps"] == LOSS_STEPS and ckpt.extra["workers"] == 2
    assert ckpt.state_dict and not set(ckpt.state_dict) & set(sam_state)
    assert all(
        re.search(r"\.(cross|final)_attn_token_to_image\.(sampler|router)\.", k) for k in ckpt.state_dict
    ), sorted(ckpt.state_dict)

    # It loads strictly through the public builder, and every SAM tensor is the checkpoint's, bit for bit.
    model = build_stable_sam(
        sam_type="tiny", sam_checkpoint=sam_checkpoint, plugin_checkpoint=paths.out / "plugin.pt"
    )
    assert model.plugin_config.placements == ["block1", "block2", "final"]
    assert state_tensors_equal(model.trainable_state_dict(), ckpt.state_dict) == []
    assert sorted(model.trainable_parameter_names()) == sorted(ckpt.state_dict)
    trained_loss = _dense_loss(model, params, occluded)
    assert state_tensors_equal(model.detach_plugins().state_dict(), sam_state) == []

    # The trained plug-in lowers the training objective (paired: same images, prompts, pixels)
    # against the identity plug-in, which is exactly SAM.
    identity = build_stable_sam(
        sam_type="tiny", sam_checkpoint=sam_checkpoint, plugin_config=params.plugin, tuning=params.tuning
    )
    initial_loss = _dense_loss(identity, params, occluded)
    with identity.plugins_disabled():
        assert _dense_loss(identity, params, occluded) == pytest.approx(initial_loss, abs=1e-6)
    assert trained_loss < initial_loss - 0.005, (initial_loss, trained_loss)


# ------------------------------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def uninterrupted(local_ray, inputs, tmp_path_factory):
    """The reference: the resume configuration trained without interruption."""
    occluded, base, _ = inputs
    root = tmp_path_factory.mktemp("uninterrupted")
    paths = train_paths(root, occluded, base)
    run(tiny_params(*RESUME_OVERRIDES, f"ray.storage_path={root / 'ray'}"), paths)
    return _plugin_state(paths.out), _history(paths.plot)


def _assert_same_run(paths, reference) -> None:
    state, history = reference
    assert state_tensors_equal(_plugin_state(paths.out), state) == []  # bit for bit
    resumed_history = _history(paths.plot)
    assert [r["step"] for r in resumed_history] == [r["step"] for r in history]
    for key in ("loss", "bce", "dice", "alpha1"):
        assert [r[key] for r in resumed_history] == [r[key] for r in history], key


def _latest_checkpoint_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray registered for the (only) run in ``storage``."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return None  # being written
        if latest:
            return int(latest["metrics"]["step"])
    return None


def _read_until(capfd, pattern: re.Pattern, timeout: float) -> str:
    """Captured output until ``pattern`` appears: Ray forwards worker logs asynchronously."""
    seen = ""
    deadline = time.monotonic() + timeout
    while True:
        out, err = capfd.readouterr()
        seen += out + err
        if pattern.search(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_worker_crash_after_a_checkpoint_resumes_to_the_same_weights(
    local_ray, inputs, uninterrupted, tmp_path, capfd
):
    occluded, base, _ = inputs
    paths = train_paths(tmp_path, occluded, base)
    params = tiny_params(*RESUME_OVERRIDES, f"ray.storage_path={tmp_path / 'ray'}")
    assert params.ray.max_failures >= 1
    metrics = run(params, paths, step_hook=local_ray.crash_hook())
    crashed = local_ray.worker_crashed
    assert crashed, f"no worker died at step {FAIL_STEP}: the fault injection did not reach the workers"
    assert metrics["steps"] == RESUME_STEPS
    resumed = [int(n) for n in RESUMED.findall(_read_until(capfd, RESUMED, timeout=20))]
    # The crash comes 3 steps after the step-12 checkpoint; Ray registers a checkpoint when its
    # controller next polls the workers (every 0.1 s), so the restart resumes from 12, or from 6
    # if the worker died before that poll.
    assert len(resumed) == 1 and resumed[0] in (FAIL_STEP // RESUME_EVERY * RESUME_EVERY, RESUME_EVERY), (
        resumed
    )
    _assert_same_run(paths, uninterrupted)


def test_killed_job_restarts_from_its_last_checkpoint(inputs, uninterrupted, tmp_path):
    occluded, base, _ = inputs
    storage = tmp_path / "ray"
    paths = train_paths(tmp_path, occluded, base)
    overrides = [*TINY_TRAIN_OVERRIDES, *RESUME_OVERRIDES, f"ray.storage_path={storage}"]
    cmd = [sys.executable, "-m", "pipeline.train", *train_cli_args(paths, overrides)]
    # Both runs execute a snapshot of the code (`python -m` imports from the cwd first): the Ray
    # run name fingerprints the package sources, so an edit to the working tree between the two
    # runs would (rightly) start afresh instead of resuming.
    code = tmp_path / "code"
    for package in ("pipeline", "stable_sam"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    # A private Ray temp dir (short: socket paths) so that the job's Ray is found and stopped.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
    env = subprocess_env(RAY_TMPDIR=str(ray_tmp))
    try:
        first = start_logged(cmd, tmp_path / "first.log", env, code)
        try:
            wait_for(
                lambda: _latest_checkpoint_step(storage) is not None or first.poll() is not None,
                timeout=240,
                what="the first Ray checkpoint",
            )
        finally:
            stop_process_tree(first, extra_fragment=str(ray_tmp))  # SIGKILL, as a lost node would
        log = (tmp_path / "first.log").read_text()
        assert first.returncode == -signal.SIGKILL, log[-4000:]
        assert not (paths.out / "plugin.pt").exists(), "the job finished before it was killed"
        killed_at = _latest_checkpoint_step(storage)
        assert killed_at is not None and 0 < killed_at < RESUME_STEPS

        second = start_logged(cmd, tmp_path / "second.log", env, code)
        try:
            second.wait(timeout=300)
        finally:
            stop_process_tree(second, extra_fragment=str(ray_tmp))
        log = (tmp_path / "second.log").read_text()
        assert second.returncode == 0, log[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [int(n) for n in RESUMED.findall(log)] == [killed_at], log[-4000:]
    _assert_same_run(paths, uninterrupted)


def _listening_sockets(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of ``root`` and its descendants."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_the_stages_own_ray_listens_on_loopback_only(inputs, tmp_path):
    """The local Ray the stage starts (no cluster named) accepts no connection from other machines.

    The stage runs as `dvc repro` runs it, without the tests' Ray settings: it must put its Ray on
    loopback (and leave token auth off) by itself. Every listening socket of the stage's process
    tree is sampled while it trains.
    """
    occluded, base, _ = inputs
    paths = train_paths(tmp_path, occluded, base)
    overrides = [*TINY_TRAIN_OVERRIDES, "train.steps=24", f"ray.storage_path={tmp_path / 'ray'}"]
    cmd = [sys.executable, "-m", "pipeline.train", *train_cli_args(paths, overrides)]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    env = subprocess_env(RAY_TMPDIR=str(ray_tmp))
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE"):
        env.pop(key)
    stage = start_logged(cmd, tmp_path / "stage.log", env, REPO)
    sockets: set[tuple[str, str, int]] = set()
    try:
        root = psutil.Process(stage.pid)
        while stage.poll() is None:
            sockets.update(_listening_sockets(root))
            time.sleep(0.5)
    finally:
        stop_process_tree(stage, extra_fragment=str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / "stage.log").read_text()
    assert stage.returncode == 0, log[-4000:]
    assert json.loads(paths.metrics.read_text())["steps"] == 24
    ray_sockets = {s for s in sockets if s[0] in ("gcs_server", "raylet") or s[0].startswith("ray::")}
    assert ray_sockets, f"no Ray server socket was seen: {sorted(sockets)}"
    exposed = sorted(s for s in sockets if not is_loopback_address(s[1]))
    assert not exposed, f"listening on non-loopback addresses: {exposed}"
