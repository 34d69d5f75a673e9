"""``stable-sam``: segment an image (prompts or automatic masks), print a model's parameter counts,
or export its decoder to ONNX.

Examples::

    stable-sam predict photo.jpg --box 40,60,300,410 --sam-type vit_l \\
        --sam-checkpoint sam_vit_l_0b3195.pth --plugin models/stable_sam/plugin.pt
    stable-sam predict photo.jpg --point 120,200 --point 300,40 --label 1 --label 0 ...
    stable-sam predict photo.jpg --box ... --encoder-precision bf16    # the encoder fast path
    stable-sam info --sam-type vit_b
    stable-sam amg photo.jpg --sam-type vit_l --sam-checkpoint sam_vit_l_0b3195.pth \\
        --plugin models/stable_sam/plugin.pt --out-dir masks/
    stable-sam export-onnx --sam-type vit_l --sam-checkpoint sam_vit_l_0b3195.pth \\
        --plugin models/stable_sam/plugin.pt --output stable_sam_vit_l.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .build import SAM_TYPES, build_stable_sam
from .checkpoint import SamCheckpointError, read_plugin_checkpoint
from .config import config_to_dict
from .embedding_cache import EmbeddingCache
from .evaluation.automatic import mask_generator, write_amg
from .modeling import StableSam
from .precision import ENCODER_PRECISION_CHOICES
from .predictor import StableSamPredictor, clip_box

__all__ = ["main", "overlay_image"]


def _floats(text: str, n: int, what: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be numbers, got {text!r}") from None


def overlay_image(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    box: Sequence[float] | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    color: tuple[int, int, int] = (30, 144, 255),
    opacity: float = 0.5,
) -> Image.Image:
    """The image with the mask blended in colour, the box in green and the clicks as dots.

    Args:
      image: H x W x 3 uint8 RGB. mask: H x W bool. box: xyxy. points: N x 2 (x, y). labels: N.
    """
    out = image.astype(np.float32).copy()
    out[mask] = (1 - opacity) * out[mask] + opacity * np.asarray(color, dtype=np.float32)
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(0, 220, 0), width=2)
    if points is not None:
        radius = max(2, round(0.01 * max(image.shape[:2])))
        for (x, y), label in zip(points, labels if labels is not None else np.ones(len(points))):
            fill = (0, 220, 0) if label == 1 else (230, 30, 30)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
    return canvas


def _read_image(image_path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB; an unreadable file exits with one line."""
    try:
        with Image.open(image_path) as im:
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as err:  # not an OSError
        raise SystemExit(
            f"error: cannot read image {image_path}: {err} Pillow refuses images over its "
            f"decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS = {2 * Image.MAX_IMAGE_PIXELS} pixels"
        ) from None
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read image {image_path}: {err}") from None


def _load_model(
    args: argparse.Namespace, *, device: str | None = None, what: str, encoder_precision: str = "fp32"
) -> StableSam:
    """The model of the shared flags (``--sam-type``, ``--sam-checkpoint``, ``--plugin``); errors exit."""
    if args.plugin and not args.sam_checkpoint:
        try:
            stored = read_plugin_checkpoint(args.plugin)
        except SamCheckpointError as err:
            raise SystemExit(f"error: {err}") from None
        raise SystemExit(
            f"error: --plugin {args.plugin} needs --sam-checkpoint: it was trained on a {stored.sam_type} SAM "
            f"checkpoint with sha256 {stored.sam_checkpoint_sha256}; pass that file (and --sam-type {stored.sam_type})"
        )
    try:
        model = build_stable_sam(
            sam_type=args.sam_type,
            sam_checkpoint=args.sam_checkpoint,
            plugin_checkpoint=args.plugin,
            device=device,
            encoder_precision=encoder_precision,
        )
    except (SamCheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.sam_checkpoint is None:
        print(f"warning: no --sam-checkpoint: SAM has RANDOM weights, {what} is meaningless", file=sys.stderr)
    return model


def _predict(args: argparse.Namespace) -> int:
    image_path = Path(args.image)
    image = _read_image(image_path)
    if args.box is None and not args.point:
        raise SystemExit("error: give a prompt: --box x0,y0,x1,y1 and/or --point x,y (repeatable)")
    labels = args.label if args.label else [1] * len(args.point)
    if len(labels) != len(args.point):
        raise SystemExit(
            f"error: {len(args.point)} --point but {len(labels)} --label; give one label per point"
        )
    box = None
    if args.box is not None:  # checked before the model is loaded; a loose box is clipped (logged)
        try:
            box = clip_box(np.asarray(args.box, dtype=np.float32), *image.shape[:2])
        except ValueError as err:
            raise SystemExit(f"error: --box: {err}") from None
    model = _load_model(args, device=args.device, what="the mask", encoder_precision=args.encoder_precision)
    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else None
    predictor = StableSamPredictor(model, cache=cache)
    predictor.set_image(image)
    points = np.asarray(args.point, dtype=np.float32) if args.point else None
    point_labels = np.asarray(labels, dtype=np.int64) if args.point else None
    try:
        if args.no_plugin:
            with model.plugins_disabled():
                masks, scores, _ = predictor.predict(
                    points, point_labels, box, multimask_output=args.multimask
                )
        else:
            masks, scores, _ = predictor.predict(points, point_labels, box, multimask_output=args.multimask)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    best = int(np.argmax(scores))
    mask = masks[best]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path = out_dir / f"{image_path.stem}_mask.png"
    overlay_path = out_dir / f"{image_path.stem}_overlay.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_path)
    overlay_image(image, mask, box=box, points=points, labels=point_labels).save(overlay_path)
    summary = {
        "box": None if box is None else box.tolist(),
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "predicted_iou": float(scores[best]),
        "area_pixels": int(mask.sum()),
        "alpha": None if predictor.routing is None else [round(float(a), 4) for a in predictor.routing[0]],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _amg(args: argparse.Namespace) -> int:
    """Automatic masks of one image: ``<stem>_masks.json`` (COCO RLE) and ``<stem>_amg.png``."""
    image_path = Path(args.image)
    image = _read_image(image_path)
    model = _load_model(args, device=args.device, what="every mask", encoder_precision=args.encoder_precision)
    generator = mask_generator(
        model,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        output_mode="coco_rle",
    )
    with model.plugins_disabled() if args.no_plugin else contextlib.nullcontext():
        records = generator.generate(image)
    masks_path, overlay_path = write_amg(image, records, out_dir=args.out_dir, stem=image_path.stem)
    summary = {"masks": len(records), "json": str(masks_path), "overlay": str(overlay_path)}
    summary["model"] = "SAM (plug-ins off)" if args.no_plugin else "Stable-SAM"
    print(json.dumps(summary, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    """Describe a plug-in checkpoint (``--plugin``), or Stable-SAM with the given config on a SAM type."""
    stored = None
    if args.plugin:
        try:
            stored = read_plugin_checkpoint(args.plugin)
        except SamCheckpointError as err:
            raise SystemExit(f"error: {err}") from None
        model = build_stable_sam(
            sam_type=stored.sam_type, plugin_config=stored.plugin_config, tuning=stored.tuning
        )
        print(f"plug-in checkpoint:  {stored.path} (stable-sam {stored.package_version})")
        print(f"trained on SAM:      {stored.sam_type}, checkpoint sha256 {stored.sam_checkpoint_sha256}")
        for key, value in sorted(stored.extra.items()):
            print(f"  {key}: {value}")
    else:
        model = build_stable_sam(sam_type=args.sam_type)
        print(
            f"SAM type:            {args.sam_type} (the method's default plug-in config; --plugin FILE for a trained one)"
        )
    print(f"plug-in config:      {json.dumps(config_to_dict(model.plugin_config), sort_keys=True)}")
    frozen = sum(p.numel() for p in model.sam.parameters() if not p.requires_grad)
    print(f"SAM parameters:      {frozen:,} (frozen)")
    print(f"trainable (plug-in): {model.num_trainable_parameters():,}")
    if stored is not None and stored.num_parameters != model.num_trainable_parameters():
        raise SystemExit(
            f"error: {stored.path} stores {stored.num_parameters:,} parameters, its config builds "
            f"{model.num_trainable_parameters():,}"
        )
    for name in model.trainable_parameter_names():
        print(f"  {name}")
    return 0


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _export_onnx(args: argparse.Namespace) -> int:
    """The prompt decoder as an ONNX file with segment-anything's inputs and outputs."""
    from .onnx_export import INPUT_NAMES, OUTPUT_NAMES, export_decoder_onnx

    if args.alpha1 is not None and args.no_plugin:
        raise SystemExit("error: --alpha1 sets the plug-ins' routing weight: it cannot go with --no-plugin")
    for flag, value in (("--output", args.output), ("--quantize-out", args.quantize_out)):
        if value is not None and Path(value).is_dir():
            raise SystemExit(
                f"error: {flag} {value} is a folder; give a file name such as {value}/decoder.onnx"
            )
    if args.quantize_out is not None and Path(args.quantize_out).resolve() == Path(args.output).resolve():
        raise SystemExit(f"error: --quantize-out and --output are both {args.output}; give two files")
    model = _load_model(args, what="the exported decoder")
    if not args.plugin and not args.no_plugin:
        print(
            "warning: no --plugin: the plug-ins are untrained (identity), the decoder equals SAM's",
            file=sys.stderr,
        )
    try:
        result = export_decoder_onnx(
            model,
            args.output,
            opset=args.opset,
            return_single_mask=args.return_single_mask,
            quantize_output=args.quantize_out,
            alpha1=args.alpha1,
            plugins=not args.no_plugin,
            gelu_approximate=args.gelu_approximate,
            use_stability_score=args.use_stability_score,
        )
    except (ImportError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:
        raise SystemExit(
            f"error: cannot write {err.filename or args.output}: {err.strerror or err}"
        ) from None
    summary = {
        "onnx": str(result.path),
        "quantized": None if result.quantized_path is None else str(result.quantized_path),
        "decoder": result.variant,
        "sam_type": model.sam_type,
        "input_frame": model.img_size,
        "opset": result.opset,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "max_abs_diff_vs_pytorch": result.max_abs_diff,
        "quantized_max_abs_diff_vs_pytorch": result.quantized_max_abs_diff,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model, shared by ``predict``, ``amg`` and ``export-onnx``."""
    parser.add_argument("--sam-type", default="vit_l", choices=SAM_TYPES)
    parser.add_argument("--sam-checkpoint", help="official SAM checkpoint (sam_vit_*.pth)")
    parser.add_argument("--plugin", help="Stable-SAM plug-in checkpoint (models/stable_sam/plugin.pt)")
    parser.add_argument("--no-plugin", action="store_true", help="plain SAM (plug-ins off) for comparison")


def _add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of commands that run the image encoder (``predict``, ``amg``)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--encoder-precision",
        default="fp32",
        choices=ENCODER_PRECISION_CHOICES,
        help="fp32: SAM's encoder as it is; bf16 / fp16: its fast path (SDPA attention + autocast; "
        "embeddings within about 1%% of fp32), only fast where the device has that dtype natively "
        "(else emulated and slower than fp32: a warning says so); auto: bf16 where native, else fp32",
    )


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export-onnx",
        help="the prompt decoder (plug-ins included) as an ONNX file with SAM's inputs and outputs",
        description="Writes what segment-anything's scripts/export_onnx_model.py writes (same inputs, "
        "outputs, dynamic axes, opset and quantisation), with the Stable-SAM plug-ins in the graph.",
    )
    _add_model_flags(export)
    export.add_argument("--output", required=True, help="the .onnx file to write")
    export.add_argument("--quantize-out", help="also write a dynamically quantised (uint8) copy here")
    export.add_argument(
        "--opset", type=int, default=17, help="ONNX opset (>= 16 with the plug-ins; default 17)"
    )
    export.add_argument(
        "--return-single-mask", action="store_true", help="SAM's option: return only the best mask"
    )
    export.add_argument(
        "--alpha1",
        type=_unit_float,
        help="bake a fixed routing weight alpha = (A, 1 - A) into the file instead of DRP's (0 = SAM)",
    )
    export.add_argument(
        "--gelu-approximate", action="store_true", help="SAM's option: tanh GELU (runtimes without Erf)"
    )
    export.add_argument(
        "--use-stability-score",
        action="store_true",
        help="SAM's option: iou_predictions are the masks' stability scores",
    )
    export.set_defaults(func=_export_onnx)


def _add_amg_parser(sub: argparse._SubParsersAction) -> None:
    amg = sub.add_parser("amg", help="automatic masks of one image (segment-anything's generator)")
    amg.add_argument("image", help="image file (any format Pillow reads)")
    _add_model_flags(amg)
    amg.add_argument("--points-per-side", type=int, default=32, help="point grid side (SAM: 32 at 1024 px)")
    amg.add_argument("--pred-iou-thresh", type=float, default=0.88, help="keep masks scored above it")
    amg.add_argument("--stability-score-thresh", type=float, default=0.95, help="keep stabler masks")
    amg.add_argument("--out-dir", default=".", help="where to write <stem>_masks.json and <stem>_amg.png")
    _add_encoder_flags(amg)
    amg.set_defaults(func=_amg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stable-sam", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="segment one image with a box and/or clicks")
    predict.add_argument("image", help="image file (any format Pillow reads)")
    predict.add_argument(
        "--box",
        type=lambda s: _floats(s, 4, "--box"),
        help="x0,y0,x1,y1 in pixels; a box reaching over the border is clipped to the image "
        "(a negative x0 needs the = form: --box=-5,10,200,300)",
    )
    predict.add_argument(
        "--point",
        type=lambda s: _floats(s, 2, "--point"),
        action="append",
        default=[],
        help="x,y (repeatable)",
    )
    predict.add_argument(
        "--label",
        type=int,
        choices=(0, 1),
        action="append",
        default=[],
        help="label per --point (1 fg, 0 bg)",
    )
    _add_model_flags(predict)
    predict.add_argument("--multimask", action="store_true", help="3 candidate masks, keep the best scored")
    predict.add_argument(
        "--out-dir", default=".", help="where to write <stem>_mask.png and <stem>_overlay.png"
    )
    predict.add_argument(
        "--cache-dir", help="persist image embeddings here (repeated images skip the encoder)"
    )
    _add_encoder_flags(predict)
    predict.set_defaults(func=_predict)
    info = sub.add_parser(
        "info", help="trainable parameters of Stable-SAM on a SAM type, or of a plug-in file"
    )
    info.add_argument("--sam-type", default="vit_l", choices=SAM_TYPES)
    info.add_argument("--plugin", help="describe this plug-in checkpoint (its SAM type, config and counts)")
    info.set_defaults(func=_info)
    _add_amg_parser(sub)
    _add_export_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
