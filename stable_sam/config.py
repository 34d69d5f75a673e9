"""The core's config dataclasses, the values each of their keys accepts, and how that is checked.

Only what a library user or a checkpoint needs lives here: :class:`PluginConfig` and
:class:`TuningConfig` (a model, and what its plug-in checkpoint records), :class:`OcclusionConfig`
(``stable_sam.occlusion``) and :class:`PromptMixConfig` (``stable_sam.training``). Their defaults
are the method spec's recommended ones (``stable_sam_method.md``, "Open choices"; the number in
brackets after a field is the row of that table it implements). The pipeline's own sections and
the root of ``params.yaml`` are declared in ``pipeline/params.py`` with the same validators; the
pipeline sets every key of these classes explicitly in ``params.yaml``.

What a key accepts is declared once, next to the key (``option(allowed, default)``). Enumerated
choices are the tuple constants below, which the modules that consume a choice import too, so a
bad value fails at :func:`check_config` (or when params load) with one :class:`ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AMPLITUDES",
    "COARSE_MASK_VALUES",
    "COUNT",
    "DECODER_TUNINGS",
    "DRP_TOKENS",
    "ENCODER_PRECISIONS",
    "ENCODER_TUNINGS",
    "EVAL_PROMPT_KIND",
    "EVAL_PROMPT_KINDS",
    "EVAL_RESIZE_MODES",
    "INITS",
    "NAME",
    "NON_NEGATIVE",
    "PADDING_MODES",
    "PLACEMENTS",
    "PLUGIN_VARIANTS",
    "POINT_COUNTS",
    "POSITIVE",
    "PROBABILITY",
    "REPLACE_MODES",
    "ROUTINGS",
    "ROUTING_NORMS",
    "SEED",
    "Allowed",
    "ConfigError",
    "OcclusionConfig",
    "PluginConfig",
    "PromptMixConfig",
    "Rule",
    "TuningConfig",
    "allows",
    "check_config",
    "config_from_dict",
    "config_to_dict",
    "integer",
    "is_eval_prompt_kind",
    "list_of",
    "nullable",
    "number",
    "one_of",
    "option",
    "ordered",
]

# ------------------------------------------------------------------------------------------------
# The enumerated choices (one declaration each; see the fields below for what they mean)

PLUGIN_VARIANTS = ("dsp", "spatial_attention", "none")
# Token-to-image attentions of SAM's two-way decoder (2 blocks for every SAM type) + the final one.
PLACEMENTS = ("block1", "block2", "final")
ROUTINGS = ("drp", "fixed")
ROUTING_NORMS = ("softmax", "sigmoid")
DRP_TOKENS = ("mask0", "iou", "mean_output")
AMPLITUDES = ("conv1x1", "conv1x1_modulated")
PADDING_MODES = ("border", "zeros", "reflection")
REPLACE_MODES = ("keys_values", "keys")
INITS = ("identity", "default")
DECODER_TUNINGS = ("frozen", "prediction_head", "full")
ENCODER_TUNINGS = ("frozen", "lora", "adapter")
# How a frozen image encoder runs (StableSam.encoder_precision): "fp32" is segment-anything's own code;
# "bf16" / "fp16" the fast path (SDPA attention + autocast to that dtype, embeddings back in float32).
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
COARSE_MASK_VALUES = ("hqsam", "logits")
# Resize conventions of stable_sam.data.prepare_eval_image (the evaluation's model frame).
EVAL_RESIZE_MODES = ("stretch", "longest_side")
# Evaluation prompt kinds besides "point_K" (K random clicks, K >= 1): stable_sam.prompts.sample_prompt.
EVAL_PROMPT_KINDS = ("gt_box", "noisy_box", "coarse_mask", "oracle_point")
_POINT_KIND = re.compile(r"point_([0-9]+)")


def is_eval_prompt_kind(kind: Any) -> bool:
    """Whether ``kind`` is a prompt kind the evaluation draws: one of EVAL_PROMPT_KINDS or point_K."""
    if not isinstance(kind, str):
        return False
    point = _POINT_KIND.fullmatch(kind)
    return kind in EVAL_PROMPT_KINDS or (point is not None and int(point.group(1)) >= 1)


# ------------------------------------------------------------------------------------------------
# What a field accepts


@dataclass(frozen=True)
class Allowed:
    """The values a config field accepts: a predicate, and the words that name them.

    ``shown`` picks what an error message shows of a rejected value (all of it by default).
    """

    accepts: Callable[[Any], bool]
    text: str
    shown: Callable[[Any], Any] = lambda value: value


def one_of(choices: tuple[str, ...]) -> Allowed:
    """One of the strings ``choices``."""
    return Allowed(
        lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(repr(c) for c in choices)
    )


def _is_number(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool):  # YAML's true/false are ints to Python, never numbers here
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def integer(minimum: int, *, maximum: int | None = None, odd: bool = False) -> Allowed:
    """An integer >= ``minimum`` (and <= ``maximum``; odd if ``odd``)."""

    def accepts(v: Any) -> bool:
        return (
            _is_number(v, integer=True)
            and v >= minimum
            and (maximum is None or v <= maximum)
            and (not odd or v % 2 == 1)
        )

    odd_word = "odd " if odd else ""
    text = (
        f"an {odd_word}integer >= {minimum}"
        if maximum is None
        else f"an {odd_word}integer in [{minimum}, {maximum}]"
    )
    return Allowed(accepts, text)


def number(
    *, above: float | None = None, minimum: float | None = None, maximum: float | None = None
) -> Allowed:
    """A finite number > ``above``, or in [``minimum``, ``maximum``] (either end may be open)."""

    def accepts(v: Any) -> bool:
        return (
            _is_number(v, integer=False)
            and (above is None or v > above)
            and (minimum is None or v >= minimum)
            and (maximum is None or v <= maximum)
        )

    if minimum is not None and maximum is not None:
        text = f"a number in [{minimum:g}, {maximum:g}]"
    elif above is not None:
        text = f"a number > {above:g}"
    else:
        text = f"a number >= {minimum:g}"
    return Allowed(accepts, text)


def nullable(allowed: Allowed) -> Allowed:
    """None, or what ``allowed`` accepts."""
    return Allowed(lambda v: v is None or allowed.accepts(v), f"null or {allowed.text}")


def list_of(item: Allowed, *, non_empty: bool = False, distinct: bool = False) -> Allowed:
    """A list whose every item ``item`` accepts."""

    def accepts(v: Any) -> bool:
        return (
            isinstance(v, (list, tuple))
            and (bool(v) or not non_empty)
            and (not distinct or len(set(map(repr, v))) == len(v))
            and all(item.accepts(x) for x in v)
        )

    words = ("non-empty " if non_empty else "") + "list" + (" of distinct values" if distinct else "")
    return Allowed(accepts, f"a {words}, each {item.text}")


PROBABILITY = number(minimum=0.0, maximum=1.0)
POSITIVE = number(above=0.0)
NON_NEGATIVE = number(minimum=0.0)
COUNT = integer(1)  # steps, sizes, workers, intervals: at least one
SEED = integer(0)  # numpy's SeedSequence takes non-negative integers only
NAME = Allowed(lambda v: isinstance(v, str) and v != "", "a non-empty string")
SHA256 = Allowed(
    lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
    "64 lowercase hex digits (a sha256)",
)
POINT_COUNTS = list_of(COUNT, non_empty=True)
EVAL_PROMPT_KIND = Allowed(
    is_eval_prompt_kind,
    "a prompt kind: " + ", ".join(repr(k) for k in EVAL_PROMPT_KINDS) + " or 'point_K' with K >= 1",
)


def option(allowed: Allowed, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that accepts ``allowed``, with a default or required (no ``default``)."""
    return field(default=default, metadata=allows(allowed))


def allows(allowed: Allowed) -> dict[str, Allowed]:
    """A field's metadata: what it accepts (``field(default_factory=..., metadata=allows(...))``)."""
    return {"allowed": allowed}


@dataclass(frozen=True)
class Rule:
    """A constraint between fields of one config: dotted paths below it, a predicate, its words.

    A config dataclass lists its rules in a ``rules`` class variable; :func:`check_config` checks
    them after the fields themselves.
    """

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    text: str


def ordered(low: str, high: str) -> Rule:
    """``low <= high``."""
    return Rule((low, high), lambda a, b: a <= b, f"{low} <= {high}")


# ------------------------------------------------------------------------------------------------
# The core's configs


@dataclass
class PluginConfig:
    """The Stable-SAM plug-ins (DSP + DRP) and every open choice the paper leaves to us.

    The defaults give 81,828 trainable parameters on a 256-dim SAM decoder (vit_b/l/h).
    """

    # What resamples the image features: "dsp" (deformable sampling), "spatial_attention"
    # (supplement Table 9: a sigmoid weight map on the amplitude features, no offsets) or
    # "none" (no plug-in at all: plain SAM, used by the LoRA/adapter baselines).
    variant: str = option(one_of(PLUGIN_VARIANTS), "dsp")
    # Where the plug-in sits [9]: token-to-image attention of "block2" (the paper), optionally
    # also "block1" and/or the "final" token-to-image attention. One DSP/DRP pair per site.
    placements: list[str] = field(
        default_factory=lambda: ["block2"], metadata=allows(list_of(one_of(PLACEMENTS), distinct=True))
    )
    # DRP [3]: "drp" (learned α from the output token) or "fixed" (α1 = fixed_alpha1, no DRP).
    routing: str = option(one_of(ROUTINGS), "drp")
    fixed_alpha1: float = option(PROBABILITY, 1.0)
    # α normalisation [3]: "softmax" over 2 logits (α1 + α2 = 1) or independent "sigmoid"s.
    routing_norm: str = option(one_of(ROUTING_NORMS), "softmax")
    # DRP input token t_o [1]: "mask0" (sequence index 1), "iou" (index 0) or "mean_output"
    # (mean of the iou token and the 4 mask tokens).
    drp_token: str = option(one_of(DRP_TOKENS), "mask0")
    drp_hidden: int = option(COUNT, 32)  # [2]
    # Offsets in feature pixels, Δp = offset_bound · tanh(raw) [5]; None = unbounded. 8 is the
    # spec's value for SAM's 64x64 feature grid (vit_*).
    offset_bound: float | None = option(nullable(POSITIVE), 8.0)
    # [7] channel groups with their own offsets (DAT-style); must divide the decoder width.
    offset_groups: int = option(COUNT, 1)
    offset_kernel: int = option(integer(1, odd=True), 5)  # depthwise conv of the offset network
    offset_bias: bool = True  # [12] bias of the last 1x1 conv of the offset network
    # Amplitude [4]: "conv1x1" (x_p* = Conv1x1(x_p), sample from x_p*) or "conv1x1_modulated"
    # (plus a DCNv2-style per-location modulation 2·sigmoid(m), 1 at init).
    amplitude: str = option(one_of(AMPLITUDES), "conv1x1")
    # [6] grid_sample padding: "border", "zeros" or "reflection"
    padding_mode: str = option(one_of(PADDING_MODES), "border")
    resample_pe: bool = False  # [8] resample the key PE at p + Δp instead of the regular grid
    # [10] "keys_values" or "keys" (values stay the regular x_p)
    replace: str = option(one_of(REPLACE_MODES), "keys_values")
    # [11] "identity": amplitude conv = I, last offset conv = 0, last DRP layer = 0, so
    # Stable-SAM equals SAM at step 0; "default": PyTorch's initialisers everywhere.
    init: str = option(one_of(INITS), "identity")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("variant", "placements"),
            lambda variant, placements: variant == "none" or bool(placements),
            "at least one placement (e.g. [block2]) unless variant is 'none'",
        ),
    )


@dataclass
class TuningConfig:
    """What else is trained besides the plug-in (baselines and the Table 9 variants)."""

    # "frozen" (Stable-SAM), "prediction_head" (the hypernetwork MLP of the single-mask output:
    # "SAM's prediction layer" of the LoRA/adapter baselines) or "full" (the mask decoder, Table
    # 9). Parts the single-mask loss never reaches (multimask hypernetworks, IoU head) stay frozen.
    decoder: str = option(one_of(DECODER_TUNINGS), "frozen")
    # "frozen", "lora" (rank lora_rank on both FFN linears of every ViT block) or "adapter"
    # (AdaptFormer bottleneck adapter_dim in parallel to every FFN).
    encoder: str = option(one_of(ENCODER_TUNINGS), "frozen")
    lora_rank: int = option(COUNT, 4)
    adapter_dim: int = option(COUNT, 64)


@dataclass
class OcclusionConfig:
    """Occlusion synthesis (supplement, "Occlusion Image Synthesis") [16]."""

    probability: float = option(PROBABILITY, 0.5)
    # occluder longest side / occludee box longest side
    occluder_min_scale: float = option(POSITIVE, 0.2)
    occluder_max_scale: float = option(POSITIVE, 0.8)
    # below this the occludee counts as fully occluded
    min_visible_fraction: float = option(PROBABILITY, 0.1)
    max_tries: int = option(COUNT, 10)
    copies: int = option(COUNT, 1)  # synthesised variants per training image
    seed: int = option(SEED, 0)
    num_examples: int = option(integer(0), 4)  # before/after pairs in the synthesize stage's examples.png

    rules: ClassVar[tuple[Rule, ...]] = (ordered("occluder_min_scale", "occluder_max_scale"),)


@dataclass
class PromptMixConfig:
    """Mixture of training prompt types (one prompt per image per step) [13]."""

    gt_box: float = option(NON_NEGATIVE, 1.0)
    noisy_box: float = option(NON_NEGATIVE, 1.0)
    points: float = option(NON_NEGATIVE, 1.0)
    coarse_mask: float = option(NON_NEGATIVE, 1.0)
    point_counts: list[int] = field(default_factory=lambda: [1, 3, 5, 10], metadata=allows(POINT_COUNTS))
    noise_scale: float = option(NON_NEGATIVE, 0.4)
    min_box_iou: float = option(PROBABILITY, 0.5)
    # [15] "hqsam": coarse masks fed as {0, 255} like HQ-SAM; "logits": mapped to ±logit_scale.
    coarse_mask_values: str = option(one_of(COARSE_MASK_VALUES), "hqsam")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("gt_box", "noisy_box", "points", "coarse_mask"),
            lambda *weights: sum(weights) > 0,
            "at least one prompt weight > 0",
        ),
    )


# ------------------------------------------------------------------------------------------------
# The check, and plain-dict round trips


class ConfigError(ValueError):
    """A config value outside what its key accepts.

    Attributes:
      values: full dotted key -> the offending value (several keys for a constraint between them).
      allowed: what is allowed, in words.
    """

    def __init__(self, values: dict[str, Any], allowed: str) -> None:
        self.values = values
        self.allowed = allowed
        shown = ", ".join(f"{key} = {_show(value)}" for key, value in values.items())
        super().__init__(f"{shown}: must be {allowed}" if len(values) == 1 else f"{shown}: need {allowed}")


def _show(value: Any) -> str:
    """A value as YAML would write it (null, true, 'text', [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def check_config(config: Any, where: str = "") -> None:
    """Check every field of a config dataclass (and the ones nested in it) against its declaration.

    Args:
      config: a config instance (:class:`PluginConfig`, ``pipeline.params.Params``, ...).
      where: the dotted key of ``config`` itself ("plugin" for ``params.plugin``), which prefixes
        the keys in the error message.

    Raises:
      ConfigError: at the first value that is not allowed, naming its full key, the value and what
        is allowed; then at the first of the config's ``rules`` that does not hold.
    """
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = f.metadata.get("allowed")
        if allowed is not None and not allowed.accepts(value):
            raise ConfigError({prefix + f.name: allowed.shown(value)}, allowed.text)
        if dataclasses.is_dataclass(value):
            check_config(value, prefix + f.name)
    for rule in getattr(config, "rules", ()):
        values = [_get(config, key) for key in rule.keys]
        if not rule.holds(*values):
            raise ConfigError({prefix + key: value for key, value in zip(rule.keys, values)}, rule.text)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass instance as plain nested dicts/lists (JSON- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict[str, Any], *, where: str = "config") -> Any:
    """Rebuild a (possibly nested) config dataclass strictly: unknown keys are an error.

    Keys a dict lacks take the field's default (a plug-in checkpoint written before a field
    existed); a field without a default must be there.

    Args:
      cls: the dataclass type.
      values: a dict as written by ``config_to_dict``.
      where: a label used in error messages (a file name, a checkpoint path).
    """
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            value = config_from_dict(hints[name], value, where=f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field the dict lacks
        raise ValueError(f"{where}: {err}") from None
