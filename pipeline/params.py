"""The stage sections' schema: params.yaml (+ overlays, overrides) -> OmegaConf merge -> typed config.

``params.yaml`` is the one place pipeline defaults are set. Its sections are declared here without
defaults (a key the file lacks fails, naming it); ``plugin``, ``tuning``, ``occlusion`` and
``train.prompts`` are the core's own configs (``stable_sam/config.py``), whose method defaults the
file sets explicitly too. What a key accepts is declared next to it, with the core's validators.

:func:`load_params` merges the file, then in order overlays (``--overlay FILE``: only the keys that
differ, e.g. ``configs/vit_l_hqseg44k.yaml``), ``--set key=value`` overrides and trained variants
(``--variant NAME``); an unknown or mistyped key, or a value its key does not allow, fails before
any work with one :class:`ParamsError` naming where, the key, the value and what is allowed. The
stage command line is ``pipeline.stage_cli``; ``python -m pipeline.params [--overlay FILE] [--set
KEY=VALUE]`` prints the resolved params as YAML.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stable_sam.build import SAM_TYPES
from stable_sam.config import (
    COUNT,
    EVAL_PROMPT_KIND,
    NAME,
    NON_NEGATIVE,
    POINT_COUNTS,
    POSITIVE,
    PROBABILITY,
    SEED,
    SHA256,
    Allowed,
    ConfigError,
    OcclusionConfig,
    PluginConfig,
    PromptMixConfig,
    Rule,
    TuningConfig,
    allows,
    check_config,
    integer,
    list_of,
    nullable,
    number,
    one_of,
    option,
    ordered,
)
from stable_sam.data import DATASETS
from stable_sam.precision import ENCODER_PRECISION_CHOICES

from .params_annotator import AutomaticConfig, InteractiveConfig
from .params_base import BaseTrainConfig, ExtendConfig, TightenConfig
from .params_eval import EVAL_DEVICES, EVAL_RESIZE, EVAL_RESIZE_AUTO, EvalConfig

__all__ = [
    "EVAL_DEVICES",
    "EVAL_RESIZE_AUTO",
    "FETCH_SOURCES",
    "FETCH_VALIDATIONS",
    "VARIANT_NAME",
    "AblateConfig",
    "BaseTrainConfig",
    "DataConfig",
    "EmbeddedConfig",
    "EvalConfig",
    "ExtendConfig",
    "FetchConfig",
    "Overlay",
    "Params",
    "ParamsError",
    "RayConfig",
    "SamConfig",
    "SynthesizeConfig",
    "TightenConfig",
    "TrackingConfig",
    "TrainConfig",
    "Variant",
    "load_params",
    "resolved_params_dict",
]

# ------------------------------------------------------------------------------------------------
# The pipeline's choices and the values only its keys take

FETCH_SOURCES = ("embedded", "remote", "local")
FETCH_VALIDATIONS = ("full", "header")
# Names of trained variants (ablate.variants): DVC pastes them into commands and paths.
VARIANT_NAME = re.compile(r"[A-Za-z0-9_]+")

_NAMES = list_of(NAME, non_empty=True)
_SHA256 = nullable(SHA256)
_VARIANT_MAP = Allowed(
    lambda v: (
        isinstance(v, Mapping)
        and all(isinstance(k, str) and VARIANT_NAME.fullmatch(k) for k in v)
        and all(isinstance(o, Mapping) for o in v.values())
    ),
    "a mapping of names matching [A-Za-z0-9_]+ to {params key: value} overrides",
    shown=lambda v: list(v) if isinstance(v, Mapping) else v,  # the names, not every override
)

# ------------------------------------------------------------------------------------------------
# The sections (what each key means: the comments in params.yaml)


@dataclass
class SamConfig:
    """Which SAM the plug-ins attach to (stable_sam.build: official vit_* or small specs)."""

    type: str = option(one_of(SAM_TYPES))
    checkpoint: str | None  # None: the official checkpoint the fetch stage verified (vit_*)
    sha256: str | None = option(_SHA256)  # pinned by the base stage; None: not pinned
    # How the frozen image encoder runs (train, embed, evaluate, sweeps, annotators): fp32 is
    # segment-anything's code; bf16 / fp16 the fast path (StableSam.set_encoder_precision); auto:
    # bf16 where the device has native bf16 (AMX / AVX512-BF16 CPUs, Ampere+ GPUs), else fp32.
    encoder_precision: str = option(one_of(ENCODER_PRECISION_CHOICES))


@dataclass
class FetchConfig:
    """What the fetch stage gets, and from where."""

    source: str = option(one_of(FETCH_SOURCES))
    items: list[str] = field(metadata=allows(list_of(NAME)))  # pipeline/manifest.json entries
    local_root: str | None
    timeout_s: float = option(POSITIVE)
    retries: int = option(integer(0))
    # Manifest items without a published sha256 are refused unless listed here (then pinned).
    trust_unverified: list[str] = field(metadata=allows(list_of(NAME)))
    keep_archives: bool
    validate: str = option(one_of(FETCH_VALIDATIONS))


@dataclass
class EmbeddedConfig:
    """The procedurally generated offline dataset (HQSeg folder layout)."""

    num_train: int = option(COUNT)
    num_val: int = option(COUNT)
    image_size: int = option(integer(16))
    min_objects: int = option(integer(1, maximum=255))  # instance ids are 8-bit
    max_objects: int = option(integer(1, maximum=255))
    seed: int = option(SEED)

    rules: ClassVar[tuple[Rule, ...]] = (ordered("min_objects", "max_objects"),)


@dataclass
class DataConfig:
    """Which datasets the training and evaluation stages read, and how images are resized."""

    train: list[str] = field(metadata=allows(_NAMES))  # registered dataset names or HQSeg-layout folders
    val: list[str] = field(metadata=allows(_NAMES))
    # [21] "auto" | a mode for every set | {set name: mode}: see pipeline.eval_inputs.set_resize
    eval_resize: Any = field(metadata=allows(EVAL_RESIZE))
    lsj_min_scale: float = option(POSITIVE)  # large-scale jitter of the training images
    lsj_max_scale: float = option(POSITIVE)
    hflip_probability: float = option(PROBABILITY)

    rules: ClassVar[tuple[Rule, ...]] = (ordered("lsj_min_scale", "lsj_max_scale"),)


@dataclass
class SynthesizeConfig:
    """How the synthesize stage runs (not what it makes: the ``occlusion`` section is that)."""

    # Processes that synthesise images in parallel; 0 or 1: in-process, null: one per core. The
    # output is byte-identical for any count, so dvc.yaml does not list it (a change reruns nothing).
    workers: int | None = option(nullable(integer(0)))


@dataclass
class TrainConfig:
    """Stable-SAM fine-tuning (robust training strategy)."""

    epochs: int = option(COUNT)
    batch_size: int = option(COUNT)  # global batch, split over the Ray workers
    lr: float = option(POSITIVE)
    weight_decay: float = option(NON_NEGATIVE)
    steps: int | None = option(nullable(COUNT))  # None: epochs x (images // batch_size)
    prompts: PromptMixConfig
    use_occlusion: bool
    lsj: bool
    num_points_loss: int = option(COUNT)
    oversample_ratio: float = option(number(minimum=1.0))
    importance_sample_ratio: float = option(PROBABILITY)
    checkpoint_every: int = option(COUNT)
    log_every: int = option(COUNT)
    loader_workers: int = option(integer(0))  # DataLoader processes per Ray worker
    encoder_batch_size: int | None = option(nullable(COUNT))  # None: the worker's whole batch
    seed: int = option(SEED)


@dataclass
class RayConfig:
    """Ray Train scaling and fault tolerance."""

    num_workers: int = option(COUNT)
    use_gpu: bool
    cpus_per_worker: float = option(POSITIVE)
    max_failures: int = option(integer(-1))  # -1: retry forever (Ray's FailureConfig)
    storage_path: str | None  # None: <repo>/.ray_results (shared storage on clusters)
    address: str | None  # None: RAY_ADDRESS, else a private loopback Ray (pipeline/ray_runtime.py)


@dataclass
class AblateConfig:
    """Decoder-only sweeps (run on cached embeddings), and the trained variants."""

    point_counts: list[int] = field(metadata=allows(POINT_COUNTS))
    alpha1_values: list[float] = field(metadata=allows(list_of(PROBABILITY, non_empty=True)))
    alpha1_prompts: list[str] = field(
        metadata=allows(list_of(EVAL_PROMPT_KIND, non_empty=True, distinct=True))
    )
    noise_scales: list[float] = field(metadata=allows(list_of(NON_NEGATIVE, non_empty=True, distinct=True)))
    seeds: list[int] = field(metadata=allows(list_of(SEED, non_empty=True, distinct=True)))
    # name -> {params key: value}: the overrides of its train and evaluate stages (--variant
    # NAME). A name set to null is no variant: how an overlay drops one of the file's.
    variants: dict[str, dict[str, Any] | None] = field(metadata=allows(_VARIANT_MAP))


@dataclass
class TrackingConfig:
    """MLflow tracking (pipeline/tracking.py)."""

    enabled: bool
    uri: str | None  # None: sqlite:///<repo root>/mlflow.db (embedded, no server)
    experiment: str = option(NAME)
    registered_model: str = option(NAME)


@dataclass
class Params:
    """The whole of ``params.yaml``."""

    sam: SamConfig
    plugin: PluginConfig
    tuning: TuningConfig
    fetch: FetchConfig
    embedded: EmbeddedConfig
    data: DataConfig
    occlusion: OcclusionConfig
    synthesize: SynthesizeConfig
    base: BaseTrainConfig
    tighten: TightenConfig
    extend: ExtendConfig
    train: TrainConfig
    ray: RayConfig
    eval: EvalConfig
    ablate: AblateConfig
    automatic: AutomaticConfig
    interactive: InteractiveConfig
    tracking: TrackingConfig

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ("train.batch_size", "ray.num_workers"),
            lambda batch, workers: batch % workers == 0,
            "train.batch_size divisible by ray.num_workers (the global batch is split over the workers)",
        ),
        Rule(
            ("eval.coco_detections", "data.val"),
            lambda detections, val: set(detections) <= {Path(spec).name for spec in val},
            "eval.coco_detections's set names among data.val's (registered names, folder names)",
        ),
        Rule(
            ("data.eval_resize", "data.val", "interactive.sets"),
            lambda resize, val, interactive: (
                not isinstance(resize, Mapping)
                or set(resize) <= set(DATASETS) | {Path(spec).name for spec in [*val, *interactive]}
            ),
            "data.eval_resize's set names among the registered datasets and the folder names of "
            "data.val and interactive.sets",
        ),
        Rule(
            ("sam.encoder_precision", "tuning.encoder"),
            lambda precision, encoder: precision in ("fp32", "auto") or encoder == "frozen",
            "sam.encoder_precision fp32 (or auto, which gives fp32 here) when tuning.encoder is not "
            "frozen (the fast path is for a frozen encoder; LoRA/adapters train through it)",
        ),
    )


# ------------------------------------------------------------------------------------------------
# Loading


class ParamsError(ValueError):
    """A params file, an overlay, an override or a variant that does not match the schema."""


@dataclass(frozen=True)
class Variant:
    """``--variant NAME``: apply ``ablate.variants[NAME]`` of the params file at this point.

    The variant's overrides are data (params key -> value) read from the params file itself, so
    they never pass through a shell or a ``key=value`` string.
    """

    name: str


@dataclass(frozen=True)
class Overlay:
    """``--overlay FILE``: merge a YAML file that sets only the keys that differ, at this point."""

    path: str


Override = str | Variant | Overlay | Mapping[str, Any]


def load_params(path: str | Path = "params.yaml", overrides: Sequence[Override] | None = None) -> Params:
    """Load ``params.yaml`` strictly onto :class:`Params` and check every value.

    Args:
      path: the params file, which lists every key; a missing file is an error (a stage never
        runs on defaults by accident).
      overrides: applied in order after the file: ``key=value`` dotlist entries (``--set``),
        e.g. ``train.lr=3e-4``; :class:`Overlay` files (``--overlay``); :class:`Variant` entries
        (``--variant NAME``); and ``{params key: value}`` mappings (what a variant holds).

    Returns:
      A fully typed :class:`Params` instance (plain dataclasses) whose every value is allowed;
      every variant of its ``ablate.variants`` is checked too (applied on top of it).

    Raises:
      ParamsError: the first problem, in one message that says where it comes from.
    """
    path = Path(path)
    merged = _merge(_schema(Params), _read(path, "params file"), str(path))
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise ParamsError(
            f"{path}: missing key(s) {shown}: a params file lists every key (a file of only the keys "
            "that differ is an overlay: --overlay FILE on top of params.yaml)"
        )
    layers: list[tuple[str, tuple[str, ...]]] = []  # (where, the keys it sets): for error messages
    for item in overrides or ():
        where, layer = _layer(item, merged, path)
        merged = _merge(merged, layer, where)
        layers.append((where, tuple(_leaf_keys(OmegaConf.to_container(layer)))))
    params = _checked(merged, str(path), layers)
    for name, changes in params.ablate.variants.items():
        where = f"{_source(layers, [f'ablate.variants.{name}'], str(path))}: ablate.variants.{name}"
        _checked(_merge(merged, _nested(changes, where), where), where, [])
    return params


def _schema(cls: type) -> DictConfig:
    """``cls`` as a structured config whose every leaf is missing: the file must set each one."""
    node = OmegaConf.structured(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        node[f.name] = _schema(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else MISSING
    return node


def _read(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ParamsError(f"{what} not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number; keep them
        raise ParamsError(f"{path}: cannot parse: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ParamsError(f"{path}: expected a mapping of sections, got a list")
    return loaded


def _layer(item: Override, merged: DictConfig, path: Path) -> tuple[str, Any]:
    """One override as (where it comes from, the config to merge)."""
    if isinstance(item, Overlay):
        return f"--overlay {item.path}", _read(Path(item.path), "overlay")
    if isinstance(item, Variant):
        where = f"--variant {item.name}"
        return where, OmegaConf.create(_nested(_variant(merged, item.name, path), where))
    if isinstance(item, Mapping):
        return "overrides", OmegaConf.create(_nested(item, "overrides"))
    if "=" not in item:
        raise ParamsError(f"--set {item}: not of the form key=value")
    return f"--set {item}", OmegaConf.from_dotlist([item])


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        raise ParamsError(f"{where}: unknown key '{err.full_key}' ({_first_line(err.msg)})") from None
    except ValidationError as err:
        raise ParamsError(f"{where}: invalid value for '{err.full_key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        raise ParamsError(f"{where}: {_first_line(str(err))}") from None


def _first_line(message: str) -> str:
    """OmegaConf's message without the full_key/object_type lines it appends."""
    return message.strip().splitlines()[0] if message.strip() else message


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    """The dotted keys a nested mapping sets (its leaves; a list is one leaf)."""
    if not isinstance(tree, Mapping) or not tree:
        return [prefix] if prefix else []
    return [key for k, v in tree.items() for key in _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))]


def _checked(merged: DictConfig, where: str, layers: Sequence[tuple[str, tuple[str, ...]]]) -> Params:
    """The typed params, every value checked; a problem names the last layer that set its key."""
    try:
        params = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ParamsError(f"{where}: {_first_line(str(err))}") from None
    params.ablate.variants = {k: v for k, v in params.ablate.variants.items() if v is not None}
    try:
        check_config(params)
    except ConfigError as err:
        raise ParamsError(f"{_source(layers, err.values, where)}: {err}") from None
    return params


def _source(layers: Sequence[tuple[str, tuple[str, ...]]], keys: Iterable[str], default: str) -> str:
    """The last layer that set one of ``keys`` (or a section or sub-key of one), else ``default``."""
    keys = list(keys)
    return next(
        (where for where, set_ in reversed(layers) if any(_related(a, b) for a in keys for b in set_)),
        default,
    )


def _related(a: str, b: str) -> bool:
    """Whether setting key ``b`` can change key ``a`` (the same key, a section or a sub-key)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _variant(merged: DictConfig, name: str, path: Path) -> dict[str, Any]:
    variants = {k: v for k, v in merged.ablate.variants.items() if v is not None}
    if name not in variants:
        known = ", ".join(variants) or "none"
        raise ParamsError(f"--variant {name}: {path} has no ablate.variants.{name} (known: {known})")
    changes = OmegaConf.to_container(variants[name], resolve=True)
    if not isinstance(changes, dict):
        raise ParamsError(f"{path}: ablate.variants.{name} must be a mapping of params key -> value")
    return changes


def _nested(changes: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"plugin.variant": "none"}`` -> ``{"plugin": {"variant": "none"}}``, to merge like a file."""
    tree: dict[str, Any] = {}
    for key, value in changes.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ParamsError(f"{where}: {key!r} is not a params key")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{where}: {key!r} overlaps another of its keys")
        node[parts[-1]] = value
    return tree


def resolved_params_dict(params: Params) -> dict[str, Any]:
    """The resolved params as nested plain containers (for MLflow and the resolved-params file)."""
    return OmegaConf.to_container(OmegaConf.structured(params), resolve=True)
