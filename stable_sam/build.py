"""Build SAM (registry + strict checkpoint) -> freeze -> attach plug-ins -> load plug-in weights.

Official architectures come from segment-anything's ``sam_model_registry``. Two small
configurations, built from the same segment-anything classes, serve the tests ("tiny") and the
offline default ("small", trained by the pipeline's ``train_base`` stage):

=======  ======  =====  =====================  =======  ====================  ==============
type     input   patch  encoder (dim/depth/h)  grid     decoder (dim/heads)   parameters
=======  ======  =====  =====================  =======  ====================  ==============
tiny     64      8      32 / 2 / 2             8 x 8    32 / 2, MLP 64        ~0.1 M
small    128     8      64 / 2 / 2             16 x 16  64 / 4, MLP 256       ~0.37 M
vit_b    1024    16     768 / 12 / 12          64 x 64  256 / 8, MLP 2048     93.7 M
=======  ======  =====  =====================  =======  ====================  ==============
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .checkpoint import SamCheckpointError, file_sha256, load_plugin_checkpoint, read_plugin_checkpoint
from .config import PluginConfig, TuningConfig
from .modeling.stable_sam import StableSam
from .precision import resolve_encoder_precision, warn_if_emulated

__all__ = [
    "OFFICIAL_SAM_TYPES",
    "SAM_TYPES",
    "SMALL_SAM_SPECS",
    "SamWeights",
    "SmallSamSpec",
    "build_sam",
    "build_stable_sam",
]

logger = logging.getLogger(__name__)

OFFICIAL_SAM_TYPES = ("vit_b", "vit_l", "vit_h")


@dataclass(frozen=True)
class SmallSamSpec:
    """A small SAM built from segment-anything's classes (sizes documented in the module docstring)."""

    img_size: int
    patch_size: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int
    decoder_heads: int
    decoder_mlp_dim: int
    mask_in_chans: int
    iou_head_hidden_dim: int

    def build(self) -> Sam:
        grid = self.img_size // self.patch_size
        return Sam(
            image_encoder=ImageEncoderViT(
                img_size=self.img_size,
                patch_size=self.patch_size,
                embed_dim=self.encoder_dim,
                depth=self.encoder_depth,
                num_heads=self.encoder_heads,
                mlp_ratio=4,
                out_chans=self.prompt_dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=self.window_size,
                global_attn_indexes=self.global_attn_indexes,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=self.prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(self.img_size, self.img_size),
                mask_in_chans=self.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2,
                    embedding_dim=self.prompt_dim,
                    mlp_dim=self.decoder_mlp_dim,
                    num_heads=self.decoder_heads,
                ),
                transformer_dim=self.prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=self.iou_head_hidden_dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )


SMALL_SAM_SPECS: dict[str, SmallSamSpec] = {
    "tiny": SmallSamSpec(
        img_size=64,
        patch_size=8,
        encoder_dim=32,
        encoder_depth=2,
        encoder_heads=2,
        window_size=4,
        global_attn_indexes=(1,),
        prompt_dim=32,
        decoder_heads=2,
        decoder_mlp_dim=64,
        mask_in_chans=8,
        iou_head_hidden_dim=32,
    ),
    "small": SmallSamSpec(
        img_size=128,
        patch_size=8,
        encoder_dim=64,
        encoder_depth=2,
        encoder_heads=2,
        window_size=8,
        global_attn_indexes=(1,),
        prompt_dim=64,
        decoder_heads=4,
        decoder_mlp_dim=256,
        mask_in_chans=16,
        iou_head_hidden_dim=64,
    ),
}

SAM_TYPES = (*OFFICIAL_SAM_TYPES, *SMALL_SAM_SPECS)


def _empty_sam(sam_type: str) -> Sam:
    if sam_type in OFFICIAL_SAM_TYPES:
        return sam_model_registry[sam_type]()
    if sam_type in SMALL_SAM_SPECS:
        return SMALL_SAM_SPECS[sam_type].build()
    raise ValueError(f"unknown SAM type {sam_type!r}; choose from {list(SAM_TYPES)}")


def _architecture_signature(state: dict[str, torch.Tensor]) -> tuple:
    """What tells SAM types apart: encoder width, depth, patch size and decoder width."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    decoder = state.get("mask_decoder.iou_token.weight")
    return (
        None if patch is None else tuple(patch.shape),
        len(blocks),
        None if decoder is None else tuple(decoder.shape),
    )


def _identify_sam_type(state: dict[str, torch.Tensor]) -> str | None:
    signature = _architecture_signature(state)
    for candidate in SAM_TYPES:
        with torch.device("meta"):
            reference = _empty_sam(candidate).state_dict()
        if _architecture_signature(reference) == signature:
            return candidate
    return None


def _describe(signature: tuple) -> str:
    patch, depth, decoder = signature
    width = "?" if patch is None else patch[0]
    return f"encoder width {width}, {depth} blocks, decoder width {'?' if decoder is None else decoder[1]}"


@dataclass(frozen=True)
class SamWeights:
    """A SAM checkpoint read and hashed once: its state dict, its file's sha256 and where it came from.

    A distributed job reads the (1.2-2.4 GB) file once on the driver and ships this to its workers
    (Ray's object store), so no worker re-reads or re-hashes it and no worker needs the driver's
    path: ``build_sam(sam_type, weights)`` takes it wherever a checkpoint path is taken.
    """

    state: dict[str, torch.Tensor]
    sha256: str
    source: str

    @classmethod
    def read(cls, checkpoint: str | os.PathLike) -> SamWeights:
        """Load ``checkpoint`` (official ``sam_vit_*.pth``, Meta's plain state dict, or one written by
        the ``train_base`` stage; a ``{"model": state}`` wrapper is unwrapped) and hash the file.

        Raises:
          SamCheckpointError: a missing, unreadable or corrupt file, or one that is not a state dict.
        """
        path = Path(checkpoint)
        if not path.is_file():
            raise SamCheckpointError(f"SAM checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            raise SamCheckpointError(
                f"cannot read SAM checkpoint {path} ({type(err).__name__}: {err}); the file is corrupt or "
                "not a torch state dict (an interrupted download? re-run the fetch stage)"
            ) from err
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SamCheckpointError(
                f"{path} is not a SAM state dict (a mapping of parameter names to tensors)"
            )
        return cls(state=state, sha256=file_sha256(path), source=str(path))


def build_sam(
    sam_type: str, checkpoint: str | os.PathLike | SamWeights | None = None
) -> tuple[Sam, str | None]:
    """A plain SAM of ``sam_type`` with its checkpoint loaded strictly.

    Args:
      sam_type: "vit_b", "vit_l", "vit_h", "small" or "tiny".
      checkpoint: a SAM state-dict file (official ``sam_vit_*.pth`` or one written by the
        ``train_base`` stage), or :class:`SamWeights` already read from one. None gives random
        weights (tests only).

    Returns:
      (sam in eval mode, sha256 of the checkpoint file or None).

    Raises:
      SamCheckpointError: unreadable/corrupt file, a checkpoint for another SAM type (the message
        names both), or keys that do not match.
    """
    sam = _empty_sam(sam_type)
    sam.eval()
    if checkpoint is None:
        return sam, None
    weights = checkpoint if isinstance(checkpoint, SamWeights) else SamWeights.read(checkpoint)
    state, path = weights.state, weights.source
    expected_signature = _architecture_signature(sam.state_dict())
    found_signature = _architecture_signature(state)
    if found_signature != expected_signature:
        found = _identify_sam_type(state)
        raise SamCheckpointError(
            f"{path} is a {found or 'unknown'} SAM checkpoint ({_describe(found_signature)}) but "
            f"sam_type={sam_type!r} was requested ({_describe(expected_signature)}); "
            f"set sam.type={found!r}" + ("" if found else " to the matching type")
        )
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SamCheckpointError(f"{path} does not match a {sam_type} SAM: {err}") from err
    return sam, weights.sha256


def build_stable_sam(
    *,
    sam_type: str,
    sam_checkpoint: str | os.PathLike | SamWeights | None = None,
    plugin_config: PluginConfig | None = None,
    tuning: TuningConfig | None = None,
    plugin_checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    encoder_precision: str = "fp32",
) -> StableSam:
    """Stable-SAM on a frozen SAM: registry -> strict SAM checkpoint -> freeze -> plug-ins -> weights.

    Args:
      sam_type: "vit_b", "vit_l", "vit_h" (official) or "small"/"tiny" (small configurations).
      sam_checkpoint: the SAM checkpoint, a path or :class:`SamWeights` read once (None: random
        weights, for tests).
      plugin_config: plug-in configuration; default: the one stored in ``plugin_checkpoint``,
        else :class:`PluginConfig` defaults. Giving one that disagrees with the checkpoint is an
        error.
      tuning: extra trainable parts (baselines); same rule as ``plugin_config``.
      plugin_checkpoint: a plug-in checkpoint written by :func:`save_plugin_checkpoint`, loaded
        strictly; its SAM type and SAM checkpoint hash must match.
      device: where to put the model.
      encoder_precision: "fp32" (segment-anything's encoder as it is) or the frozen encoder's fast
        path, "bf16" / "fp16" (:meth:`StableSam.set_encoder_precision`), or "auto": bf16 where
        ``device`` has native bf16, else fp32 (:func:`stable_sam.precision.resolve_encoder_precision`).
        An explicit bf16 / fp16 that ``device`` would emulate (far slower than fp32) logs a warning.
    """

    stored = None if plugin_checkpoint is None else read_plugin_checkpoint(plugin_checkpoint)
    if stored is not None:
        plugin_config = stored.check_config("plugin_config", plugin_config)
        tuning = stored.check_config("tuning", tuning)
    sam, sha = build_sam(sam_type, sam_checkpoint)
    model = StableSam(
        sam=sam,
        sam_type=sam_type,
        plugin_config=plugin_config or PluginConfig(),
        tuning=tuning or TuningConfig(),
        sam_checkpoint_sha256=sha,
    )
    if stored is not None:
        load_plugin_checkpoint(model, stored)
    logger.info(
        "Stable-SAM on %s: %s trainable parameters (%s)",
        sam_type,
        f"{model.num_trainable_parameters():,}",
        ", ".join(sorted({n.split(".")[-2] for n in model.trainable_parameter_names()})) or "none",
    )
    if device is not None:
        model.to(device)
    # The precision is chosen where the model runs ("auto"), and an emulated one is said out loud.
    precision = resolve_encoder_precision(
        encoder_precision, model.device, encoder_frozen=model.encoder_is_frozen
    )
    if precision != "fp32":
        warn_if_emulated(precision, model.device)
    model.set_encoder_precision(precision)
    return model
