"""What the evaluation stages read: the evaluation sets, the models and the embedding cache.

``embed``, ``evaluate`` and ``ablate`` share it, so they always agree on

- the images: every ``data.val`` entry with HQSeg-style GT (:func:`hq_sets`) or COCO instance
  annotations (:func:`coco_sets`), brought to the model frame ``CHUNK`` images at a time with
  the set's resize (:func:`set_resize`: the same mode for the embedding cache's key and the
  decoding, so a set's embeddings are found by every stage);
- the model of a stage: the frozen SAM the ``base`` stage points at, with or without a plug-in
  checkpoint, on ``eval.device`` (:func:`sam_model`);
- for evaluate and ablate, how SAM and Stable-SAM come out of one plug-in checkpoint
  (:func:`model_passes`) and how a pass reads the embedding cache and decodes the prompt protocol
  (:func:`embed_pass`, :func:`evaluate_pass`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stable_sam import data as data_lib
from stable_sam.build import OFFICIAL_SAM_TYPES, build_stable_sam
from stable_sam.config import PluginConfig
from stable_sam.embedding_cache import ReadOnlyEmbeddingCache
from stable_sam.evaluation import (
    CocoImage,
    PreparedImage,
    embed_images,
    evaluate_prompts,
    prepare_coco_image,
    prepare_image,
)
from stable_sam.modeling import StableSam

from .effect import BASELINE, MODEL
from .params import EVAL_RESIZE_AUTO, EvalConfig, Params
from .raw_data import RawManifest
from .sam_source import SamSource, read_sam_source

__all__ = [
    "CHUNK",
    "COCO_ONLY",
    "PLUGIN_FILE",
    "DeviceError",
    "ModelPass",
    "coco_chunks",
    "coco_files",
    "coco_sets",
    "display_name",
    "embed_pass",
    "evaluate_pass",
    "hq_chunks",
    "hq_sets",
    "model_passes",
    "resolve_device",
    "sam_model",
    "set_resize",
    "set_threads",
    "spec_of",
]

# Images prepared (and held in memory) at a time: HQ images are up to 4K, so sets are streamed.
CHUNK = 32
# Evaluation sets that only have COCO instance annotations (no HQSeg-style GT folder).
COCO_ONLY = ("coco_val2017",)
PLUGIN_FILE = "plugin.pt"


# ------------------------------------------------------------------------------------------------
# The evaluation sets


def display_name(spec: str) -> str:
    """How a ``data.val`` entry is named in tables: the registered name, or a folder's name."""
    return spec if spec in data_lib.DATASETS else Path(spec).name


def spec_of(params: Params, name: str) -> str:
    """The ``data.val`` entry shown as ``name``."""
    return next(spec for spec in params.data.val if display_name(spec) == name)


def set_resize(setting: str | Mapping[str, str], spec: str) -> str:
    """The resize mode of evaluation set ``spec`` (an entry of ``data.val``, ``interactive.sets``)
    under ``data.eval_resize`` = ``setting``.

    A mode ("stretch" or "longest_side") is every set's; "auto", and a set that a mapping of set
    names (as :func:`display_name` shows them) to modes does not name, take the set's protocol
    (:func:`stable_sam.data.protocol_resize`: stretch like HQ-SAM's evaluation for the HQ sets,
    the embedded set and folders; longest_side like SAM's and HQ-SAM's COCO protocols for
    coco_val2017).
    """
    if isinstance(setting, Mapping):
        setting = setting.get(display_name(spec), EVAL_RESIZE_AUTO)
    return data_lib.protocol_resize(spec) if setting == EVAL_RESIZE_AUTO else setting


def hq_sets(params: Params, raw: RawManifest) -> list[tuple[str, data_lib.SegmentationFolder, str]]:
    """(name, dataset, resize) of every ``data.val`` entry with HQSeg-style GT (one target per image)."""
    return [
        (display_name(spec), raw.open_dataset(spec, split="val"), set_resize(params.data.eval_resize, spec))
        for spec in params.data.val
        if spec not in COCO_ONLY
    ]


def coco_files(raw: RawManifest, spec: str) -> tuple[Path, Path] | None:
    """(images folder, instances JSON) of a ``data.val`` entry with COCO annotations, else None.

    ``coco_val2017``: ``val2017/`` + ``annotations/instances_val2017.json`` under its root; the
    embedded set: ``<root>/val/im`` + ``<root>/val/instances.json`` (all objects of each scene);
    a folder: ``im/`` + ``instances.json`` in it (or in its ``val/``).
    """
    if spec == "coco_val2017":
        return data_lib.coco_paths(raw.dataset_root(spec))
    if spec in data_lib.DATASETS:
        if data_lib.dataset_family(spec) != "embedded":
            return None
        base = raw.dataset_root(spec) / "val"
    else:
        base = Path(spec)
        if not (base / "instances.json").is_file() and (base / "val" / "instances.json").is_file():
            base = base / "val"
    images, annotations = base / "im", base / "instances.json"
    return (images, annotations) if annotations.is_file() and images.is_dir() else None


def coco_sets(params: Params, raw: RawManifest) -> list[tuple[str, data_lib.CocoInstances, str]]:
    """(name, COCO instances, resize) of every ``data.val`` entry with a COCO annotation file
    (the resize is the set's, as for its HQ view: :func:`set_resize`)."""
    found = []
    for spec in params.data.val:
        files = coco_files(raw, spec)
        if files is not None:
            coco = data_lib.CocoInstances(*files, max_images=params.eval.coco_max_images)
            found.append((display_name(spec), coco, set_resize(params.data.eval_resize, spec)))
    return found


def hq_chunks(
    dataset: data_lib.SegmentationFolder, *, resize: str, image_size: int, chunk: int = CHUNK
) -> Iterator[list[PreparedImage]]:
    """The dataset's images in the model frame, ``chunk`` at a time (index = position in the set)."""
    for start in range(0, len(dataset), chunk):
        yield [
            prepare_image(dataset[i], index=i, resize=resize, image_size=image_size)
            for i in range(start, min(start + chunk, len(dataset)))
        ]


def coco_chunks(
    coco: data_lib.CocoInstances, *, resize: str, image_size: int, chunk: int = CHUNK
) -> Iterator[list[CocoImage]]:
    """The COCO images with their instances in the model frame, ``chunk`` at a time."""
    for start in range(0, len(coco), chunk):
        yield [
            prepare_coco_image(coco[i], index=i, resize=resize, image_size=image_size)
            for i in range(start, min(start + chunk, len(coco)))
        ]


# ------------------------------------------------------------------------------------------------
# The models


class DeviceError(RuntimeError):
    """The requested device is not there, or an official SAM would run on the CPU by accident."""


def resolve_device(choice: str, sam_type: str) -> str:
    """``eval.device`` for a model: "auto" is the GPU if any, else the CPU for small SAMs only."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("eval.device=cuda, but torch sees no CUDA device")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if sam_type in OFFICIAL_SAM_TYPES:
        raise DeviceError(
            f"no GPU for the {sam_type} SAM: its image encoder takes minutes per image on a CPU "
            "(days for an evaluation set). Run on a GPU node, or set eval.device=cpu to use the CPU anyway"
        )
    return "cpu"


def sam_model(
    source: SamSource,
    *,
    plugin_checkpoint: Path | None = None,
    device: str = "auto",
    encoder_precision: str = "fp32",
) -> StableSam:
    """The model of a stage: the frozen SAM of ``source``, with the plug-in checkpoint if given.

    Without a checkpoint the model has no plug-in at all (plain SAM, for the encoder or as the
    baseline of variants that change SAM's own weights). ``device``: ``eval.device``, see
    :func:`resolve_device` (the evaluation code moves embeddings and prompts to the model's device).
    ``encoder_precision``: ``sam.encoder_precision`` (the frozen encoder's fast path, which also
    keys the embedding cache, so every stage of one run must pass the same value).
    """
    model = build_stable_sam(
        sam_type=source.sam_type,
        sam_checkpoint=source.checkpoint,
        plugin_config=None if plugin_checkpoint is not None else PluginConfig(variant="none"),
        plugin_checkpoint=plugin_checkpoint,
        device=resolve_device(device, source.sam_type),
        encoder_precision=encoder_precision,
    )
    if model.sam_checkpoint_sha256 != source.sha256:
        raise RuntimeError(f"{source.checkpoint} changed since the base stage hashed it ({source.sha256})")
    return model.eval()


def set_threads(threads: int | None) -> None:
    """torch CPU threads for a decoder-bound stage (see ``eval.threads``)."""
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))


@dataclass
class ModelPass:
    """One model and the settings evaluated on it (name -> context-manager factory)."""

    model: StableSam
    settings: dict[str, Callable[[], Any]]
    embedded: int = field(default=0)  # images this model embedded itself (encoder tuned)


def model_passes(
    base: Path, plugin_dir: Path, *, device: str = "auto", encoder_precision: str = "fp32"
) -> tuple[list[ModelPass], str]:
    """The models that produce the "sam" and "stable_sam" settings, and how the baseline is made.

    A checkpoint that trains nothing of SAM itself gives one model evaluated twice: plug-ins off
    ("sam") and on ("stable_sam"). One that also changed SAM's weights (tuning.decoder or
    tuning.encoder not frozen) gets a separate plain SAM as its baseline. ``device`` and
    ``encoder_precision``: see :func:`sam_model`.
    """
    source = read_sam_source(base)
    model = sam_model(
        source, plugin_checkpoint=plugin_dir / PLUGIN_FILE, device=device, encoder_precision=encoder_precision
    )
    tuning = model.tuning
    if tuning.decoder == "frozen" and tuning.encoder == "frozen":
        return (
            [ModelPass(model, {BASELINE: model.plugins_disabled, MODEL: contextlib.nullcontext})],
            "same model with the plug-ins disabled",
        )
    vanilla = sam_model(source, device=device, encoder_precision=encoder_precision)
    how = (
        f"a separate plain SAM (the checkpoint tunes decoder={tuning.decoder}, encoder={tuning.encoder}, "
        "so plug-ins off is not SAM)"
    )
    return [
        ModelPass(vanilla, {BASELINE: contextlib.nullcontext}),
        ModelPass(model, {MODEL: contextlib.nullcontext}),
    ], how


def embed_pass(
    p: ModelPass, images: Sequence[PreparedImage], cache: ReadOnlyEmbeddingCache, *, batch_size: int = 8
) -> list[torch.Tensor]:
    """The images' embeddings for one pass: from the cache, or computed when its encoder is tuned."""
    if not p.model.encoder_is_frozen:
        p.embedded += len(images)
    return embed_images(p.model, images, cache=cache, progress=False, batch_size=batch_size)


def evaluate_pass(
    p: ModelPass,
    images: Sequence[PreparedImage],
    embeddings: Sequence[torch.Tensor],
    cfg: EvalConfig,
    *,
    kinds: Sequence[str],
    dataset: str,
    draws: int,
    draw_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per-image records of one model pass over ``images`` under the evaluation config's prompt
    settings (noise scale, box IoU floor, multimask, seed): the evaluate stage and the sweeps share it."""
    return evaluate_prompts(
        p.model,
        images,
        embeddings,
        kinds=kinds,
        draws=draws,
        draw_ids=draw_ids,
        seed=cfg.seed,
        settings=p.settings,
        noise_scale=cfg.noise_scale,
        min_iou=cfg.min_box_iou,
        multimask_output=cfg.multimask_output,
        dataset=dataset,
        progress=False,
    )
