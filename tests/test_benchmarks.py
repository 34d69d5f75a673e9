"""The benchmarks run and print their figures (a smoke test: timings are never asserted)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks import (
    cpu_allocator,
    decoder_overhead,
    encoder_fast_path,
    onnx_decoder,
    sweep_cache,
    train_step,
)


@pytest.fixture
def no_pipeline_artefacts(tmp_path, monkeypatch):
    """A working directory with the project's params.yaml but no models/ or data/: the random stand-ins."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the generated validation split lands here


@pytest.mark.slow
def test_decoder_overhead_prints_ratios(no_pipeline_artefacts, capsys):
    ratios = decoder_overhead.main(["--iters", "2", "--threads", "0"])
    out = capsys.readouterr().out
    assert set(ratios) == {"small_p1", "small_p5", "vit_b_p1", "vit_b_p5"}
    assert all(r > 0 for r in ratios.values())
    assert "params.yaml's plug-ins" in out and "ratio on/off" in out


def test_sweep_cache_runs_the_encoder_once_per_image_and_gives_identical_records(
    no_pipeline_artefacts, capsys
):
    result = sweep_cache.main(["--images", "2", "--draws", "1", "--threads", "0"])
    out = capsys.readouterr().out
    assert "(40 encoder passes)" in out and "(2 encoder passes)" in out  # 20 settings x 2 images, then 2
    assert "identical records: True" in out
    assert result["uncached_s"] > 0 and result["cached_s"] > 0


def test_onnx_decoder_prints_differences_and_ratios(no_pipeline_artefacts, capsys):
    results = onnx_decoder.main(["--iters", "2", "--models", "small"])
    out = capsys.readouterr().out
    assert set(results) == {"small"} and results["small"]["ratio"] > 0
    assert results["small"]["onnx_low_res_masks"] < 1e-3  # a smoke test's guard, not a benchmark figure
    assert "max |onnx - pytorch|" in out and "ratio onnx/pytorch" in out


def test_encoder_fast_path_prints_the_ratio_the_error_and_the_mask_iou(no_pipeline_artefacts, capsys):
    base = Path(__file__).resolve().parents[1] / "base" / "release" / "sam_small.pth"
    args = ["--shape", "tiny", "--image-size", "72", "--repeats", "1", "--images", "2", "--base", str(base)]
    results = encoder_fast_path.main(args)  # 72 px: a 9 x 9 grid, padded windows
    out = capsys.readouterr().out
    assert results["ratio"] > 0 and 0 < results["relative_error"] < 0.05
    assert 0.5 < results["iou_mean"] <= 1 and 0.5 < results["small_iou_mean"] <= 1  # guards, not figures
    assert "ratio fast/fp32" in out and "mask IoU fast vs fp32 over 10 prompts" in out
    assert "small trained" in out and "white noise" in out


def test_cpu_allocator_prints_both_allocators_and_their_ratio(no_pipeline_artefacts, capsys):
    results = cpu_allocator.main(["--shape", "tiny", "--image-size", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    assert results["ratio"] > 0 and results["default_s"] > 0 and results["tuned_s"] > 0
    assert "identical embeddings: True" in out and "ratio default/tuned" in out
    assert "default:" in out and "tuned:" in out and "minor faults" in out


def test_train_step_times_both_steps_and_keeps_the_frozen_sam_frozen(no_pipeline_artefacts, capsys):
    results = train_step.main(["--batch-sizes", "2", "--steps", "2", "--images", "8"])
    out = capsys.readouterr().out
    assert [(r["kind"], r["batch"]) for r in results] == [("base", 2), ("plugin", 2)]
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in results)
    assert "base step, batch   2" in out and "plugin step, batch   2" in out


def test_train_step_prices_a_bigger_encoder(no_pipeline_artefacts, capsys):
    train_step.main(["--batch-sizes", "2", "--steps", "1", "--images", "8", "--kinds", "base",
                     "--encoder-dim", "96", "--encoder-depth", "3"])  # fmt: skip
    assert "96-d x 3-block encoder (618,888 parameters)" in capsys.readouterr().out
