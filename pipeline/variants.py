"""The trained variants (the paper's Table S9 and the baselines) as DVC experiments.

Each entry of ``ablate.variants`` in ``params.yaml`` (name -> {params key: value}) is one
experiment of the default pipeline with those params set::

    dvc exp run --queue -n NAME -S KEY=VALUE ...

DVC reruns what the overrides affect (``train``, then ``evaluate``, the sweeps and ``report``; the
data, the base and the embeddings come from its cache) in a temporary copy of the repository, so
the workspace, its metrics and README.md stay as they are. ``dvc exp show`` compares the
variants, ``dvc metrics diff``/``dvc plots diff`` two of them, ``dvc exp apply NAME`` brings one
into the workspace, and every experiment holds its own ``reports/summary.md``. From the repository
root::

    make variants                        # all three steps below
    python -m pipeline.variants          # queue every variant; names as arguments: only those
    dvc exp run --run-all --jobs 1       # run the queue (one at a time: each trains on Ray)
    dvc exp show --only-changed          # the comparison

``--print`` shows the commands without queuing. DVC refuses a name that is already an experiment
of the current commit: ``dvc exp remove NAME`` first. Not a stage: nothing in ``dvc.yaml`` runs it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .params import load_params

__all__ = ["main", "queue_command", "set_params"]


def set_params(overrides: Mapping[str, Any]) -> list[str]:
    """The ``-S`` values (Hydra override grammar) that set ``overrides`` in params.yaml.

    Values are written as JSON, which the grammar reads back with their types: a quoted string
    stays a string (even ``"1"``), ``[...]`` is a list, ``true``/``false``/``null`` and numbers are
    themselves.
    """
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def queue_command(name: str, overrides: Mapping[str, Any]) -> list[str]:
    """``dvc exp run --queue -n NAME -S ...`` for one variant (run from the repository root)."""
    command = [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name]
    for value in set_params(overrides):
        command += ["-S", value]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Queue the trained variants as DVC experiments.")
    parser.add_argument("names", nargs="*", help="variants to queue (default: every ablate.variants entry)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the pipeline's params file")
    parser.add_argument("--print", action="store_true", help="print the commands, queue nothing")
    args = parser.parse_args(argv)
    variants = load_params(args.params).ablate.variants  # checks every variant like a --set
    unknown = [n for n in args.names if n not in variants]
    if unknown:
        parser.error(f"not in ablate.variants: {', '.join(unknown)} (known: {', '.join(variants)})")
    for name in args.names or list(variants):
        command = queue_command(name, variants[name])
        print(shlex.join(["dvc", *command[3:]]), flush=True)
        if not args.print:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
