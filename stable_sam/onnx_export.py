"""ONNX export of the prompt decoder (prompt encoder + plugged mask decoder + mask upscaling).

The graph is segment-anything's own :class:`~segment_anything.utils.onnx.SamOnnxModel` traced on
the :class:`StableSam`'s ``Sam`` instance (with segment-anything's post-1.0 fix of the mask crop,
see :class:`_SamOnnxModel`): the plug-ins live in that instance, so the trace runs through them,
and the file has exactly the inputs and outputs of segment-anything's
``scripts/export_onnx_model.py``. Any tool that loads a SAM decoder loads it unchanged:

==================  ===================  =====================================================
input               shape                meaning (SAM's convention)
==================  ===================  =====================================================
image_embeddings    1 x C x H x W        the image encoder's output (C x H x W = 256 x 64 x 64
                                         for every official SAM)
point_coords        1 x N x 2            (x, y) in the model's input frame (long side img_size);
                                         a box is two points, labels 2 and 3; without a box add
                                         a (0, 0) point with label -1
point_labels        1 x N                1 fg, 0 bg, 2/3 box corners, -1 padding
mask_input          1 x 1 x 4H x 4W      a low-res mask logit prompt (zeros if none)
has_mask_input      1                    1.0 if mask_input is used, else 0.0
orig_im_size        2                    (height, width) of the original image
==================  ===================  =====================================================

Outputs: ``masks`` (1 x M x h x w logits at the original size), ``iou_predictions`` (1 x M),
``low_res_masks`` (1 x M x 4H x 4W); M = 4 (SAM's single-mask token first), or 1 with
``return_single_mask``.

``onnx`` and ``onnxruntime`` are optional (``pip install "stable-sam[onnx]"``) and imported here only.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.onnx import SamOnnxModel
from torch import Tensor, nn

from .atomic_write import write_bytes_atomic
from .config import config_to_dict
from .modeling import DeformableSamplingPlugin, StableSam

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "OnnxExport",
    "approximate_gelu",
    "decoder_variant",
    "dummy_inputs",
    "export_decoder_onnx",
    "quantize_decoder_onnx",
    "require_onnx",
]

# segment-anything's scripts/export_onnx_model.py: names, dynamic axes, default opset.
INPUT_NAMES = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
DEFAULT_OPSET = 17
MIN_OPSET = 11  # the script's floor
GRID_SAMPLE_OPSET = 16  # ONNX GridSample, which the deformable sampling plug-in exports to


def require_onnx(name: str) -> ModuleType:
    """Import ``onnx`` / ``onnxruntime`` (or a submodule), naming the extra to install when missing."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f'ONNX export needs {name.split(".")[0]!r}: pip install "stable-sam[onnx]" ({err})'
        ) from err


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_decoder_onnx` wrote.

    Attributes:
      path: the float32 ONNX decoder.
      quantized_path: its dynamically quantised copy, or None.
      opset: the ONNX opset.
      variant: "stable-sam", "stable-sam alpha1=A" or "sam" (see :func:`decoder_variant`).
      max_abs_diff: output name -> max |onnxruntime - PyTorch| on the export's dummy input.
      quantized_max_abs_diff: the same for the quantised copy, or None.
    """

    path: Path
    quantized_path: Path | None
    opset: int
    variant: str
    max_abs_diff: dict[str, float]
    quantized_max_abs_diff: dict[str, float] | None


class _SamOnnxModel(SamOnnxModel):
    """segment-anything's ``SamOnnxModel`` with the mask crop fix it got after its 1.0 release.

    1.0 (the pinned release) crops the upscaled masks with ``int(prepadded_size[i])``: Python ints,
    which the tracer freezes at the dummy input's 1500 x 2250 aspect ratio, so ``masks`` come out
    stretched for every image of another aspect ratio (segment-anything issues #56 and #130).
    Upstream's fix (PR #58, in its main branch) keeps the crop a tensor slice; this is that one
    method, nothing else.
    """

    def mask_postprocessing(self, masks: Tensor, orig_im_size: Tensor) -> Tensor:
        """masks: 1 x M x 4H x 4W low-res logits -> 1 x M x h x w at orig_im_size (h, w)."""
        masks = F.interpolate(
            masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size).to(torch.int64)
        masks = masks[..., : prepadded_size[0], : prepadded_size[1]]
        orig_im_size = orig_im_size.to(torch.int64)
        h, w = orig_im_size[0], orig_im_size[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)


def decoder_variant(model: StableSam, *, plugins: bool = True, alpha1: float | None = None) -> str:
    """The decoder an export holds: "sam" (no plug-ins, or disabled), "stable-sam[ alpha1=A]"."""
    if not plugins or not model.sites:
        return "sam"
    return "stable-sam" if alpha1 is None else f"stable-sam alpha1={alpha1:g}"


@contextlib.contextmanager
def _decoder_mode(model: StableSam, *, plugins: bool, alpha1: float | None) -> Iterator[None]:
    """Plug-ins on (DRP routing), on with a forced α1, or off, for the duration of a trace."""
    if alpha1 is not None and not plugins:
        raise ValueError(
            "alpha1 forces the plug-ins' routing weight: it cannot be combined with plugins=False"
        )
    if alpha1 is not None and not model.sites:
        raise ValueError("alpha1 was given but the model has no plug-ins (variant 'none')")
    if not plugins:
        with model.plugins_disabled():
            yield
    elif alpha1 is not None:
        # The override is a Python float in PluggedTokenToImageAttention.forward: the tracer
        # records it as a constant, so the file keeps α = (alpha1, 1 - alpha1) for every prompt.
        with model.forced_alpha1(alpha1):
            yield
    else:
        yield


@contextlib.contextmanager
def approximate_gelu(module: nn.Module) -> Iterator[None]:
    """Every ``nn.GELU`` in ``module`` (SAM's and the plug-ins') uses the tanh form inside the block.

    SAM's ``--gelu-approximate``: for runtimes with a slow or missing Erf. Restored afterwards.
    """
    gelus = [m for m in module.modules() if isinstance(m, nn.GELU)]
    previous = [m.approximate for m in gelus]
    try:
        for m in gelus:
            m.approximate = "tanh"
        yield
    finally:
        for m, approximate in zip(gelus, previous):
            m.approximate = approximate


def dummy_inputs(model: StableSam, *, num_points: int = 5, seed: int = 0) -> dict[str, Tensor]:
    """The tracing inputs of segment-anything's export script, in the model's input frame.

    Returns: image_embeddings 1 x C x H x W, point_coords 1 x N x 2 (in [0, img_size)),
    point_labels 1 x N (0..3), mask_input 1 x 1 x 4H x 4W, has_mask_input [1.], orig_im_size
    [1500., 2250.].
    """
    encoder = model.sam.prompt_encoder
    embed_size = tuple(encoder.image_embedding_size)
    generator = torch.Generator().manual_seed(seed)
    return {
        "image_embeddings": torch.randn(1, encoder.embed_dim, *embed_size, generator=generator),
        "point_coords": torch.randint(0, model.img_size, (1, num_points, 2), generator=generator).float(),
        "point_labels": torch.randint(0, 4, (1, num_points), generator=generator).float(),
        "mask_input": torch.randn(1, 1, *(4 * s for s in embed_size), generator=generator),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def _check_opset(model: StableSam, opset: int, plugins: bool) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: SAM's decoder needs ONNX opset >= {MIN_OPSET}")
    deformable = any(isinstance(site.sampler, DeformableSamplingPlugin) for site in model.sites.values())
    if plugins and deformable and opset < GRID_SAMPLE_OPSET:
        raise ValueError(
            f"opset {opset} cannot hold the deformable sampling plug-in: its grid_sample needs ONNX "
            f"opset >= {GRID_SAMPLE_OPSET} (default {DEFAULT_OPSET}; plain SAM without plug-ins "
            f"exports from {MIN_OPSET})"
        )


def _metadata(model: StableSam, variant: str) -> dict[str, str]:
    """Self-description in the file's metadata_props (tools that load SAM decoders ignore them)."""
    from . import __version__

    return {
        "stable_sam.version": __version__,
        "stable_sam.decoder": variant,
        "stable_sam.sam_type": model.sam_type,
        "stable_sam.img_size": str(model.img_size),
        "stable_sam.sam_checkpoint_sha256": model.sam_checkpoint_sha256 or "none (random weights)",
        "stable_sam.plugin_config": json.dumps(config_to_dict(model.plugin_config), sort_keys=True),
    }


def _max_abs_diff(session: Any, wrapped: _SamOnnxModel, inputs: dict[str, Tensor]) -> dict[str, float]:
    """onnxruntime vs the traced PyTorch module on ``inputs``, per output."""
    expected = wrapped(**inputs)
    got = session.run(list(OUTPUT_NAMES), {k: v.numpy() for k, v in inputs.items()})
    return {name: float(np.abs(g - e.numpy()).max()) for name, g, e in zip(OUTPUT_NAMES, got, expected)}


def _session(model_bytes: bytes) -> Any:
    ort = require_onnx("onnxruntime")
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def quantize_decoder_onnx(model_bytes: bytes) -> bytes:
    """Dynamic uint8 weight quantisation, with segment-anything's settings.

    SAM calls ``quantize_dynamic(optimize_model=True, per_channel=False, reduce_range=False,
    weight_type=QuantType.QUInt8)``. onnxruntime has since dropped ``optimize_model``; its
    replacement is ``quant_pre_process``, whose optimisation step is the same basic-level graph
    optimisation. Its symbolic shape inference cannot follow the decoder's dynamic mask resizing
    and is skipped (ONNX shape inference still runs).
    """
    onnx = require_onnx("onnx")
    quantization = require_onnx("onnxruntime.quantization")
    shape_inference = require_onnx("onnxruntime.quantization.shape_inference")
    # The quantiser logs every tensor it leaves alone at INFO on the root logger: hundreds of lines.
    previous_disable = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with tempfile.TemporaryDirectory(prefix="stable-sam-quantize-") as tmp:
            prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
            model = onnx.load_from_string(model_bytes)
            shape_inference.quant_pre_process(model, prepared, skip_symbolic_shape=True)
            quantization.quantize_dynamic(
                model_input=prepared,
                model_output=quantized,
                per_channel=False,
                reduce_range=False,
                weight_type=quantization.QuantType.QUInt8,
            )
            return quantized.read_bytes()
    finally:
        logging.disable(previous_disable)


def _trace(wrapped: _SamOnnxModel, inputs: dict[str, Tensor], opset: int) -> bytes:
    """segment-anything's ``torch.onnx.export`` call, into memory."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The script's filters, plus the legacy exporter's deprecation notice.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapped,
            tuple(inputs.values()),
            buffer,
            export_params=True,
            verbose=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
            # torch >= 2.9 defaults to the torch.export-based exporter, which takes dynamic_shapes
            # instead of dynamic_axes and needs onnxscript; SAM's script uses the TorchScript one.
            dynamo=False,
        )
    return buffer.getvalue()


def export_decoder_onnx(
    model: StableSam,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    return_single_mask: bool = False,
    quantize_output: str | os.PathLike | None = None,
    alpha1: float | None = None,
    plugins: bool = True,
    gelu_approximate: bool = False,
    use_stability_score: bool = False,
) -> OnnxExport:
    """Write the prompt decoder (plug-ins included) as segment-anything's export script does.

    Args:
      model: the Stable-SAM (its state is restored afterwards).
      path: the .onnx file, written atomically (a reader never sees half a file).
      opset: ONNX opset; >= 16 with the deformable sampling plug-in (grid_sample).
      return_single_mask: SAM's option: return one mask (M = 1), chosen by SAM's
        ``SamOnnxModel.select_masks``: mask token 0 for more than 2 points (padding and box
        corners count), else the best scored of the three multimask outputs.
      quantize_output: also write a dynamically quantised copy here (:func:`quantize_decoder_onnx`).
      alpha1: bake a forced routing weight α = (alpha1, 1 - alpha1) into the graph (0: SAM).
      plugins: False exports plain SAM (the same weights, plug-ins disabled) for comparisons.
      gelu_approximate: SAM's option: tanh-approximated GELU (see :func:`approximate_gelu`).
      use_stability_score: SAM's option: iou_predictions are the low-res masks' stability scores.

    Returns:
      What was written, with onnxruntime's max abs difference to PyTorch on the trace input.

    Raises:
      ValueError: a bad opset or alpha1, alpha1 with plugins=False, or quantize_output == path.
      ImportError: onnx/onnxruntime missing (the message names the extra).
    """
    path = Path(path)
    quantized_path = None if quantize_output is None else Path(quantize_output)
    if quantized_path is not None and quantized_path.resolve() == path.resolve():
        raise ValueError(f"the quantised copy would overwrite the float model: both are {path}")
    _check_opset(model, opset, plugins)
    onnx = require_onnx("onnx")
    require_onnx("onnxruntime")
    variant = decoder_variant(model, plugins=plugins, alpha1=alpha1)
    wrapped = _SamOnnxModel(
        model=model.sam, return_single_mask=return_single_mask, use_stability_score=use_stability_score
    )
    inputs = dummy_inputs(model)
    was_training = model.training
    model.eval()
    try:
        with (
            _decoder_mode(model, plugins=plugins, alpha1=alpha1),
            approximate_gelu(wrapped) if gelu_approximate else contextlib.nullcontext(),
        ):
            proto = onnx.load_from_string(_trace(wrapped, inputs, opset))
            onnx.helper.set_model_props(proto, _metadata(model, variant))
            onnx.checker.check_model(proto)
            model_bytes = proto.SerializeToString()
            # The script's onnxruntime smoke run, compared with PyTorch in the same mode.
            max_abs_diff = _max_abs_diff(_session(model_bytes), wrapped, inputs)
            quantized_bytes = quantized_diff = None
            if quantized_path is not None:
                quantized_bytes = quantize_decoder_onnx(model_bytes)
                quantized_diff = _max_abs_diff(_session(quantized_bytes), wrapped, inputs)
    finally:
        model.train(was_training)
    write_bytes_atomic(path, model_bytes)
    if quantized_path is not None:
        write_bytes_atomic(quantized_path, quantized_bytes)
    return OnnxExport(
        path=path,
        quantized_path=quantized_path,
        opset=opset,
        variant=variant,
        max_abs_diff=max_abs_diff,
        quantized_max_abs_diff=quantized_diff,
    )
