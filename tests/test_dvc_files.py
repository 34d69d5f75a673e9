"""The committed DVC files agree with each other: a lock entry for a stage that dvc.yaml no longer
has is never rewritten by ``dvc repro`` (DVC updates only the stages it runs), so it lingers and
names outputs that no stage makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def stage_names(dvc_yaml: Path) -> set[str]:
    """The names DVC gives the stages of ``dvc_yaml`` in its lock (``name@key`` for foreach)."""
    names = set()
    for name, body in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        keys = body.get("foreach")
        names |= {f"{name}@{k}" for k in keys} if isinstance(keys, list) else {name}
    return names


@pytest.mark.parametrize("folder", [".", "base"])
def test_each_committed_lock_describes_exactly_the_stages_of_its_dvc_yaml(folder):
    lock = yaml.safe_load((ROOT / folder / "dvc.lock").read_text())["stages"]
    assert set(lock) == stage_names(ROOT / folder / "dvc.yaml")
