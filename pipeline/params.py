"""params.yaml -> OmegaConf structured merge -> the core's config dataclasses, checked.

Every stage reads its configuration through :func:`load_params`, so an unknown or mistyped key,
or a value its key does not allow (both declared in ``stable_sam/config.py``), in the file, in a
``--set key=value`` override or in a trained variant, fails before any work starts with one
:class:`ParamsError` that names the key, the value and what is allowed. The stage command line
is shared too (:func:`stage_argument_parser`): paths come from ``dvc.yaml``, values from
``params.yaml`` (``--variant NAME`` picks one of its ``ablate.variants``) and overrides, nothing
else; a bad one ends the command when its arguments are parsed (exit status 2, one line, no
traceback).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stable_sam.config import VARIANT_NAME, ConfigError, Params, check_config

__all__ = ["ParamsError", "Variant", "load_params", "resolved_params_dict", "stage_argument_parser"]


class ParamsError(ValueError):
    """A params file, an override or a variant that does not match the schema."""


@dataclass(frozen=True)
class Variant:
    """``--variant NAME``: apply ``ablate.variants[NAME]`` of the params file at this point.

    The variant's overrides are data (params key -> value) read from the params file itself, so
    they never pass through a shell or a ``key=value`` string.
    """

    name: str


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str | Variant] | None = None) -> Params:
    """Load ``params.yaml`` strictly onto :class:`stable_sam.config.Params` and check every value.

    Args:
      path: the params file; a missing file is an error (a stage never runs on defaults by
        accident).
      overrides: applied in order after the file: ``key=value`` dotlist entries (``--set``),
        e.g. ``train.lr=3e-4``, and :class:`Variant` entries (``--variant NAME``).

    Returns:
      A fully typed :class:`Params` instance (plain dataclasses) whose every value is allowed;
      every variant of its ``ablate.variants`` is checked too (applied on top of it).

    Raises:
      ParamsError: the first problem, in one message that says where it comes from.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number; keep them
        raise ParamsError(f"{path}: cannot parse: {err}") from None
    merged = _merge(OmegaConf.structured(Params), file_cfg or OmegaConf.create({}), str(path))
    layers: list[tuple[str, tuple[str, ...]]] = []  # (where, the keys it sets): for error messages
    for item in overrides or ():
        if isinstance(item, Variant):
            where = f"--variant {item.name}"
            changes = _variant(merged, item.name, path)
            merged = _merge(merged, _nested(changes, where), where)
            layers.append((where, tuple(changes)))
        else:
            where = f"--set {item}"
            if "=" not in item:
                raise ParamsError(f"{where}: not of the form key=value")
            merged = _merge(merged, OmegaConf.from_dotlist([item]), where)
            layers.append((where, (item.split("=", 1)[0].strip(),)))
    params = _checked(merged, str(path), layers)
    for name, changes in params.ablate.variants.items():
        where = f"{path}: ablate.variants.{name}"
        _checked(_merge(merged, _nested(changes, where), where), where, [])
    return params


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


def _checked(merged: DictConfig, where: str, layers: Sequence[tuple[str, tuple[str, ...]]]) -> Params:
    """The typed params, every value checked; a problem names the last layer that set its key."""
    try:
        params = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ParamsError(f"{where}: {_first_line(str(err))}") from None
    try:
        check_config(params)
    except ConfigError as err:
        source = next(
            (
                layer
                for layer, keys in reversed(layers)
                if any(_related(a, b) for a in err.values for b in keys)
            ),
            where,
        )
        raise ParamsError(f"{source}: {err}") from None
    return params


def _related(a: str, b: str) -> bool:
    """Whether setting key ``b`` can change key ``a`` (the same key, a section or a sub-key)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _variant(merged: DictConfig, name: str, path: Path) -> dict[str, Any]:
    variants = merged.ablate.variants
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


def _variant_argument(name: str) -> Variant:
    if not VARIANT_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a variant name ({VARIANT_NAME.pattern})")
    return Variant(name)


class _StageArgumentParser(argparse.ArgumentParser):
    """Checks the params a command line names when it is parsed: a bad value is a usage error."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        try:
            load_params(namespace.params, namespace.overrides)
        except ParamsError as err:
            self.exit(2, f"{self.prog}: error: {err}\n")
        return namespace, extras


def stage_argument_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every stage starts from: ``--params``, ``--variant`` and ``--set``.

    ``--variant`` and ``--set`` land in one list, ``args.overrides``, in command-line order:
    ``load_params(args.params, args.overrides)``. Parsing already loads and checks the params,
    so a bad file, override or variant ends the command there with its one-line message.
    """
    parser = _StageArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--variant",
        dest="overrides",
        action="append",
        default=[],
        type=_variant_argument,
        metavar="NAME",
        help="apply the trained variant ablate.variants.NAME of the params file (variants/dvc.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set train.lr=3e-4 (repeatable)",
    )
    return parser
