"""Unusable resume states: named, moved aside, and the run starts over (no Ray cluster here)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.run_state import ResumeStateError, resume_or_start, state_dir

REQUIRED = ("model", "optimizer", "step")


def _build() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _restore(objects, state) -> None:
    objects[0].load_state_dict(state["model"])
    objects[1].load_state_dict(state["optimizer"])


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int = 7) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}


@pytest.fixture
def resume_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    path = state_dir("train_base", "0123456789abcdef") / "state.pt"
    path.parent.mkdir(parents=True)
    return path


def test_a_good_state_resumes(resume_file):
    model, optimizer = _build()
    with torch.no_grad():
        model.weight.add_(1.0)
    torch.save(_state(model, optimizer), resume_file)
    (restored, _), state = resume_or_start(resume_file, _build, _restore, required=REQUIRED)
    assert state["step"] == 7 and torch.equal(restored.weight, model.weight)


@pytest.mark.parametrize("damage", ["truncated", "not_torch", "missing_key", "other_shapes"])
def test_an_unusable_state_is_moved_aside_and_the_run_starts_over(resume_file, damage, caplog):
    model, optimizer = _build()
    if damage == "other_shapes":  # e.g. written by other code with the same fingerprint
        other = torch.nn.Linear(5, 2)
        torch.save(_state(other, torch.optim.AdamW(other.parameters())), resume_file)
    elif damage == "missing_key":
        torch.save({"model": model.state_dict()}, resume_file)
    else:
        torch.save(_state(model, optimizer), resume_file)
        data = resume_file.read_bytes()
        resume_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="pipeline.run_state"):
        (fresh, _), state = resume_or_start(resume_file, _build, _restore, required=REQUIRED)
    assert state is None and not resume_file.exists()
    (aside,) = resume_file.parent.glob("state.pt.corrupt-*")
    assert str(resume_file) in caplog.text and f"moved it to {aside} and starting over" in caplog.text
    # The objects are the fresh ones, even where a failed restore had changed some of them.
    assert torch.equal(fresh.weight, _build()[0].weight)


def test_train_base_starts_over_from_a_truncated_state(tmp_path, monkeypatch, caplog):
    from conftest import repo_params

    from pipeline import train_base
    from pipeline.sources import generate_split

    data = tmp_path / "pretrain"
    generate_split(data, num_images=4, image_size=64, split="pretrain")
    resume_dir = tmp_path / ".stage_state" / "train_base" / "0123456789abcdef"
    monkeypatch.setattr(train_base, "state_dir", lambda stage, fingerprint: resume_dir)
    resume_dir.mkdir(parents=True)
    (resume_dir / "state.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    params = repo_params(
        sam={"type": "tiny"},
        base={"steps": 2, "batch_size": 2, "warmup_steps": 1, "correction_clicks": 0, "point_counts": [1]},
    )
    paths = train_base.TrainBasePaths(
        data=data, out=tmp_path / "base", metrics=tmp_path / "m.json", plot=tmp_path / "p.csv"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.run_state"):
        metrics = train_base.run(params, paths)
    assert metrics["resumed_from_step"] == 0 and (tmp_path / "base" / "sam_tiny.pth").is_file()
    (aside,) = resume_dir.glob("state.pt.corrupt-*")
    assert f"cannot read the resume state {resume_dir / 'state.pt'}" in caplog.text
    assert f"moved it to {aside} and starting over" in caplog.text


# ------------------------------------------------------------------------------------------------
# The train stage's Ray checkpoints


class _Plugin(torch.nn.Module):
    """Stands in for StableSam: the same trainable-state API."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.offset = torch.nn.Linear(width, 2)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_trainable_state_dict(self, state, *, source: str) -> None:
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{source}: {err}") from err


def _ray_checkpoint(directory: Path, model: _Plugin, *, truncate: bool = False) -> Path:
    directory.mkdir(parents=True)
    optimizer = torch.optim.Adam(model.parameters())
    state = {"trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(), "step": 12}
    torch.save({**state, "history": [{"step": 12, "loss": 0.5}]}, directory / "state.pt")
    if truncate:
        data = (directory / "state.pt").read_bytes()
        (directory / "state.pt").write_bytes(data[:200])
    return directory


def test_worker_restore_names_the_checkpoint_and_the_run_folder_to_remove(tmp_path):
    from pipeline.train import restore_training_state

    run_dir = tmp_path / "ray_results" / "stable-sam-train-0123456789abcdef"
    good = _ray_checkpoint(run_dir / "checkpoint_a", _Plugin())
    model = _Plugin()
    step, history = restore_training_state(
        good, model, torch.optim.Adam(model.parameters()), run_dir=str(run_dir)
    )
    assert step == 12 and history[0]["loss"] == 0.5

    for name, checkpoint_model, truncate in [
        ("truncated", _Plugin(), True),
        ("other", _Plugin(width=6), False),
    ]:
        checkpoint = _ray_checkpoint(run_dir / f"checkpoint_{name}", checkpoint_model, truncate=truncate)
        with pytest.raises(ResumeStateError) as err:
            restore_training_state(
                checkpoint, model, torch.optim.Adam(model.parameters()), run_dir=str(run_dir)
            )
        message = str(err.value)
        assert f"cannot resume from the Ray checkpoint {checkpoint}" in message
        assert f"remove (or move aside) the Ray run folder {run_dir} to train from the start" in message


def test_driver_moves_a_ray_run_with_an_unreadable_latest_checkpoint_aside(tmp_path, monkeypatch, caplog):
    import ray.train

    from pipeline.train import set_aside_unusable_ray_run

    run_dir = tmp_path / "stable-sam-train-0123456789abcdef"
    # A folder without Ray's checkpoint snapshot (killed before its first checkpoint): left to Ray.
    run_dir.mkdir()
    assert set_aside_unusable_ray_run(run_dir) is None and run_dir.is_dir()
    assert set_aside_unusable_ray_run(tmp_path / "missing") is None

    # Ray's latest checkpoint is readable: the run resumes.
    latest = _ray_checkpoint(run_dir / "checkpoint_latest", _Plugin())
    result = SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(str(latest)))
    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(lambda path: result))
    assert set_aside_unusable_ray_run(run_dir) is None and run_dir.is_dir()

    # Truncated by a kill: moved aside, Ray starts a new run under the same name.
    (latest / "state.pt").write_bytes((latest / "state.pt").read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        aside = set_aside_unusable_ray_run(run_dir)
    assert aside is not None and aside.name.startswith(f"{run_dir.name}.corrupt-") and aside.is_dir()
    assert not run_dir.exists()
    assert (
        f"Ray run {run_dir} cannot be resumed: cannot read the resume state {latest / 'state.pt'}"
        in caplog.text
    )
    assert f"moved it to {aside} and training from the start" in caplog.text

    # An unreadable snapshot (Ray's own error types): moved aside too.
    run_dir.mkdir()

    def broken(path):
        raise ValueError("Unterminated string starting at: line 1 column 48")

    monkeypatch.setattr(ray.train.Result, "from_path", staticmethod(broken))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        assert set_aside_unusable_ray_run(run_dir) is not None
    assert "its checkpoint snapshot cannot be read (ValueError: Unterminated string" in caplog.text
