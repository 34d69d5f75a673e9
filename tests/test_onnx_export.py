"""ONNX export of the prompt decoder: onnxruntime against PyTorch, SAM's I/O, the plug-ins in the graph.

Tolerance: float32 onnxruntime and PyTorch differ by kernel choice only. Measured here (logits of
magnitude 0.3-3): <= 5e-6 on the small model's outputs, <= 1e-5 on the vit_b-shaped one's
low-res logits and <= 5e-5 on its upscaled masks (onnxruntime's Resize vs F.interpolate); ATOL
leaves room for other CPUs. The plug-ins move these models' logits by 0.1-1.5, far more than
PLUGIN_EFFECT, so "the graph holds the plug-ins" cannot pass by accident.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import perturb_plugins, random_stable_sam
from segment_anything.utils.onnx import SamOnnxModel
from segment_anything.utils.transforms import ResizeLongestSide

from stable_sam import PluginConfig, build_stable_sam, save_plugin_checkpoint
from stable_sam.cli import main
from stable_sam.modeling import PromptTensors
from stable_sam.onnx_export import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    approximate_gelu,
    export_decoder_onnx,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 2e-4
PLUGIN_EFFECT = 0.05
ALL_SITES = PluginConfig(placements=["block1", "block2", "final"])

# Prompts in the small model's 128-px frame (scaled for other frames). ONNX convention: a box is
# two points labelled 2 and 3 after the clicks; without a box a (0, 0) point labelled -1 follows.
PROMPTS = {
    "box": {"box": [20, 30, 100, 90]},
    "clicks": {"points": [[40, 50], [90, 70], [20, 100]], "labels": [1, 0, 1], "orig_size": (200, 120)},
    "box_and_click": {"box": [20, 30, 100, 90], "points": [[60, 60]], "labels": [1]},
    "click_and_mask": {"points": [[64, 64]], "labels": [1], "mask": True},
}
# H x W of the "original image" the masks are upscaled to; neither has the 2:3 aspect ratio of
# the export's dummy input, which segment-anything 1.0's SamOnnxModel bakes into the graph.
ORIG_SIZE = (150, 200)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), inputs)))


def _embedding(model, seed: int = 3) -> torch.Tensor:
    encoder = model.sam.prompt_encoder
    return torch.randn(
        1, encoder.embed_dim, *encoder.image_embedding_size, generator=torch.Generator().manual_seed(seed)
    )


def _inputs(model, prompt: dict, embedding: torch.Tensor) -> tuple[dict[str, np.ndarray], PromptTensors]:
    """The ONNX inputs of one prompt, and the same prompt for StableSam.decode."""
    scale = model.img_size / 128
    points = np.asarray(prompt.get("points", np.zeros((0, 2))), dtype=np.float32) * scale
    labels = np.asarray(prompt.get("labels", []), dtype=np.float32)
    box = None if "box" not in prompt else np.asarray(prompt["box"], dtype=np.float32) * scale
    if box is not None:
        coords, all_labels = np.concatenate([points, box.reshape(2, 2)]), np.concatenate([labels, [2, 3]])
    else:
        coords, all_labels = np.concatenate([points, [[0.0, 0.0]]]), np.concatenate([labels, [-1]])
    h, w = model.mask_input_size
    mask = torch.randn(1, 1, h, w, generator=torch.Generator().manual_seed(4)) if prompt.get("mask") else None
    inputs = {
        "image_embeddings": embedding.numpy(),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": all_labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, h, w), np.float32) if mask is None else mask.numpy(),
        "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
        "orig_im_size": np.array(prompt.get("orig_size", ORIG_SIZE), np.float32),
    }
    tensors = PromptTensors(
        point_coords=None if not len(points) else torch.as_tensor(points)[None],
        point_labels=None if not len(points) else torch.as_tensor(labels, dtype=torch.int64)[None],
        boxes=None if box is None else torch.as_tensor(box)[None],
        mask_inputs=mask,
    )
    return inputs, tensors


def _torch(sam, inputs: dict[str, np.ndarray], **options) -> dict[str, np.ndarray]:
    """segment-anything's SamOnnxModel in PyTorch on the same inputs."""
    wrapped = SamOnnxModel(sam, return_single_mask=options.pop("return_single_mask", False), **options)
    outputs = wrapped(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    return {name: t.numpy() for name, t in zip(OUTPUT_NAMES, outputs)}


def _assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol: float = ATOL) -> None:
    for name in OUTPUT_NAMES:
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)


def _assert_decode_matches(model, onnx_out: dict[str, np.ndarray], inputs, prompts: PromptTensors) -> None:
    """The predictor's path: mask token 0 = StableSam.decode(multimask_output=False), tokens 1..3 =
    multimask, upscaled by Sam.postprocess_masks."""
    embedding = torch.as_tensor(inputs["image_embeddings"])
    orig_size = tuple(int(s) for s in inputs["orig_im_size"])
    with torch.no_grad():
        single = model.decode(embedding, prompts, multimask_output=False)
        multi = model.decode(embedding, prompts, multimask_output=True)
        logits = torch.cat([single.low_res_logits, multi.low_res_logits], dim=1)
        input_size = ResizeLongestSide.get_preprocess_shape(*orig_size, model.img_size)
        masks = model.sam.postprocess_masks(logits, input_size, orig_size)
    expected_iou = torch.cat([single.iou_predictions, multi.iou_predictions], dim=1).numpy()
    np.testing.assert_allclose(onnx_out["low_res_masks"], logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(onnx_out["iou_predictions"], expected_iou, rtol=0, atol=ATOL)
    np.testing.assert_allclose(onnx_out["masks"], masks.numpy(), rtol=0, atol=ATOL)


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


# ------------------------------------------------------------------------------ the small model
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small Stable-SAM with non-trivial plug-ins at every site, its vanilla SAM, and two exports."""
    model, vanilla = random_stable_sam("small", plugin_config=ALL_SITES)
    perturb_plugins(model, scale=1.0)
    model.eval()
    folder = tmp_path_factory.mktemp("onnx")
    stable = export_decoder_onnx(model, folder / "stable.onnx", quantize_output=folder / "stable_quant.onnx")
    sam = export_decoder_onnx(model, folder / "sam.onnx", plugins=False)
    return {"model": model, "vanilla": vanilla.eval(), "stable": stable, "sam": sam, "folder": folder}


def test_inputs_and_outputs_are_those_of_segment_anythings_export(small):
    expected_inputs = [
        ("image_embeddings", [1, 64, 16, 16]),
        ("point_coords", [1, "num_points", 2]),
        ("point_labels", [1, "num_points"]),
        ("mask_input", [1, 1, 64, 64]),
        ("has_mask_input", [1]),
        ("orig_im_size", [2]),
    ]
    for result in (small["stable"], small["sam"]):
        for path in filter(None, (result.path, result.quantized_path)):
            session = _session(path)
            assert [(i.name, i.shape) for i in session.get_inputs()] == expected_inputs
            assert {i.type for i in session.get_inputs()} == {"tensor(float)"}
            assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
            assert [len(o.shape) for o in session.get_outputs()] == [4, 2, 4]
    assert [name for name, _ in expected_inputs] == list(INPUT_NAMES)
    props = {p.key: p.value for p in onnx.load(str(small["stable"].path)).metadata_props}
    assert props["stable_sam.decoder"] == "stable-sam" and props["stable_sam.sam_type"] == "small"
    assert json.loads(props["stable_sam.plugin_config"])["placements"] == ["block1", "block2", "final"]
    assert {p.key: p.value for p in onnx.load(str(small["sam"].path)).metadata_props}[
        "stable_sam.decoder"
    ] == "sam"


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_onnxruntime_equals_pytorch_with_and_without_plugins(small, prompt):
    model, embedding = small["model"], _embedding(small["model"])
    inputs, tensors = _inputs(model, PROMPTS[prompt], embedding)
    stable = _run(_session(small["stable"].path), inputs)
    sam = _run(_session(small["sam"].path), inputs)
    _assert_close(stable, _torch(model.sam, inputs))
    _assert_decode_matches(model, stable, inputs, tensors)
    # --no-plugin is segment-anything's own SAM: the untouched copy, exported nowhere.
    _assert_close(sam, _torch(small["vanilla"], inputs))
    with model.plugins_disabled():
        _assert_decode_matches(model, sam, inputs, tensors)
    assert np.abs(stable["low_res_masks"] - sam["low_res_masks"]).max() > PLUGIN_EFFECT


def test_the_plugins_are_in_the_graph_and_the_model_is_left_as_it_was(small):
    assert "GridSample" in _ops(small["stable"].path)
    assert "GridSample" not in _ops(small["sam"].path)
    assert all(site.enabled and site.alpha1_override is None for site in small["model"].sites.values())
    assert small["stable"].variant == "stable-sam" and small["sam"].variant == "sam"
    assert max(small["stable"].max_abs_diff.values()) < ATOL


def test_forced_alpha1_is_baked_into_the_file(small, tmp_path):
    model, embedding = small["model"], _embedding(small["model"])
    inputs, _ = _inputs(model, PROMPTS["box"], embedding)
    forced = export_decoder_onnx(model, tmp_path / "a07.onnx", alpha1=0.7)
    as_sam = export_decoder_onnx(model, tmp_path / "a0.onnx", alpha1=0.0)
    assert forced.variant == "stable-sam alpha1=0.7"
    out = _run(_session(forced.path), inputs)
    with model.forced_alpha1(0.7):
        _assert_close(out, _torch(model.sam, inputs))
    drp = _run(_session(small["stable"].path), inputs)
    assert np.abs(out["low_res_masks"] - drp["low_res_masks"]).max() > PLUGIN_EFFECT
    # α1 = 0 feeds SAM's attention its own keys and values: the file is SAM (Table S8).
    _assert_close(_run(_session(as_sam.path), inputs), _torch(small["vanilla"], inputs))
    assert all(site.alpha1_override is None for site in model.sites.values())


def test_the_quantised_copy_loads_runs_and_follows_the_float_model(small):
    inputs, _ = _inputs(small["model"], PROMPTS["box"], _embedding(small["model"]))
    exact = _run(_session(small["stable"].path), inputs)
    quantised = _run(_session(small["stable"].quantized_path), inputs)
    for name in OUTPUT_NAMES:
        assert quantised[name].shape == exact[name].shape
    # uint8 weights: close, not equal (0.989 on this deliberately perturbed model).
    correlation = np.corrcoef(quantised["low_res_masks"].ravel(), exact["low_res_masks"].ravel())[0, 1]
    assert correlation > 0.95
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(small["stable"].quantized_path)
    assert small["stable"].quantized_path.stat().st_size < 0.75 * small["stable"].path.stat().st_size
    assert small["stable"].quantized_max_abs_diff is not None


def test_segment_anythings_export_options(small, tmp_path):
    """--return-single-mask, --use-stability-score, --gelu-approximate: as SamOnnxModel computes them."""
    model, embedding = small["model"], _embedding(small["model"])
    result = export_decoder_onnx(
        model,
        tmp_path / "opts.onnx",
        return_single_mask=True,
        use_stability_score=True,
        gelu_approximate=True,
    )
    assert "Erf" not in _ops(result.path) and "Erf" in _ops(small["stable"].path)
    assert all(m.approximate == "none" for m in model.modules() if isinstance(m, torch.nn.GELU))
    session = _session(result.path)
    for prompt in ("box", "clicks"):  # 2 points: best multimask output; 4 points: mask token 0
        inputs, _ = _inputs(model, PROMPTS[prompt], embedding)
        out = _run(session, inputs)
        assert out["masks"].shape == (1, 1, *PROMPTS[prompt].get("orig_size", ORIG_SIZE))
        assert out["iou_predictions"].shape == (1, 1)
        with approximate_gelu(model.sam):
            expected = _torch(model.sam, inputs, return_single_mask=True, use_stability_score=True)
            _assert_close(out, expected)


def test_a_failed_export_leaves_existing_files_untouched(small, tmp_path, monkeypatch):
    import stable_sam.onnx_export as onnx_export

    (tmp_path / "d.onnx").write_bytes(b"old")

    def broken(model_bytes):
        raise RuntimeError("quantiser crashed")

    monkeypatch.setattr(onnx_export, "quantize_decoder_onnx", broken)
    with pytest.raises(RuntimeError, match="quantiser crashed"):
        export_decoder_onnx(small["model"], tmp_path / "d.onnx", quantize_output=tmp_path / "q.onnx")
    assert (tmp_path / "d.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]


def test_bad_options_and_a_missing_runtime_are_clear_errors(small, tmp_path, monkeypatch):
    model = small["model"]
    with pytest.raises(ValueError, match="grid_sample needs ONNX opset >= 16"):
        export_decoder_onnx(model, tmp_path / "x.onnx", opset=15)
    with pytest.raises(ValueError, match="opset >= 11"):
        export_decoder_onnx(model, tmp_path / "x.onnx", opset=10, plugins=False)
    with pytest.raises(ValueError, match="cannot be combined with plugins=False"):
        export_decoder_onnx(model, tmp_path / "x.onnx", alpha1=0.5, plugins=False)
    with pytest.raises(ValueError, match=r"alpha1 must lie in \[0, 1\]"):
        export_decoder_onnx(model, tmp_path / "x.onnx", alpha1=1.5)
    with pytest.raises(ValueError, match="would overwrite the float model"):
        export_decoder_onnx(model, tmp_path / "x.onnx", quantize_output=tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r'pip install "stable-sam\[onnx\]"'):
        export_decoder_onnx(model, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_plain_sam_exports_at_the_scripts_oldest_opset(tmp_path):
    model, vanilla = random_stable_sam("tiny")
    result = export_decoder_onnx(model, tmp_path / "sam11.onnx", opset=11, plugins=False)
    assert onnx.load(str(result.path)).opset_import[0].version == 11
    inputs, _ = _inputs(model, PROMPTS["box_and_click"], _embedding(model))
    _assert_close(_run(_session(result.path), inputs), _torch(vanilla.eval(), inputs))


# ------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SAM checkpoint and a plug-in checkpoint (perturbed plug-ins) trained on it."""
    folder = tmp_path_factory.mktemp("cli")
    _, vanilla = random_stable_sam("tiny")
    torch.save(vanilla.state_dict(), folder / "sam_tiny.pth")
    plugged = build_stable_sam(sam_type="tiny", sam_checkpoint=folder / "sam_tiny.pth")
    perturb_plugins(plugged, scale=1.0)
    save_plugin_checkpoint(plugged, folder / "plugin.pt")
    return folder


def _export_args(files, output) -> list[str]:
    return [
        "export-onnx", "--sam-type", "tiny", "--sam-checkpoint", str(files / "sam_tiny.pth"),
        "--plugin", str(files / "plugin.pt"), "--output", str(output),
    ]  # fmt: skip


def test_cli_writes_the_decoder_and_its_quantised_copy(files, tmp_path, capsys):
    args = _export_args(files, tmp_path / "out" / "decoder.onnx")
    assert main([*args, "--quantize-out", str(tmp_path / "out" / "decoder_quant.onnx")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decoder"] == "stable-sam" and summary["opset"] == 17 and summary["input_frame"] == 64
    assert summary["inputs"] == list(INPUT_NAMES) and summary["outputs"] == list(OUTPUT_NAMES)
    assert max(summary["max_abs_diff_vs_pytorch"].values()) < ATOL
    model = build_stable_sam(
        sam_type="tiny", sam_checkpoint=files / "sam_tiny.pth", plugin_checkpoint=files / "plugin.pt"
    )
    inputs, _ = _inputs(model, PROMPTS["clicks"], _embedding(model))
    _assert_close(_run(_session(summary["onnx"]), inputs), _torch(model.sam, inputs))
    assert _run(_session(summary["quantized"]), inputs)["masks"].shape == (1, 4, 200, 120)


@pytest.mark.parametrize(
    "extra, variant",
    [(["--no-plugin"], "sam"), (["--alpha1", "0.25", "--opset", "16"], "stable-sam alpha1=0.25")],
)
def test_cli_no_plugin_and_alpha1(files, tmp_path, capsys, extra, variant):
    assert main([*_export_args(files, tmp_path / "d.onnx"), *extra]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decoder"] == variant and summary["quantized"] is None
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert props["stable_sam.decoder"] == variant


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-plugin", "--alpha1", "0.5"], "cannot go with --no-plugin"),
        (["--opset", "15"], "opset 15 cannot hold the deformable sampling plug-in"),
    ],
)
def test_cli_bad_options_are_clear_errors(files, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main([*_export_args(files, tmp_path / "d.onnx"), *extra])
    assert not (tmp_path / "d.onnx").exists()


def test_cli_bad_paths_and_values_are_clear_errors(files, tmp_path, capsys):
    args = _export_args(files, tmp_path / "d.onnx")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--alpha1", "1.5"])
    assert exit_info.value.code == 2 and "--alpha1: must lie in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="are both"):
        main([*args, "--quantize-out", str(tmp_path / "d.onnx")])
    with pytest.raises(SystemExit, match=f"--output {tmp_path} is a folder"):
        main([*args[:-1], str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --sam-checkpoint"):
        main(
            ["export-onnx", "--sam-type", "tiny", "--plugin", str(files / "plugin.pt"), "--output", "d.onnx"]
        )
    assert not list(tmp_path.iterdir())
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match=f"cannot write {tmp_path / 'a_file'}"):
        main([*args[:-1], str(tmp_path / "a_file" / "d.onnx")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------------------- vit_b-shaped model
@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """segment-anything's vit_b (random weights; only its 256-d, 64 x 64 decoder is exported)."""
    model, vanilla = random_stable_sam("vit_b", plugin_config=ALL_SITES)
    # 0.1, not 1: N(0, 1) weights in the 256 x 256 amplitude conv multiply the features by ~16,
    # which makes attention so sharp that float32 rounding alone differs by 1e-3.
    perturb_plugins(model, scale=0.1)
    model.eval()
    folder = tmp_path_factory.mktemp("onnx_vit_b")
    return {
        "model": model,
        "vanilla": vanilla.eval(),
        "stable": export_decoder_onnx(model, folder / "stable.onnx"),
        "sam": export_decoder_onnx(model, folder / "sam.onnx", plugins=False),
    }


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["box", "click_and_mask"])
def test_vit_b_shaped_decoder_onnxruntime_equals_pytorch(vit_b, prompt):
    model, embedding = vit_b["model"], _embedding(vit_b["model"])
    inputs, tensors = _inputs(model, PROMPTS[prompt], embedding)
    assert inputs["image_embeddings"].shape == (1, 256, 64, 64) and inputs["mask_input"].shape == (
        1,
        1,
        256,
        256,
    )
    stable = _run(_session(vit_b["stable"].path), inputs)
    sam = _run(_session(vit_b["sam"].path), inputs)
    _assert_close(stable, _torch(model.sam, inputs))
    _assert_decode_matches(model, stable, inputs, tensors)
    _assert_close(sam, _torch(vit_b["vanilla"], inputs))
    assert np.abs(stable["low_res_masks"] - sam["low_res_masks"]).max() > PLUGIN_EFFECT
