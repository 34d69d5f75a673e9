"""Plain dataclasses for every section of ``params.yaml``.

The core never imports omegaconf: ``pipeline.params`` merges ``params.yaml`` onto these
dataclasses (so unknown keys and wrong types fail loudly) and hands the resulting instances to
the core. Every default here is the recommended default of the method spec
(``stable_sam_method.md``, "Open choices"); the number in brackets after a field is the row of
that table it implements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AblateConfig",
    "BaseTrainConfig",
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
    "config_from_dict",
    "config_to_dict",
]


@dataclass
class PluginConfig:
    """The Stable-SAM plug-ins (DSP + DRP) and every open choice the paper leaves to us.

    The defaults give 81,828 trainable parameters on a 256-dim SAM decoder (vit_b/l/h).
    """

    # What resamples the image features: "dsp" (deformable sampling), "spatial_attention"
    # (supplement Table 9: a sigmoid weight map on the amplitude features, no offsets) or
    # "none" (no plug-in at all: plain SAM, used by the LoRA/adapter baselines).
    variant: str = "dsp"
    # Where the plug-in sits [9]: token-to-image attention of "block2" (the paper), optionally
    # also "block1" and/or the "final" token-to-image attention. One DSP/DRP pair per site.
    placements: list[str] = field(default_factory=lambda: ["block2"])
    # DRP [3]: "drp" (learned α from the output token) or "fixed" (α1 = fixed_alpha1, no DRP).
    routing: str = "drp"
    fixed_alpha1: float = 1.0
    # α normalisation [3]: "softmax" over 2 logits (α1 + α2 = 1) or independent "sigmoid"s.
    routing_norm: str = "softmax"
    # DRP input token t_o [1]: "mask0" (sequence index 1), "iou" (index 0) or "mean_output"
    # (mean of the iou token and the 4 mask tokens).
    drp_token: str = "mask0"
    drp_hidden: int = 32  # [2]
    # Offsets in feature pixels, Δp = offset_bound · tanh(raw) [5]; None = unbounded.
    offset_bound: float | None = 8.0
    offset_groups: int = 1  # [7] channel groups with their own offsets (DAT-style)
    offset_kernel: int = 5  # depthwise conv of the offset network
    offset_bias: bool = True  # [12] bias of the last 1x1 conv of the offset network
    # Amplitude [4]: "conv1x1" (x_p* = Conv1x1(x_p), sample from x_p*) or "conv1x1_modulated"
    # (plus a DCNv2-style per-location modulation 2·sigmoid(m), 1 at init).
    amplitude: str = "conv1x1"
    padding_mode: str = "border"  # [6] grid_sample padding: "border", "zeros" or "reflection"
    resample_pe: bool = False  # [8] resample the key PE at p + Δp instead of the regular grid
    replace: str = "keys_values"  # [10] "keys_values" or "keys" (values stay the regular x_p)
    # [11] "identity": amplitude conv = I, last offset conv = 0, last DRP layer = 0, so
    # Stable-SAM equals SAM at step 0; "default": PyTorch's initialisers everywhere.
    init: str = "identity"


@dataclass
class TuningConfig:
    """What else is trained besides the plug-in (baselines and the Table 9 variants)."""

    # "frozen" (Stable-SAM), "prediction_head" (the hypernetwork MLP of the single-mask output:
    # "SAM's prediction layer" of the LoRA/adapter baselines) or "full" (the mask decoder, Table
    # 9). Parts the single-mask loss never reaches (multimask hypernetworks, IoU head) stay frozen.
    decoder: str = "frozen"
    # "frozen", "lora" (rank lora_rank on both FFN linears of every ViT block) or "adapter"
    # (AdaptFormer bottleneck adapter_dim in parallel to every FFN).
    encoder: str = "frozen"
    lora_rank: int = 4
    adapter_dim: int = 64


@dataclass
class SamConfig:
    """Which SAM the plug-ins attach to."""

    # "vit_b", "vit_l", "vit_h" (official architectures) or "small" / "tiny" (small
    # configurations built from segment-anything's classes; see stable_sam.build).
    type: str = "small"
    # A SAM checkpoint: official (vit_*) or the released small base (base/release/). None: the
    # fetched official checkpoint (vit_*); tests use random weights.
    checkpoint: str | None = None
    # The checkpoint's pinned sha256 (the released base's); checked by the base stage. None: not pinned.
    sha256: str | None = None


@dataclass
class FetchConfig:
    """What the fetch stage gets, and from where."""

    # "embedded": generate the offline dataset; "remote": download from the manifest URLs;
    # "local": verify files the user already has under local_root (nothing is downloaded).
    source: str = "embedded"
    # Manifest entries to fetch (see pipeline/manifest.json), e.g. ["sam_vit_l", "hqseg44k"].
    items: list[str] = field(default_factory=list)
    local_root: str | None = None
    timeout_s: float = 60.0
    retries: int = 3
    # Manifest items whose sha256 is not published (``"sha256": null``) are refused unless
    # listed here; the first download's hash is then pinned (<downloads>/<file>.sha256, and
    # data/raw/manifest.json) and every later run verifies against it.
    trust_unverified: list[str] = field(default_factory=list)
    keep_archives: bool = False  # keep the zips after a verified extraction
    # How the fetched datasets are checked: "full" decodes every pair once (bad files are
    # recorded in the raw-data manifest and skipped by later stages), "header" reads headers.
    validate: str = "full"


@dataclass
class EmbeddedConfig:
    """The procedurally generated offline dataset (HQSeg folder layout)."""

    num_train: int = 320
    num_val: int = 64
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 5
    seed: int = 0


@dataclass
class DataConfig:
    """Which datasets the training and evaluation stages read."""

    # Dataset names: "embedded" (offline default), "hqseg44k" (the 7 train folders),
    # "DIS-VD", "COIFT", "HR-SOD", "ThinObject5K-TE", "coco_val2017", or a path to any folder
    # in the HQSeg layout (im/*.jpg + gt/*.png).
    train: list[str] = field(default_factory=lambda: ["embedded"])
    val: list[str] = field(default_factory=lambda: ["embedded"])
    # Resize convention: "longest_side" (SAM: ResizeLongestSide + pad) or "stretch" (HQ-SAM
    # evaluation: squash to the model's input size, no padding) [21].
    eval_resize: str = "stretch"
    # Large-scale jitter for training: scale range, flip probability.
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0
    hflip_probability: float = 0.5


@dataclass
class OcclusionConfig:
    """Occlusion synthesis (supplement, "Occlusion Image Synthesis") [16]."""

    probability: float = 0.5
    occluder_min_scale: float = 0.2  # occluder longest side / occludee box longest side
    occluder_max_scale: float = 0.8
    min_visible_fraction: float = 0.1  # below this the occludee counts as fully occluded
    max_tries: int = 10
    copies: int = 1  # synthesised variants per training image
    seed: int = 0
    num_examples: int = 4  # before/after pairs in the stage's examples.png


@dataclass
class PromptMixConfig:
    """Mixture of training prompt types (one prompt per image per step) [13]."""

    gt_box: float = 1.0
    noisy_box: float = 1.0
    points: float = 1.0
    coarse_mask: float = 1.0
    point_counts: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    noise_scale: float = 0.4
    min_box_iou: float = 0.5
    # [15] "hqsam": coarse masks fed as {0, 255} like HQ-SAM; "logits": mapped to ±logit_scale.
    coarse_mask_values: str = "hqsam"


@dataclass
class BaseTrainConfig:
    """Pretraining the released small base SAM (base/dvc.yaml; precise prompts only, like SAM)."""

    steps: int = 7000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    # Its own generated split (like SA-1B for SAM), disjoint from the embedded train/val splits.
    num_images: int = 8000
    # Precise prompts only: SAM's jittered GT box (std = box_jitter x side) or k clicks (a single
    # click through the multimask outputs), then SAM-style correction clicks.
    point_counts: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10])
    box_probability: float = 0.5
    box_jitter: float = 0.05
    correction_clicks: int = 1
    iou_loss_weight: float = 1.0
    lsj_min_scale: float = 0.5
    lsj_max_scale: float = 1.5
    checkpoint_every: int = 100
    log_every: int = 25
    threads: int = 1
    seed: int = 0


@dataclass
class TrainConfig:
    """Stable-SAM fine-tuning (robust training strategy)."""

    epochs: int = 1
    batch_size: int = 32  # global batch, split over the Ray workers
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int | None = None  # None: one pass over the (occlusion-synthesised) training set
    prompts: PromptMixConfig = field(default_factory=PromptMixConfig)
    use_occlusion: bool = True
    lsj: bool = True
    num_points_loss: int = 12544  # 112 x 112, HQ-SAM
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    checkpoint_every: int = 50
    log_every: int = 10
    loader_workers: int = 0  # DataLoader processes per Ray worker
    seed: int = 0


@dataclass
class RayConfig:
    """Ray Train scaling and fault tolerance."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    storage_path: str | None = None  # None: <repo>/.ray_results (shared storage on clusters)
    address: str | None = None  # None: RAY_ADDRESS, else a private loopback Ray (pipeline/ray_runtime.py)


@dataclass
class EvalConfig:
    """Evaluation protocol (method spec sections 5 and 6)."""

    prompts: list[str] = field(
        default_factory=lambda: ["gt_box", "noisy_box", "point_1", "point_3", "point_10", "oracle_point"]
    )
    draws: int = 5  # K prompt draws for mIoU ± std and ST [19, 20]
    seed: int = 0
    noise_scale: float = 0.4
    min_box_iou: float = 0.5
    multimask_output: bool = False
    coco_max_images: int | None = None
    # COCO "N-Box (0.5-0.6)": every instance prompted by a noisy box with IoU in this window.
    coco_min_box_iou: float = 0.5
    coco_max_box_iou: float = 0.6
    num_figures: int = 4
    # CPU threads of torch in the embed/evaluate/ablate stages. 1: the small models are
    # decoder-bound and several threads on a shared CPU oversubscribe it (10-100x slower);
    # None: torch's default (all cores; better for a ViT encoder on CPU). No effect on GPUs.
    threads: int | None = 1


@dataclass
class AblateConfig:
    """Decoder-only sweeps (run on cached embeddings)."""

    point_counts: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 10, 15, 20])
    alpha1_values: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    alpha1_point_counts: list[int] = field(default_factory=lambda: [1, 10])
    # Prompt draws (ids of the evaluation's draws: the same prompts as the evaluate stage).
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # Trained variants (variants/dvc.yaml): name -> the extra arguments of their train and
    # evaluate stages, e.g. "--set plugin.routing=fixed". Not part of the default `dvc repro`.
    variants: dict[str, str] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """MLflow tracking (pipeline/tracking.py)."""

    enabled: bool = True
    # None: sqlite:///<repo root>/mlflow.db (embedded, no server); or http://host:port.
    uri: str | None = None
    experiment: str = "stable-sam"
    registered_model: str = "stable-sam-plugin"


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
