"""The command line every stage shares: ``--params``, ``--overlay``, ``--variant``, ``--set``.

Paths come from ``dvc.yaml``, values from the params file (``pipeline.params``) and these
overrides, nothing else. Parsing already loads and checks the params, so a bad file, overlay,
override or variant ends the command when its arguments are parsed: exit status 2, one line
naming the key, the value and what is allowed, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .params import VARIANT_NAME, Overlay, ParamsError, Variant, load_params, resolved_params_dict

__all__ = ["stage_argument_parser"]


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


def _module_prog() -> str | None:
    """``python -m pipeline.fetch`` when this process was started that way (argparse: ``fetch.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "")
    return f"python -m {name}" if name.startswith("pipeline.") else None


def stage_argument_parser(description: str, *, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser every stage starts from: ``--params``, ``--overlay``, ``--variant``, ``--set``.

    ``--overlay``, ``--variant`` and ``--set`` land in one list, ``args.overrides``, in
    command-line order: ``load_params(args.params, args.overrides)``. Parsing already loads and
    checks the params, so a bad file, overlay, override or variant ends the command there with
    its one-line message.

    Args:
      description: the stage's one-line description (``--help``).
      prog: the program name in usage and error lines; default ``python -m pipeline.<stage>``
        when the process runs a stage module, else argparse's own.
    """
    parser = _StageArgumentParser(prog=prog or _module_prog(), description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--overlay",
        dest="overrides",
        action="append",
        default=[],
        type=Overlay,
        metavar="FILE",
        help="merge a YAML file of only the keys that differ, e.g. configs/vit_l_hqseg44k.yaml",
    )
    parser.add_argument(
        "--variant",
        dest="overrides",
        action="append",
        default=[],
        type=_variant_argument,
        metavar="NAME",
        help="apply the trained variant ablate.variants.NAME of the params file (what `make variants` queues as -S values)",
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.stage_cli``: print the params a stage would get (file + overlays + --set) as YAML."""
    from omegaconf import OmegaConf

    parser = stage_argument_parser("Print the resolved params as YAML.", prog="python -m pipeline.stage_cli")
    args = parser.parse_args(argv)
    params = resolved_params_dict(load_params(args.params, args.overrides))
    print(OmegaConf.to_yaml(OmegaConf.create(params)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
