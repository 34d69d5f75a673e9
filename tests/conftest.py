"""Shared test set-up: offline, quiet, deterministic.

The environment variables are set before ray, mlflow or dvc can be imported by any test module.
"""

from __future__ import annotations

import os
from pathlib import Path

# Offline, quiet, Ray Train's result polling fast enough for per-checkpoint reports. Every Ray a
# test starts (ray.init, `ray start --head`) is on loopback only (Ray's single-machine mode), so
# token auth stays off for it. Also given to every subprocess the slow tests start.
from pipeline import OFFLINE_ENVIRONMENT
from pipeline.ray_runtime import LOCAL_AUTH_ENVIRONMENT, LOOPBACK_ENVIRONMENT

TEST_ENVIRONMENT = {
    **OFFLINE_ENVIRONMENT,
    **LOCAL_AUTH_ENVIRONMENT,
    **LOOPBACK_ENVIRONMENT,
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TQDM_DISABLE": "1",
}
for _key, _value in TEST_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker gets one thread, and so does every
# process a test starts: two spinning OpenMP threads per process on two shared cores slow the
# tiny models down by more than 10x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# The modules of the two longest tests, run first: with `--dist load --maxschedchunk 1` (as
# `make test` runs two xdist workers) each worker holds two tests at a time, so the e2e module's
# two tests go to one worker and the rehearsal starts at once on the other; the other slow tests
# follow, then the fast ones. Only the order changes (each module's slow tests stay together, so
# their module fixtures are mostly built once per worker); a renamed module just runs later.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_rehearsal.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first (above), then the other slow tests, then the fast ones."""

    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        if module in LONGEST_FIRST:
            return LONGEST_FIRST.index(module)
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: the collection order within each rank


PARAMS_FILE = Path(__file__).resolve().parent.parent / "params.yaml"  # the committed params


@pytest.fixture(autouse=True)
def _no_global_rng_dependence():
    """Poison the global RNGs so a test that silently relies on them is not reproducible by luck."""
    torch.manual_seed(12345)
    yield


def random_stable_sam(sam_type: str = "tiny", *, seed: int = 0, plugin_config=None, tuning=None):
    """A Stable-SAM on a SAM with random (non-trivial) weights, and an untouched copy of that SAM.

    Returns (stable_sam, vanilla_sam): the vanilla copy is what segment-anything alone would run.
    """
    import copy

    from stable_sam.build import build_sam
    from stable_sam.config import PluginConfig
    from stable_sam.modeling import StableSam

    # Module initialisers draw from the global RNG: pin it so equal seeds give equal weights.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam, _ = build_sam(sam_type)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    vanilla = copy.deepcopy(sam)
    model = StableSam(
        sam=sam, sam_type=sam_type, plugin_config=plugin_config or PluginConfig(), tuning=tuning
    )
    return model, vanilla


def perturb_plugins(model, *, seed: int = 1, scale: float = 0.5) -> None:
    """Move every trainable parameter away from its identity initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.fixture
def tiny_model():
    return random_stable_sam("tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny decoders: one thread is fastest, and several oversubscribe a shared CPU badly.

    Modules that evaluate many tiny prompts use it: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def repo_params(**sections):
    """The committed params.yaml, with fields of its sections replaced: ``repo_params(eval={"draws": 3})``.

    The pipeline's sections have no defaults of their own (params.yaml is their one home), so a
    test starts from the file. The changes are not checked, as if the dataclasses were built by
    hand (a test of a stage's own checks passes values the params loader would refuse).
    """
    import dataclasses

    from pipeline.params import load_params

    params = load_params(PARAMS_FILE)
    for name, changes in sections.items():
        setattr(params, name, dataclasses.replace(getattr(params, name), **changes))
    return params


class RecordingTracker:
    """Stands in for ``pipeline.tracking.Tracker``: records every call after binding it to the real
    method's signature (a call the real tracker would reject raises TypeError here too)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        import inspect

        from pipeline.tracking import Tracker

        signature = inspect.signature(getattr(Tracker, name))  # follows the decorator to the method

        def call(*args, **kwargs):
            signature.bind(self, *args, **kwargs)
            self.calls.append((name, args, kwargs))

        return call
