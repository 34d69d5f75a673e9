"""Stable-SAM modules: the plug-ins, the seam they attach through, the wrapper around ``Sam``, and
the frozen encoder's fast attention."""

from .deformable_sampling import DeformableSamplingPlugin, SampledFeatures, SpatialAttentionPlugin
from .dynamic_routing import DynamicRoutingPlugin, FixedRouting
from .encoder_tuning import FfnAdapter, LoRALinear
from .fast_attention import FastAttention
from .plugged_attention import OutputTokenReader, PluggedTokenToImageAttention
from .stable_sam import DecoderOutput, PromptTensors, StableSam, plugin_sites

__all__ = [
    "DecoderOutput",
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "FastAttention",
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
