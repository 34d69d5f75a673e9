"""params.yaml -> OmegaConf structured merge -> the core's config dataclasses.

Every stage reads its configuration through :func:`load_params`, so an unknown or mistyped key,
in the file or in a ``--set key=value`` override, fails before any work starts and names the
key. The stage command line is shared too (:func:`stage_argument_parser`): paths come from
``dvc.yaml``, values from ``params.yaml`` and overrides, nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stable_sam.config import Params

__all__ = ["ParamsError", "load_params", "resolved_params_dict", "stage_argument_parser"]


class ParamsError(ValueError):
    """A params file or an override that does not match the schema."""


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] | None = None) -> Params:
    """Load ``params.yaml`` strictly onto :class:`stable_sam.config.Params`.

    Args:
      path: the params file; a missing file is an error (a stage never runs on defaults by
        accident).
      overrides: ``key=value`` dotlist entries applied after the file, e.g. ``train.lr=3e-4``.

    Returns:
      A fully typed :class:`Params` instance (plain dataclasses).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    schema = OmegaConf.structured(Params)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line number; keep them
        raise ParamsError(f"{path}: cannot parse: {err}") from err
    if file_cfg is None:
        file_cfg = OmegaConf.create({})
    layers = [schema, file_cfg]
    where = str(path)
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            where = f"override {list(overrides)}"
            for item in overrides:
                if "=" not in item:
                    raise ParamsError(f"override {item!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ParamsError(f"{where}: unknown key '{err.full_key}' ({err.msg})") from err
    except ValidationError as err:
        raise ParamsError(f"{where}: invalid value for '{err.full_key}': {err.msg}") from err
    except OmegaConfBaseException as err:
        raise ParamsError(f"{where}: {err}") from err


def resolved_params_dict(params: Params) -> dict[str, Any]:
    """The resolved params as nested plain containers (for MLflow and the resolved-params file)."""
    return OmegaConf.to_container(OmegaConf.structured(params), resolve=True)


def stage_argument_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser every stage starts from: ``--params`` and repeatable ``--set``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set train.lr=3e-4 (repeatable)",
    )
    return parser
