"""`dvc repro` of the whole pipeline in a fresh copy of the repository, at tiny size.

Slow. The copy holds what a clone would (``git ls-files``, plus the files not yet committed that
git does not ignore), with a params.yaml whose sizes are tiny; every stage that dvc.yaml has when
the test runs is reproduced, so the test grows with the pipeline. Checked: the outs exist, a second
``dvc repro`` runs nothing, a trained variant queued as a DVC experiment reruns exactly ``train``
and the stages downstream of it (in a temporary copy, the workspace untouched), ``dvc exp run
train -S train.lr=...`` in the workspace reruns ``train`` alone (its downstream is the variant's
check: not run twice, to keep CI's time), ``dvc metrics show`` lists the training metrics, ``dvc plots show`` writes the
HTML with the training curve (offline), and MLflow got one run per stage execution. Also: no
stage touches README.md or leaves git dirty (a forced rerun of the decoder-only stages rewrites
every tracked output byte for byte: no timings in them), and the DVC metrics stay few enough for
``dvc exp show``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny_project import (
    copy_checkout,
    kill_pids,
    pids_with_cmdline,
    random_tiny_sam_checkpoint,
    subprocess_env,
)

from stable_sam.checkpoint import file_sha256

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

# Every section at tiny size. Keys that params.yaml does not have (yet) are skipped, except
# REQUIRED ones: the test follows the pipeline as it grows, and fails loudly if a core key moves.
TINY_PARAMS: dict[str, Any] = {
    "sam.type": "tiny",
    "sam.checkpoint": None,
    "fetch.source": "embedded",
    "embedded.num_train": 24,
    "embedded.num_val": 8,
    "embedded.image_size": 64,
    "embedded.max_objects": 3,
    "occlusion.num_examples": 2,
    "train.steps": 8,
    "train.batch_size": 4,
    "train.num_points_loss": 256,
    "train.checkpoint_every": 4,
    "train.log_every": 4,
    "ray.num_workers": 2,
    "ray.cpus_per_worker": 1.0,
    "ray.storage_path": None,
    "tracking.enabled": True,
    "tracking.uri": None,  # the default store: sqlite:///<repo root>/mlflow.db
    "eval.draws": 2,
    "eval.num_figures": 1,
    "eval.coco_max_images": 4,
    "ablate.point_counts": [1, 3],
    "ablate.alpha1_values": [0.0, 1.0],
    "ablate.alpha1_prompts": ["point_1", "noisy_box"],
    "ablate.seeds": [0],
    "automatic.points_per_side": 4,
    "automatic.max_images": 4,
    "interactive.max_clicks": 5,
    "interactive.max_images": 4,
}
REQUIRED = {k for k in TINY_PARAMS if k.split(".")[0] in ("sam", "embedded", "train", "ray", "tracking")}
RAN = re.compile(r"Running stage '([^']+)'")


def _set(tree: dict, dotted: str, value: Any) -> bool:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        if not isinstance(node.get(key), dict):
            return False
        node = node[key]
    if leaf not in node:
        return False
    node[leaf] = value
    return True


class Repo:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.timings: dict[str, float] = {}

    def run(
        self, *args: str, label: str | None = None, timeout: float = 900, stdout_only: bool = False
    ) -> str:
        started = time.perf_counter()
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.timings[label or " ".join(args[:3])] = time.perf_counter() - started
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
        return result.stdout if stdout_only else output

    def dvc(self, *args: str, **kwargs) -> str:
        return self.run(str(BIN / "dvc"), *args, **kwargs)


def _downstream(repo: Repo, stage: str) -> set[str]:
    """``stage`` and every stage that depends on it, from ``dvc dag --dot``."""
    dot = repo.dvc("dag", "--dot", label="dvc dag")
    edges = re.findall(r'"([^"]+)"\s*->\s*"([^"]+)"', dot)
    found, todo = {stage}, [stage]
    while todo:
        current = todo.pop()
        for a, b in edges:
            if a == current and b not in found:
                found.add(b)
                todo.append(b)
    return found


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    copy_checkout(root)
    params_file = root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    missing = sorted(k for k, v in TINY_PARAMS.items() if not _set(params, k, v) and k in REQUIRED)
    assert not missing, f"params.yaml lacks {missing}"
    # The released base, at tiny size: a committed checkpoint whose sha256 params pin.
    released = random_tiny_sam_checkpoint(root / "base" / "release" / "sam_tiny.pth")
    assert _set(params, "sam.checkpoint", "base/release/sam_tiny.pth")
    assert _set(params, "sam.sha256", file_sha256(released))
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    # A private Ray temp dir (short: socket paths): the train stage starts its own Ray there,
    # never joins another instance on the machine, and is found by its path afterwards.
    ray_tmp = Path(tempfile.mkdtemp(prefix="re", dir="/tmp"))
    # One torch thread per stage process: the tiny models gain nothing from two, and on a
    # machine whose cores are busy with other work, two spinning OpenMP threads per process slow
    # training down by more than 10x (measured here: 0.3 instead of 30 images/s).
    env = subprocess_env(RAY_TMPDIR=str(ray_tmp), OMP_NUM_THREADS="1")
    repo = Repo(root, env)
    repo.run("git", "init", "-q", "-b", "main")
    # A local identity: `git commit` and the commits of `dvc exp run` need one.
    repo.run("git", "config", "user.name", "Stable-SAM test")
    repo.run("git", "config", "user.email", "test@example.com")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "fresh clone")
    try:
        yield repo
    finally:
        kill_pids(pids_with_cmdline(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        print("timings (s):", {k: round(v, 1) for k, v in repo.timings.items()})


def test_dvc_repro_end_to_end_then_nothing_then_an_experiment(repo):
    stages = yaml.safe_load((repo.root / "dvc.yaml").read_text())["stages"]
    assert {"fetch", "synthesize", "base", "train"} <= set(stages)

    readme = (repo.root / "README.md").read_bytes()
    output = repo.dvc("repro", label="dvc repro (first)")
    ran = first_ran = set(RAN.findall(output))
    expected = set()
    for name, body in stages.items():
        keys = body.get("foreach")
        expected |= {f"{name}@{k}" for k in keys} if isinstance(keys, list) else {name}
    assert ran == expected, output[-4000:]
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    for name, body in lock.items():
        for out in body.get("outs", []):
            assert (repo.root / out["path"]).exists(), f"{name}: {out['path']} missing"
    assert (repo.root / "models/stable_sam/plugin.pt").is_file()
    train_metrics = json.loads((repo.root / "metrics/train.json").read_text())
    assert train_metrics["steps"] == 8 and train_metrics["workers"] == 2

    output = repo.dvc("repro", label="dvc repro (second)")
    assert RAN.findall(output) == [], output[-4000:]
    assert "Data and pipelines are up to date" in output or "didn't change, skipping" in output, output
    assert "modified" not in repo.dvc("status", "dvc.yaml", label="dvc status")
    assert (repo.root / "README.md").read_bytes() == readme  # no stage writes it
    forced_ran = _decoder_stages_rerun_to_the_same_bytes(repo, stages)
    _dvc_metrics_are_few(repo, stages)
    downstream = _downstream(repo, "train")
    variant_ran = _a_variant_runs_as_a_queued_experiment(repo)
    assert set(variant_ran) == downstream, (variant_ran, downstream)  # exactly train and what follows

    before = (repo.root / "metrics/train.json").read_text()
    output = repo.dvc("exp", "run", "train", "-S", "train.lr=0.002", label="dvc exp run")
    exp_ran = RAN.findall(output)
    assert exp_ran == ["train"], output[-4000:]
    assert yaml.safe_load((repo.root / "params.yaml").read_text())["train"]["lr"] == 0.002
    assert (repo.root / "metrics/train.json").read_text() != before
    assert "train.lr" in repo.dvc("exp", "show", "--no-pager", "--csv", label="dvc exp show")

    shown = json.loads(repo.dvc("metrics", "show", "--json", label="dvc metrics show", stdout_only=True))
    (workspace,) = shown.values()  # {"": {"data": {file: {"data": {...}}}}} (the workspace)
    train_shown = workspace["data"]["metrics/train.json"]["data"]
    assert train_shown["final_loss"] == pytest.approx(
        json.loads((repo.root / "metrics/train.json").read_text())["final_loss"]
    )
    assert "final_loss" in repo.dvc("metrics", "show", label="dvc metrics show (table)")

    repo.dvc("plots", "show", label="dvc plots show")
    html = (repo.root / "dvc_plots" / "index.html").read_text()
    assert "plots/train.csv" in html and '"loss"' in html
    assert "cdn.jsdelivr" not in html  # renders offline

    # MLflow (default store in the repo): one run per stage execution, the train runs registered.
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo.root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("stable-sam")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`pipeline.role` = 'stage'")
    # The queued variant's stages log to the same store (DVC_ROOT), not into their temporary copy.
    expected_runs = [*first_ran, *forced_ran, *variant_ran, *exp_ran]
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == sorted(expected_runs)
    # Named by what distinguishes them: the exp run's stages name the changed param.
    assert any("train.lr=0.002" in r.info.run_name for r in runs if r.data.tags.get("dvc.exp_name"))
    assert all(r.info.status == "FINISHED" for r in runs)
    train_runs = [r for r in runs if r.data.tags["pipeline.stage"] == "train"]
    assert len(train_runs) == 3 and {r.data.params["train.lr"] for r in train_runs} == {"0.001", "0.002"}
    assert len(client.search_model_versions("name='stable-sam-plugin'")) == 3
    assert not pids_with_cmdline(repo.env["RAY_TMPDIR"])  # every stage's Ray went away with it


def _decoder_stages_rerun_to_the_same_bytes(repo: Repo, stages: dict) -> list[str]:
    """Commit the repro, force the stages after the embedding again: git stays clean."""
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "dvc repro")
    targets = [
        f"{name}@{item}" if item is not None else name
        for name in ("evaluate", "ablate", "report")
        for item in stages[name].get("foreach", [None])
    ]
    output = repo.dvc("repro", "--force", "--single-item", *targets, label="dvc repro -f (decoder stages)")
    assert set(RAN.findall(output)) == set(targets), output[-4000:]
    status = repo.run("git", "status", "--porcelain", stdout_only=True)
    assert status == "", f"a rerun on the same inputs changed tracked files:\n{status}"
    return targets


def _leaves(tree: Any, key: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, k)]
    return [(key, tree)]


def _dvc_metrics_are_few(repo: Repo, stages: dict) -> None:
    """What `dvc exp show` lists of the default pipeline: a comparison's numbers, no timings."""
    declared = set()
    for body in stages.values():
        items = body.get("foreach", [None])
        for entry in body.get("do", body).get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            declared |= {path.replace("${item}", str(item)) for item in items}
    assert {"metrics/evaluate.json", "metrics/effect_checks.json"} <= declared
    shown = json.loads(repo.dvc("metrics", "show", "--json", label="dvc metrics show", stdout_only=True))
    (workspace,) = shown.values()
    files = {name: f.get("data", {}) for name, f in workspace["data"].items() if name in declared}
    assert set(files) == declared
    numbers = {
        (name, key): v
        for name, tree in files.items()
        for key, v in _leaves(tree)
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert len(numbers) <= 80, len(numbers)
    timings = [k for k in numbers if "seconds" in k[1] and k[0] != "metrics/train.json"]  # train: not ours
    assert not timings, timings


def _a_variant_runs_as_a_queued_experiment(repo: Repo) -> list[str]:
    """`make variants` for one variant: queued, run in a temporary copy, shown by `dvc exp show`."""
    out = repo.run(str(BIN / "python"), "-m", "pipeline.variants", "no_noisy_prompts", label="queue variant")
    assert "-S train.prompts.noisy_box=0.0" in out
    output = repo.dvc("exp", "run", "--run-all", "--jobs", "1", label="dvc exp run --run-all")
    ran = RAN.findall(output)
    assert "train" in ran and not set(ran) & {"fetch", "synthesize", "base", "embed"}, output[-4000:]
    assert repo.run("git", "status", "--porcelain", stdout_only=True) == ""  # the workspace as it was
    shown = json.loads(repo.dvc("exp", "show", "--json", label="dvc exp show --json", stdout_only=True))
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    (variant,) = [e for e in experiments if e.get("name") == "no_noisy_prompts"]
    (revision,) = variant["revs"]
    data = revision["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["prompts"]["noisy_box"] == 0.0
    assert "mean" in data["metrics"]["metrics/evaluate.json"]["data"]
    return ran


def test_the_base_pipeline_pretrains_evaluates_and_releases_a_base(repo):
    """`dvc repro base/dvc.yaml` (data -> pretrain -> tighten; a committed v1 -> extend -> evaluate) then
    `make release-base`'s module, at tiny size: the released file (v2, its lineage v1's + one round)
    is what the default pipeline's base stage accepts."""
    params_file = repo.root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    v1 = random_tiny_sam_checkpoint(repo.root / "base" / "release" / "v1" / "sam_tiny.pth")
    lineage = repo.root / "base" / "release" / "v1" / "lineage.json"
    assert lineage.is_file()  # the committed v1's history, kept as it is
    for key, value in {
        "base.num_images": 8, "base.steps": 4, "base.batch_size": 2, "base.warmup_steps": 1,
        "base.checkpoint_every": 2, "base.log_every": 2, "tighten.steps": 2, "tighten.warmup_steps": 1,
        "extend.steps": 2, "extend.warmup_steps": 1, "extend.init_sha256": file_sha256(v1),
        "eval.prompts": ["gt_box", "noisy_box", "point_1"],
    }.items():  # fmt: skip
        assert _set(params, key, value), key
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    output = repo.dvc("repro", "base/dvc.yaml", label="dvc repro base")
    assert set(RAN.findall(output)) == {
        "base/dvc.yaml:data",
        "base/dvc.yaml:pretrain",
        "base/dvc.yaml:tighten",
        "base/dvc.yaml:extend",
        "base/dvc.yaml:evaluate",
    }
    evaluation = json.loads((repo.root / "metrics/base_eval.json").read_text())
    assert set(evaluation) >= {"gt_box", "noisy_box", "point_1", "checkpoint_sha256"}
    assert "per_family_miou" not in evaluation  # per family: the table (DVC metrics stay few)
    assert "family" in (repo.root / "reports/base_eval.csv").read_text()
    assert RAN.findall(repo.dvc("repro", "base/dvc.yaml", label="dvc repro base (second)")) == []

    out = repo.run(str(BIN / "python"), "-m", "pipeline.release_base", "--out", "release", label="release")
    assert "released v2: release/sam_tiny.pth" in out
    sha = re.search(r"sha256: ([0-9a-f]{64})", out).group(1)
    assert file_sha256(repo.root / "release" / "sam_tiny.pth") == sha
    card = (repo.root / "release" / "MODEL_CARD.md").read_text()
    assert sha in card and "**extend** 2 steps from v1 as committed" in card
    rounds = json.loads((repo.root / "release" / "lineage.json").read_text())
    assert rounds[:-1] == json.loads(lineage.read_text()) and rounds[-1]["release"] == "v2"
    repo.run(
        str(BIN / "python"), "-m", "pipeline.base", "--raw", "data/raw", "--out", "models/released",
        "--set", "sam.checkpoint=release/sam_tiny.pth", "--set", f"sam.sha256={sha}",
        "--set", "tracking.enabled=false", label="base stage",
    )  # fmt: skip
    pointer = json.loads((repo.root / "models/released/sam.json").read_text())
    assert pointer["origin"] == "released" and pointer["sha256"] == sha
