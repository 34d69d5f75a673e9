"""Stable-SAM modules: the plug-ins, the seam they attach through, and the wrapper around ``Sam``."""

from .deformable_sampling import DeformableSamplingPlugin, SampledFeatures, SpatialAttentionPlugin
from .dynamic_routing import DynamicRoutingPlugin, FixedRouting
from .encoder_tuning import FfnAdapter, LoRALinear
from .plugged_attention import OutputTokenReader, PluggedTokenToImageAttention
from .stable_sam import DecoderOutput, PromptTensors, StableSam, plugin_sites

__all__ = [
    "DecoderOutput",
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "FfnAdapter",
    "FixedRouting",
    "LoRALinear",
    "OutputTokenReader",
    "PluggedTokenToImageAttention",
    "PromptTensors",
    "SampledFeatures",
    "SpatialAttentionPlugin",
    "StableSam",
    "plugin_sites",
]
