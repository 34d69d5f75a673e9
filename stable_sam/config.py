"""Plain dataclasses for every section of ``params.yaml``, and the values each key accepts.

The core never imports omegaconf: ``pipeline.params`` merges ``params.yaml`` onto these
dataclasses (so unknown keys and wrong types fail loudly), checks every value with
:func:`check_config` and hands the resulting instances to the core. Every default here is the
recommended default of the method spec (``stable_sam_method.md``, "Open choices"); the number in
brackets after a field is the row of that table it implements.

What a key accepts is declared once, next to the key (``_field(default, allowed)``): the
enumerated choices are the tuple constants below, which the modules that consume a choice and the
params loader both use, so a bad value fails when params load, before any work, with one message
naming the key, the value and what is allowed (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AMPLITUDES",
    "COARSE_MASK_VALUES",
    "DECODER_TUNINGS",
    "DRP_TOKENS",
    "ENCODER_TUNINGS",
    "EVAL_PROMPT_KINDS",
    "EVAL_RESIZE_MODES",
    "FETCH_SOURCES",
    "FETCH_VALIDATIONS",
    "INITS",
    "PADDING_MODES",
    "PLACEMENTS",
    "PLUGIN_VARIANTS",
    "REPLACE_MODES",
    "ROUTINGS",
    "ROUTING_NORMS",
    "SAM_TYPES",
    "VARIANT_NAME",
    "AblateConfig",
    "Allowed",
    "BaseTrainConfig",
    "ConfigError",
    "DataConfig",
    "EmbeddedConfig",
    "EvalConfig",
    "FetchConfig",
    "OcclusionConfig",
    "Params",
    "PluginConfig",
    "PromptMixConfig",
    "RayConfig",
    "SamConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuningConfig",
    "check_config",
    "config_from_dict",
    "config_to_dict",
    "is_eval_prompt_kind",
]

# ------------------------------------------------------------------------------------------------
# The enumerated choices (one declaration each; see the fields below for what they mean)

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "small", "tiny")  # stable_sam.build: official + small specs
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
FETCH_SOURCES = ("embedded", "remote", "local")
FETCH_VALIDATIONS = ("full", "header")
EVAL_RESIZE_MODES = ("stretch", "longest_side")
COARSE_MASK_VALUES = ("hqsam", "logits")
# Evaluation prompt kinds besides "point_K" (K random clicks, K >= 1): stable_sam.prompts.sample_prompt.
EVAL_PROMPT_KINDS = ("gt_box", "noisy_box", "coarse_mask", "oracle_point")
_POINT_KIND = re.compile(r"point_([0-9]+)")
# Names of trained variants (ablate.variants): DVC pastes them into commands and paths.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_]+")


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


def _one_of(choices: tuple[str, ...]) -> Allowed:
    return Allowed(
        lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(repr(c) for c in choices)
    )


def _is_number(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _integer(minimum: int, *, maximum: int | None = None, odd: bool = False) -> Allowed:
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


def _number(
    *, above: float | None = None, minimum: float | None = None, maximum: float | None = None
) -> Allowed:
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


def _nullable(allowed: Allowed) -> Allowed:
    return Allowed(lambda v: v is None or allowed.accepts(v), f"null or {allowed.text}")


def _list_of(item: Allowed, *, non_empty: bool = False, distinct: bool = False) -> Allowed:
    def accepts(v: Any) -> bool:
        return (
            isinstance(v, (list, tuple))
            and (bool(v) or not non_empty)
            and (not distinct or len(set(map(repr, v))) == len(v))
            and all(item.accepts(x) for x in v)
        )

    words = ("non-empty " if non_empty else "") + "list" + (" of distinct values" if distinct else "")
    return Allowed(accepts, f"a {words}, each {item.text}")


_PROBABILITY = _number(minimum=0.0, maximum=1.0)
_POSITIVE = _number(above=0.0)
_NON_NEGATIVE = _number(minimum=0.0)
_COUNT = _integer(1)  # steps, sizes, workers, intervals: at least one
_SEED = _integer(0)  # numpy's SeedSequence takes non-negative integers only
_NAME = Allowed(lambda v: isinstance(v, str) and v != "", "a non-empty string")
_NAMES = _list_of(_NAME, non_empty=True)
_POINT_COUNTS = _list_of(_COUNT, non_empty=True)
_SHA256 = Allowed(
    lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
    "null or 64 lowercase hex digits (a sha256)",
)
_PROMPT_KIND = Allowed(
    is_eval_prompt_kind,
    "a prompt kind: " + ", ".join(repr(k) for k in EVAL_PROMPT_KINDS) + " or 'point_K' with K >= 1",
)
_VARIANT_MAP = Allowed(
    lambda v: (
        isinstance(v, Mapping)
        and all(isinstance(k, str) and VARIANT_NAME.fullmatch(k) for k in v)
        and all(isinstance(o, Mapping) for o in v.values())
    ),
    "a mapping of names matching [A-Za-z0-9_]+ to {params key: value} overrides",
    shown=lambda v: list(v) if isinstance(v, Mapping) else v,  # the names, not every override
)


def _field(default: Any, allowed: Allowed) -> Any:
    return field(default=default, metadata=_allows(allowed))


def _allows(allowed: Allowed) -> dict[str, Allowed]:
    """A field's metadata: what it accepts (for fields with a default factory)."""
    return {"allowed": allowed}


@dataclass
class PluginConfig:
    """The Stable-SAM plug-ins (DSP + DRP) and every open choice the paper leaves to us.

    The defaults give 81,828 trainable parameters on a 256-dim SAM decoder (vit_b/l/h).
    """

    # What resamples the image features: "dsp" (deformable sampling), "spatial_attention"
    # (supplement Table 9: a sigmoid weight map on the amplitude features, no offsets) or
    # "none" (no plug-in at all: plain SAM, used by the LoRA/adapter baselines).
    variant: str = _field("dsp", _one_of(PLUGIN_VARIANTS))
    # Where the plug-in sits [9]: token-to-image attention of "block2" (the paper), optionally
    # also "block1" and/or the "final" token-to-image attention. One DSP/DRP pair per site.
    placements: list[str] = field(
        default_factory=lambda: ["block2"], metadata=_allows(_list_of(_one_of(PLACEMENTS), distinct=True))
    )
    # DRP [3]: "drp" (learned α from the output token) or "fixed" (α1 = fixed_alpha1, no DRP).
    routing: str = _field("drp", _one_of(ROUTINGS))
    fixed_alpha1: float = _field(1.0, _PROBABILITY)
    # α normalisation [3]: "softmax" over 2 logits (α1 + α2 = 1) or independent "sigmoid"s.
    routing_norm: str = _field("softmax", _one_of(ROUTING_NORMS))
    # DRP input token t_o [1]: "mask0" (sequence index 1), "iou" (index 0) or "mean_output"
    # (mean of the iou token and the 4 mask tokens).
    drp_token: str = _field("mask0", _one_of(DRP_TOKENS))
    drp_hidden: int = _field(32, _COUNT)  # [2]
    # Offsets in feature pixels, Δp = offset_bound · tanh(raw) [5]; None = unbounded.
    offset_bound: float | None = _field(8.0, _nullable(_POSITIVE))
    # [7] channel groups with their own offsets (DAT-style); must divide the decoder width.
    offset_groups: int = _field(1, _COUNT)
    offset_kernel: int = _field(5, _integer(1, odd=True))  # depthwise conv of the offset network
    offset_bias: bool = True  # [12] bias of the last 1x1 conv of the offset network
    # Amplitude [4]: "conv1x1" (x_p* = Conv1x1(x_p), sample from x_p*) or "conv1x1_modulated"
    # (plus a DCNv2-style per-location modulation 2·sigmoid(m), 1 at init).
    amplitude: str = _field("conv1x1", _one_of(AMPLITUDES))
    # [6] grid_sample padding: "border", "zeros" or "reflection"
    padding_mode: str = _field("border", _one_of(PADDING_MODES))
    resample_pe: bool = False  # [8] resample the key PE at p + Δp instead of the regular grid
    # [10] "keys_values" or "keys" (values stay the regular x_p)
    replace: str = _field("keys_values", _one_of(REPLACE_MODES))
    # [11] "identity": amplitude conv = I, last offset conv = 0, last DRP layer = 0, so
    # Stable-SAM equals SAM at step 0; "default": PyTorch's initialisers everywhere.
    init: str = _field("identity", _one_of(INITS))


@dataclass
class TuningConfig:
    """What else is trained besides the plug-in (baselines and the Table 9 variants)."""

    # "frozen" (Stable-SAM), "prediction_head" (the hypernetwork MLP of the single-mask output:
    # "SAM's prediction layer" of the LoRA/adapter baselines) or "full" (the mask decoder, Table
    # 9). Parts the single-mask loss never reaches (multimask hypernetworks, IoU head) stay frozen.
    decoder: str = _field("frozen", _one_of(DECODER_TUNINGS))
    # "frozen", "lora" (rank lora_rank on both FFN linears of every ViT block) or "adapter"
    # (AdaptFormer bottleneck adapter_dim in parallel to every FFN).
    encoder: str = _field("frozen", _one_of(ENCODER_TUNINGS))
    lora_rank: int = _field(4, _COUNT)
    adapter_dim: int = _field(64, _COUNT)


@dataclass
class SamConfig:
    """Which SAM the plug-ins attach to."""

    # "vit_b", "vit_l", "vit_h" (official architectures) or "small" / "tiny" (small
    # configurations built from segment-anything's classes; see stable_sam.build).
    type: str = _field("small", _one_of(SAM_TYPES))
    # A SAM checkpoint: official (vit_*) or the released small base (base/release/). None: the
    # fetched official checkpoint (vit_*); tests use random weights.
    checkpoint: str | None = None
    # The checkpoint's pinned sha256 (the released base's); checked by the base stage. None: not pinned.
    sha256: str | None = field(default=None, metadata=_allows(_SHA256))


@dataclass
class FetchConfig:
    """What the fetch stage gets, and from where."""

    # "embedded": generate the offline dataset; "remote": download from the manifest URLs;
    # "local": verify files the user already has under local_root (nothing is downloaded).
    source: str = _field("embedded", _one_of(FETCH_SOURCES))
    # Manifest entries to fetch (see pipeline/manifest.json), e.g. ["sam_vit_l", "hqseg44k"].
    items: list[str] = field(default_factory=list, metadata=_allows(_list_of(_NAME)))
    local_root: str | None = None
    timeout_s: float = _field(60.0, _POSITIVE)
    retries: int = _field(3, _integer(0))
    # Manifest items whose sha256 is not published (``"sha256": null``) are refused unless
    # listed here; the first download's hash is then pinned (<downloads>/<file>.sha256, and
    # data/raw/manifest.json) and every later run verifies against it.
    trust_unverified: list[str] = field(default_factory=list, metadata=_allows(_list_of(_NAME)))
    keep_archives: bool = False  # keep the zips after a verified extraction
    # How the fetched datasets are checked: "full" decodes every pair once (bad files are
    # recorded in the raw-data manifest and skipped by later stages), "header" reads headers.
    validate: str = _field("full", _one_of(FETCH_VALIDATIONS))


@dataclass
class EmbeddedConfig:
    """The procedurally generated offline dataset (HQSeg folder layout)."""

    num_train: int = _field(320, _COUNT)
    num_val: int = _field(64, _COUNT)
    image_size: int = _field(128, _integer(16))
    # Objects per image (instance ids are 8-bit).
    min_objects: int = _field(2, _integer(1, maximum=255))
    max_objects: int = _field(5, _integer(1, maximum=255))
    seed: int = _field(0, _SEED)


@dataclass
class DataConfig:
    """Which datasets the training and evaluation stages read."""

    # Dataset names: "embedded" (offline default), "hqseg44k" (the 7 train folders),
    # "DIS-VD", "COIFT", "HR-SOD", "ThinObject5K-TE", "coco_val2017", or a path to any folder
    # in the HQSeg layout (im/*.jpg + gt/*.png).
    train: list[str] = field(default_factory=lambda: ["embedded"], metadata=_allows(_NAMES))
    val: list[str] = field(default_factory=lambda: ["embedded"], metadata=_allows(_NAMES))
    # Resize convention: "longest_side" (SAM: ResizeLongestSide + pad) or "stretch" (HQ-SAM
    # evaluation: squash to the model's input size, no padding) [21].
    eval_resize: str = _field("stretch", _one_of(EVAL_RESIZE_MODES))
    # Large-scale jitter for training: scale range, flip probability.
    lsj_min_scale: float = _field(0.1, _POSITIVE)
    lsj_max_scale: float = _field(2.0, _POSITIVE)
    hflip_probability: float = _field(0.5, _PROBABILITY)


@dataclass
class OcclusionConfig:
    """Occlusion synthesis (supplement, "Occlusion Image Synthesis") [16]."""

    probability: float = _field(0.5, _PROBABILITY)
    # occluder longest side / occludee box longest side
    occluder_min_scale: float = _field(0.2, _POSITIVE)
    occluder_max_scale: float = _field(0.8, _POSITIVE)
    # below this the occludee counts as fully occluded
    min_visible_fraction: float = _field(0.1, _PROBABILITY)
    max_tries: int = _field(10, _COUNT)
    copies: int = _field(1, _COUNT)  # synthesised variants per training image
    seed: int = _field(0, _SEED)
    num_examples: int = _field(4, _integer(0))  # before/after pairs in the stage's examples.png


@dataclass
class PromptMixConfig:
    """Mixture of training prompt types (one prompt per image per step) [13]."""

    gt_box: float = _field(1.0, _NON_NEGATIVE)
    noisy_box: float = _field(1.0, _NON_NEGATIVE)
    points: float = _field(1.0, _NON_NEGATIVE)
    coarse_mask: float = _field(1.0, _NON_NEGATIVE)
    point_counts: list[int] = field(default_factory=lambda: [1, 3, 5, 10], metadata=_allows(_POINT_COUNTS))
    noise_scale: float = _field(0.4, _NON_NEGATIVE)
    min_box_iou: float = _field(0.5, _PROBABILITY)
    # [15] "hqsam": coarse masks fed as {0, 255} like HQ-SAM; "logits": mapped to ±logit_scale.
    coarse_mask_values: str = _field("hqsam", _one_of(COARSE_MASK_VALUES))


@dataclass
class BaseTrainConfig:
    """Pretraining the released small base SAM (base/dvc.yaml; precise prompts only, like SAM)."""

    steps: int = _field(7000, _COUNT)
    batch_size: int = _field(8, _COUNT)
    lr: float = _field(1e-3, _POSITIVE)
    weight_decay: float = _field(0.05, _NON_NEGATIVE)
    warmup_steps: int = _field(100, _integer(0))
    # Its own generated split (like SA-1B for SAM), disjoint from the embedded train/val splits.
    num_images: int = _field(8000, _COUNT)
    # Precise prompts only: SAM's jittered GT box (std = box_jitter x side) or k clicks (a single
    # click through the multimask outputs), then SAM-style correction clicks.
    point_counts: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10], metadata=_allows(_POINT_COUNTS))
    box_probability: float = _field(0.5, _PROBABILITY)
    box_jitter: float = _field(0.05, _NON_NEGATIVE)
    correction_clicks: int = _field(1, _integer(0))
    iou_loss_weight: float = _field(1.0, _NON_NEGATIVE)
    lsj_min_scale: float = _field(0.5, _POSITIVE)
    lsj_max_scale: float = _field(1.5, _POSITIVE)
    checkpoint_every: int = _field(100, _COUNT)
    log_every: int = _field(25, _COUNT)
    threads: int = _field(1, _COUNT)
    seed: int = _field(0, _SEED)


@dataclass
class TrainConfig:
    """Stable-SAM fine-tuning (robust training strategy)."""

    epochs: int = _field(1, _COUNT)
    batch_size: int = _field(32, _COUNT)  # global batch, split over the Ray workers
    lr: float = _field(1e-3, _POSITIVE)
    weight_decay: float = _field(0.0, _NON_NEGATIVE)
    # None: one pass over the (occlusion-synthesised) training set
    steps: int | None = _field(None, _nullable(_COUNT))
    prompts: PromptMixConfig = field(default_factory=PromptMixConfig)
    use_occlusion: bool = True
    lsj: bool = True
    num_points_loss: int = _field(12544, _COUNT)  # 112 x 112, HQ-SAM
    oversample_ratio: float = _field(3.0, _number(minimum=1.0))
    importance_sample_ratio: float = _field(0.75, _PROBABILITY)
    checkpoint_every: int = _field(50, _COUNT)
    log_every: int = _field(10, _COUNT)
    loader_workers: int = _field(0, _integer(0))  # DataLoader processes per Ray worker
    # Images per pass of the frozen encoder inside a step (None: the worker's whole batch). The
    # no-grad ViT-L encoder holds ~3.4 GB of activations per 1024 px image: 1 or 2 fit 16 GB cards.
    encoder_batch_size: int | None = _field(None, _nullable(_COUNT))
    seed: int = _field(0, _SEED)


@dataclass
class RayConfig:
    """Ray Train scaling and fault tolerance."""

    num_workers: int = _field(2, _COUNT)
    use_gpu: bool = False
    cpus_per_worker: float = _field(1.0, _POSITIVE)
    max_failures: int = _field(1, _integer(-1))  # -1: retry forever (Ray's FailureConfig)
    storage_path: str | None = None  # None: <repo>/.ray_results (shared storage on clusters)
    address: str | None = None  # None: RAY_ADDRESS, else a private loopback Ray (pipeline/ray_runtime.py)


@dataclass
class EvalConfig:
    """Evaluation protocol (method spec sections 5 and 6)."""

    prompts: list[str] = field(
        default_factory=lambda: ["gt_box", "noisy_box", "point_1", "point_3", "point_10", "oracle_point"],
        metadata=_allows(_list_of(_PROMPT_KIND)),
    )
    draws: int = _field(5, _COUNT)  # K prompt draws for mIoU ± std and ST [19, 20]
    seed: int = _field(0, _SEED)
    noise_scale: float = _field(0.4, _NON_NEGATIVE)
    min_box_iou: float = _field(0.5, _PROBABILITY)
    multimask_output: bool = False
    coco_max_images: int | None = _field(None, _nullable(_COUNT))
    # COCO "N-Box (0.5-0.6)": every instance prompted by a noisy box with IoU in this window.
    coco_min_box_iou: float = _field(0.5, _PROBABILITY)
    coco_max_box_iou: float = _field(0.6, _PROBABILITY)
    num_figures: int = _field(4, _integer(0))
    # CPU threads of torch in the embed/evaluate/ablate stages. 1: the small models are
    # decoder-bound and several threads on a shared CPU oversubscribe it (10-100x slower);
    # None: torch's default (all cores; better for a ViT encoder on CPU). No effect on GPUs.
    threads: int | None = _field(1, _nullable(_COUNT))
    # Where embed/evaluate/ablate run: "auto" = the GPU if there is one; an official SAM (vit_*)
    # is then refused on a CPU-only machine (ViT-L embeds in minutes per image there), unless
    # "cpu" says so on purpose. Small SAMs run on the CPU.
    device: str = _field("auto", _one_of(("auto", "cuda", "cpu")))
    # Images per encoder batch in embed (and wherever evaluate/ablate must embed). SAM's encoder
    # runs in fp32 with explicit attention: about 3.4 GB per 1024 px image for ViT-L, so 8 need
    # about 27 GB; 2 fit a 16 GB card. The result does not depend on it beyond float rounding.
    embed_batch_size: int = _field(8, _COUNT)


@dataclass
class AblateConfig:
    """Decoder-only sweeps (run on cached embeddings)."""

    point_counts: list[int] = field(
        default_factory=lambda: [1, 3, 5, 7, 10, 15, 20], metadata=_allows(_POINT_COUNTS)
    )
    alpha1_values: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0],
        metadata=_allows(_list_of(_PROBABILITY, non_empty=True)),
    )
    alpha1_point_counts: list[int] = field(default_factory=lambda: [1, 10], metadata=_allows(_POINT_COUNTS))
    # Box looseness sweep: noisy boxes at these noise scales (0 = the GT box; eval.noise_scale is
    # the evaluate stage's one), plotted with the points sweep's click counts (ablate@looseness).
    noise_scales: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        metadata=_allows(_list_of(_NON_NEGATIVE, non_empty=True, distinct=True)),
    )
    # Prompt draws (ids of the evaluation's draws: the same prompts as the evaluate stage).
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata=_allows(_list_of(_SEED, non_empty=True, distinct=True)),
    )
    # Trained variants (variants/dvc.yaml): name -> {params key: value}, the overrides of their
    # train and evaluate stages (``--variant NAME``), e.g. {"plugin.routing": "fixed"}. Not part
    # of the default `dvc repro`. pipeline.params checks every key and value like a ``--set``.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=_allows(_VARIANT_MAP))


@dataclass
class TrackingConfig:
    """MLflow tracking (pipeline/tracking.py)."""

    enabled: bool = True
    # None: sqlite:///<repo root>/mlflow.db (embedded, no server); or http://host:port.
    uri: str | None = None
    experiment: str = _field("stable-sam", _NAME)
    registered_model: str = _field("stable-sam-plugin", _NAME)


@dataclass
class Params:
    """The whole of ``params.yaml``."""

    sam: SamConfig = field(default_factory=SamConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    base: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ------------------------------------------------------------------------------------------------
# Constraints between fields, and the check


@dataclass(frozen=True)
class _Rule:
    """A constraint between fields of one config: dotted paths below it, a predicate, its words."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    text: str


def _ordered(low: str, high: str) -> _Rule:
    return _Rule((low, high), lambda a, b: a <= b, f"{low} <= {high}")


_RULES: dict[type, tuple[_Rule, ...]] = {
    PluginConfig: (
        _Rule(
            ("variant", "placements"),
            lambda variant, placements: variant == "none" or bool(placements),
            "at least one placement (e.g. [block2]) unless variant is 'none'",
        ),
    ),
    EmbeddedConfig: (_ordered("min_objects", "max_objects"),),
    DataConfig: (_ordered("lsj_min_scale", "lsj_max_scale"),),
    OcclusionConfig: (_ordered("occluder_min_scale", "occluder_max_scale"),),
    PromptMixConfig: (
        _Rule(
            ("gt_box", "noisy_box", "points", "coarse_mask"),
            lambda *weights: sum(weights) > 0,
            "at least one prompt weight > 0",
        ),
    ),
    BaseTrainConfig: (_ordered("lsj_min_scale", "lsj_max_scale"),),
    EvalConfig: (_ordered("coco_min_box_iou", "coco_max_box_iou"),),
    Params: (
        _Rule(
            ("train.batch_size", "ray.num_workers"),
            lambda batch, workers: batch % workers == 0,
            "train.batch_size divisible by ray.num_workers (the global batch is split over the workers)",
        ),
    ),
}


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
      config: a config instance (:class:`Params`, :class:`PluginConfig`, ...).
      where: the dotted key of ``config`` itself ("plugin" for ``params.plugin``), which prefixes
        the keys in the error message.

    Raises:
      ConfigError: at the first value that is not allowed, naming its full key, the value and what
        is allowed.
    """
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = f.metadata.get("allowed")
        if allowed is not None and not allowed.accepts(value):
            raise ConfigError({prefix + f.name: allowed.shown(value)}, allowed.text)
        if dataclasses.is_dataclass(value):
            check_config(value, prefix + f.name)
    for rule in _RULES.get(type(config), ()):
        values = [_get(config, key) for key in rule.keys]
        if not rule.holds(*values):
            raise ConfigError({prefix + key: value for key, value in zip(rule.keys, values)}, rule.text)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass instance as plain nested dicts/lists (JSON- and checkpoint-safe)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict[str, Any], *, where: str = "config") -> Any:
    """Rebuild a (possibly nested) config dataclass strictly: unknown keys are an error.

    Args:
      cls: the dataclass type.
      values: a dict as written by ``config_to_dict``.
      where: a label used in error messages (a file name, a checkpoint path).
    """
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = (
            fields[name].default_factory()
            if fields[name].default_factory is not dataclasses.MISSING
            else None
        )
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = config_from_dict(type(default), value, where=f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)
