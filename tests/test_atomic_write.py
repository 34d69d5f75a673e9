"""Atomic writes: the final file has the mode a plain open() gives it, and failures leave no trace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from pipeline.occlusion_set import atomic_bytes as synthesize_write
from pipeline.sam_source import SamSource, write_json_atomic, write_sam_source
from pipeline.sources.embedded import _atomic_write_bytes as embedded_write
from stable_sam.atomic_write import AtomicFileSet, atomic_open, write_bytes_atomic, write_text_atomic
from stable_sam.checkpoint import atomic_torch_save, save_plugin_checkpoint


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_atomic_writer_gives_the_umask_mode(tmp_path, umask, tiny_model):
    model, _ = tiny_model
    atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "a" / "state.pt")
    written = [tmp_path / "a" / "state.pt"]
    save_plugin_checkpoint(model, tmp_path / "models" / "plugin.pt")
    written.append(tmp_path / "models" / "plugin.pt")
    checkpoint = tmp_path / "base" / "sam.pth"
    write_bytes_atomic(checkpoint, b"weights")
    write_sam_source(tmp_path / "base", SamSource("tiny", str(checkpoint), "0" * 64, "trained"))
    written += [checkpoint, tmp_path / "base" / "sam.json"]
    write_json_atomic(tmp_path / "metrics" / "m.json", {"a": 1})
    write_text_atomic(tmp_path / "reports" / "t.md", "| a |\n")
    write_text_atomic(tmp_path / "reports" / "u.md", "α\n")
    embedded_write(tmp_path / "im" / "x.jpg", b"jpeg")
    synthesize_write(tmp_path / "im" / "y.jpg", b"jpeg")
    with AtomicFileSet() as outputs:
        outputs.write_text(tmp_path / "set" / "a.json", "{}")
        outputs.write_bytes(tmp_path / "set" / "b.png", b"png")
    written += [tmp_path / p for p in ("metrics/m.json", "reports/t.md", "reports/u.md", "im/x.jpg")]
    written += [tmp_path / p for p in ("im/y.jpg", "set/a.json", "set/b.png")]
    expected = 0o666 & ~umask
    assert {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written} == {
        str(p.relative_to(tmp_path)): oct(expected) for p in written
    }
    if umask == 0o022:
        assert _mode(tmp_path / "models" / "plugin.pt") == _mode(tmp_path / "base" / "sam.json") == 0o644
    if umask == 0o077:
        assert _mode(tmp_path / "models" / "plugin.pt") == _mode(tmp_path / "base" / "sam.json") == 0o600
    # No temporary left beside any of them.
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_file_set_replaces_all_or_nothing(tmp_path):
    a, b = tmp_path / "metrics" / "a.json", tmp_path / "reports" / "b.md"
    for path in (a, b):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old")
    with pytest.raises(RuntimeError), AtomicFileSet() as outputs:
        outputs.write_text(a, "new")
        assert a.read_text() == "old"  # staged, not yet in place
        raise RuntimeError("failure before the second file")
    assert a.read_text() == b.read_text() == "old"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "metrics/a.json",
        "reports/b.md",
    ]
    with AtomicFileSet() as outputs:
        outputs.write_text(a, "new")
        outputs.write_text(b, "new")
    assert a.read_text() == b.read_text() == "new"
    with pytest.raises(ValueError, match="written twice"), AtomicFileSet() as outputs:
        outputs.write_text(a, "1")
        outputs.write_text(a, "2")
    assert a.read_text() == "new"
