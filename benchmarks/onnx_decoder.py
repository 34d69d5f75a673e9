"""The exported ONNX decoder vs PyTorch: max abs difference and latency ratio.

    python -m benchmarks.onnx_decoder [--iters 100] [--threads 1] [--models small,vit_b]

Two models, as in decoder_overhead: the pipeline's small SAM (its trained plug-in if `dvc repro`
built one, else random weights with params.yaml's plug-ins) and segment-anything's vit_b with
random weights and the default plug-in, its plug-in weights moved off the identity (N(0, 0.1²)
added, seeded) so that the plug-ins change the output. Each decoder is exported with
`export_decoder_onnx` (float32 and its dynamically quantised copy) and run on onnxruntime's CPU
provider; the reference is segment-anything's `SamOnnxModel` in PyTorch on the same inputs (the
computation that was traced: prompt encoder, plugged decoder, all four masks upscaled), on one
box prompt (two corner points): for the small model the first validation image's embedding, GT
box and original size; for vit_b a random embedding, a fixed box and a 768 x 1024 original. Calls alternate between the three runners;
medians after a warm-up. Prints the max abs difference per output, the plug-ins' own effect on
the low-res logits (Stable-SAM - SAM in PyTorch) for scale, and ms per call with the ratio
onnxruntime / PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from segment_anything.utils.onnx import SamOnnxModel

from stable_sam.boxes import box_from_mask
from stable_sam.evaluation import PreparedImage, embed_images
from stable_sam.modeling import StableSam
from stable_sam.onnx_export import OUTPUT_NAMES, export_decoder_onnx, require_onnx

from ._common import default_images, default_model

WARMUP = 5


def _inputs(model: StableSam, image: PreparedImage | None = None) -> dict[str, np.ndarray]:
    """SAM's ONNX inputs for one box: ``image``'s embedding and GT box, else random ones."""
    encoder = model.sam.prompt_encoder
    size = model.img_size
    if image is None:
        generator = torch.Generator().manual_seed(0)
        embedding = torch.randn(1, encoder.embed_dim, *encoder.image_embedding_size, generator=generator)
        box = np.array([0.25 * size, 0.2 * size, 0.7 * size, 0.6 * size], dtype=np.float32)
        original_size = (0.75 * size, size)
    else:
        (embedding,) = embed_images(model, [image], progress=False)
        box = box_from_mask(image.frame_mask).astype(np.float32)
        original_size = image.original_size
    h, w = model.mask_input_size
    return {
        "image_embeddings": embedding.numpy(),
        "point_coords": box.reshape(1, 2, 2),
        "point_labels": np.array([[2.0, 3.0]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, h, w), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array(original_size, dtype=np.float32),
    }


def _perturbed_plugins(model: StableSam, scale: float = 0.1) -> StableSam:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def _median_ms(runners: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for i in range(iters + WARMUP):
        for name, run in order if i % 2 else reversed(order):
            started = time.perf_counter()
            run()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure(
    model: StableSam, *, iters: int, threads: int, folder: Path, image: PreparedImage | None = None
) -> dict[str, float]:
    """Export, compare and time one model; returns the figures the benchmark prints."""
    ort = require_onnx("onnxruntime")
    exported = export_decoder_onnx(
        model, folder / "decoder.onnx", quantize_output=folder / "decoder_quant.onnx"
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("onnx", exported.path), ("onnx_quant", exported.quantized_path))
    }
    inputs = _inputs(model, image)
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    reference = SamOnnxModel(model.sam, return_single_mask=False)
    with torch.no_grad():
        expected = [t.numpy() for t in reference(**tensors)]
        with model.plugins_disabled():
            plain = reference(**tensors)[2].numpy()
    results = {
        "logit_scale": float(np.abs(expected[2]).max()),
        "plugin_effect": float(np.abs(expected[2] - plain).max()),
    }
    for name, session in sessions.items():
        got = session.run(list(OUTPUT_NAMES), inputs)
        for output, g, e in zip(OUTPUT_NAMES, got, expected):
            results[f"{name}_{output}"] = float(np.abs(g - e).max())
    runners: dict[str, Callable[[], object]] = {
        name: (lambda s=session: s.run(list(OUTPUT_NAMES), inputs)) for name, session in sessions.items()
    }
    runners["pytorch"] = lambda: reference(**tensors)
    ms = _median_ms(runners, iters)
    results.update({f"{name}_ms": value for name, value in ms.items()})
    results["ratio"] = ms["onnx"] / ms["pytorch"]
    results["quant_ratio"] = ms["onnx_quant"] / ms["pytorch"]
    return results


def _report(label: str, desc: str, r: dict[str, float]) -> None:
    print(f"{label} ({desc})")
    print(
        f"  low-res logits up to {r['logit_scale']:.3g} in magnitude; the plug-ins move them by up to "
        f"{r['plugin_effect']:.3g} (PyTorch, Stable-SAM - SAM)"
    )
    for name in ("onnx", "onnx_quant"):
        diffs = "  ".join(f"{output} {r[f'{name}_{output}']:.2g}" for output in OUTPUT_NAMES)
        print(f"  max |{name} - pytorch|: {diffs}")
    print(
        f"  ms/call: pytorch {r['pytorch_ms']:.3f}  onnx {r['onnx_ms']:.3f}  onnx_quant {r['onnx_quant_ms']:.3f}"
        f"  ratio onnx/pytorch {r['ratio']:.3f}  quantised/pytorch {r['quant_ratio']:.3f}"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and onnxruntime threads (default 1: a shared CPU)"
    )
    parser.add_argument("--models", default="small,vit_b", help="comma-separated: small, vit_b")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch and onnxruntime threads {args.threads}; median of {args.iters} interleaved calls; 1 box")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for label in args.models.split(","):
            image = None
            if label == "small":
                model, desc = default_model()
                (image,), where = default_images(model.img_size, limit=1, resize="longest_side")
                desc += f"; {image.name} from {where}, its GT box"
            elif label == "vit_b":
                model, _ = default_model(sam_type="vit_b")
                model, desc = _perturbed_plugins(model), "vit_b-shaped, random weights, perturbed plug-in"
            else:
                raise SystemExit(f"error: --models: unknown model {label!r}; choose from small, vit_b")
            folder = Path(tmp) / label
            results[label] = measure(
                model, iters=args.iters, threads=args.threads, folder=folder, image=image
            )
            _report(label, desc, results[label])
    return results


if __name__ == "__main__":
    main()
