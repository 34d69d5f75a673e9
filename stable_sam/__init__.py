"""Stable-SAM: deformable sampling and dynamic routing plug-ins on a frozen Segment Anything Model.

The core is plain PyTorch: it never imports dvc, ray, mlflow or omegaconf.
"""

__version__ = "0.1.0"

from .build import build_sam, build_stable_sam
from .checkpoint import load_plugin_checkpoint, read_plugin_checkpoint, save_plugin_checkpoint
from .config import PluginConfig, TuningConfig
from .embedding_cache import EmbeddingCache
from .modeling import StableSam
from .predictor import StableSamPredictor

__all__ = [
    "EmbeddingCache",
    "PluginConfig",
    "StableSam",
    "StableSamPredictor",
    "TuningConfig",
    "__version__",
    "build_sam",
    "build_stable_sam",
    "load_plugin_checkpoint",
    "read_plugin_checkpoint",
    "save_plugin_checkpoint",
]
