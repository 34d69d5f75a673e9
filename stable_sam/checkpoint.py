"""Self-describing plug-in checkpoints: only the trainable weights, plus what they belong to.

A checkpoint is a ``torch.save``d dict of plain containers and tensors, readable with
``torch.load(weights_only=True)``::

    format                  "stable-sam-plugin/1"
    state_dict              {parameter name: tensor} (trainable parameters only)
    plugin_config, tuning   the dataclasses as dicts
    sam_type                "vit_l", "small", ...
    sam_checkpoint_sha256   sha256 of the SAM checkpoint file, or None (random SAM weights)
    package_version         stable_sam.__version__ that wrote it
    num_parameters          total trainable parameter count
    extra                   free-form metadata from the writer (step, dataset version, ...)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic_write import atomic_open
from .config import PluginConfig, TuningConfig, config_from_dict, config_to_dict
from .modeling.stable_sam import StableSam

__all__ = [
    "PLUGIN_CHECKPOINT_FORMAT",
    "PluginCheckpoint",
    "SamCheckpointError",
    "atomic_torch_save",
    "file_sha256",
    "load_plugin_checkpoint",
    "read_plugin_checkpoint",
    "save_plugin_checkpoint",
]

PLUGIN_CHECKPOINT_FORMAT = "stable-sam-plugin/1"
_CONFIG_TYPES = {"plugin_config": PluginConfig, "tuning": TuningConfig}


class SamCheckpointError(ValueError):
    """A SAM or plug-in checkpoint that cannot be used with the requested model."""


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file, streamed (SAM checkpoints are up to 2.5 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file.

    The file gets the mode a plain ``open`` would give it (0o666 minus the umask).
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


@dataclass
class PluginCheckpoint:
    """A plug-in checkpoint as read from disk (see the module docstring for the fields)."""

    path: str
    state_dict: dict[str, torch.Tensor]
    plugin_config: PluginConfig
    tuning: TuningConfig
    sam_type: str
    sam_checkpoint_sha256: str | None
    package_version: str
    num_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)

    def check_config(self, key: str, given: Any) -> Any:
        """The stored config for ``key``; a differing explicitly given one is an error."""
        stored = getattr(self, key)
        if given is not None and config_to_dict(given) != config_to_dict(stored):
            diff = {
                k: (v, config_to_dict(stored)[k])
                for k, v in config_to_dict(given).items()
                if config_to_dict(stored)[k] != v
            }
            raise ValueError(f"{self.path}: {key} differs from the checkpoint's (given, stored): {diff}")
        return stored


def save_plugin_checkpoint(
    model: StableSam, path: str | os.PathLike, *, extra: dict[str, Any] | None = None
) -> None:
    """Write the model's trainable weights and its description to ``path`` (atomically)."""
    from . import __version__

    state = model.trainable_state_dict()
    payload = {
        "format": PLUGIN_CHECKPOINT_FORMAT,
        "state_dict": {k: v.cpu() for k, v in state.items()},
        "plugin_config": config_to_dict(model.plugin_config),
        "tuning": config_to_dict(model.tuning),
        "sam_type": model.sam_type,
        "sam_checkpoint_sha256": model.sam_checkpoint_sha256,
        "package_version": __version__,
        "num_parameters": sum(v.numel() for v in state.values()),
        "extra": dict(extra or {}),
    }
    atomic_torch_save(payload, path)


def read_plugin_checkpoint(path: str | os.PathLike) -> PluginCheckpoint:
    """Read and validate a plug-in checkpoint (``weights_only=True``); errors name the file."""

    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"plug-in checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated files raise a variety of types
        raise SamCheckpointError(
            f"cannot read plug-in checkpoint {path} ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != PLUGIN_CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = (
            " (it looks like a SAM checkpoint: pass it as the SAM checkpoint)"
            if _looks_like_sam(payload)
            else ""
        )
        raise SamCheckpointError(
            f"{path} is not a Stable-SAM plug-in checkpoint (format {found!r}, expected "
            f"{PLUGIN_CHECKPOINT_FORMAT!r}){hint}"
        )
    try:
        configs = {
            key: config_from_dict(cls, payload[key], where=f"{path}:{key}")
            for key, cls in _CONFIG_TYPES.items()
        }
        return PluginCheckpoint(
            path=str(path),
            state_dict=payload["state_dict"],
            sam_type=payload["sam_type"],
            sam_checkpoint_sha256=payload["sam_checkpoint_sha256"],
            package_version=payload["package_version"],
            num_parameters=payload["num_parameters"],
            extra=payload.get("extra", {}),
            **configs,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SamCheckpointError(f"{path}: malformed plug-in checkpoint: {err}") from err


def _looks_like_sam(payload: Any) -> bool:
    return isinstance(payload, dict) and any(str(k).startswith("image_encoder.") for k in payload)


def load_plugin_checkpoint(
    model: StableSam, checkpoint: PluginCheckpoint | str | os.PathLike
) -> PluginCheckpoint:
    """Load a plug-in checkpoint strictly onto ``model``.

    Errors (naming the file and both values) when the checkpoint was trained on another SAM type
    or another SAM checkpoint (sha256), or with another plug-in/tuning configuration.
    """

    ckpt = checkpoint if isinstance(checkpoint, PluginCheckpoint) else read_plugin_checkpoint(checkpoint)
    if ckpt.sam_type != model.sam_type:
        raise SamCheckpointError(
            f"{ckpt.path} was trained on a {ckpt.sam_type!r} SAM, this model is {model.sam_type!r}"
        )
    if ckpt.sam_checkpoint_sha256 != model.sam_checkpoint_sha256:
        raise SamCheckpointError(
            f"{ckpt.path} was trained on the SAM checkpoint with sha256 {ckpt.sam_checkpoint_sha256}, "
            f"this model's SAM checkpoint has sha256 {model.sam_checkpoint_sha256}"
        )
    for key in _CONFIG_TYPES:
        ours = getattr(model, "plugin_config" if key == "plugin_config" else "tuning")
        if config_to_dict(ours) != config_to_dict(getattr(ckpt, key)):
            raise SamCheckpointError(
                f"{ckpt.path}: {key} {config_to_dict(getattr(ckpt, key))} does not match the model's "
                f"{config_to_dict(ours)}"
            )
    try:
        model.load_trainable_state_dict(ckpt.state_dict, source=ckpt.path)
    except ValueError as err:
        raise SamCheckpointError(str(err)) from err
    return ckpt
