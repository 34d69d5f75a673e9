"""Stage ``data`` of ``base/dvc.yaml``: the base SAM's own pretraining split, and the embedded val split.

The pretraining split is drawn by the embedded generator under the split name ``pretrain``
(every scene is seeded by ``(embedded.seed, split, index)``), so it shares no scene with the
embedded ``train``/``val`` splits of the default pipeline, as SA-1B shares none with the
benchmarks SAM is evaluated on. The ``val`` split is byte-identical to the one ``fetch`` writes.

    python -m pipeline.base_data --out data/base
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.sources import generate_split

from .params import Params, load_params
from .sam_source import write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = ["main", "run"]

logger = logging.getLogger("pipeline.base_data")


def run(params: Params, out: Path) -> dict[str, Any]:
    emb = params.embedded
    common = {
        "image_size": emb.image_size,
        "min_objects": emb.min_objects,
        "max_objects": emb.max_objects,
        "generator_seed": emb.seed,
    }
    pretrain = generate_split(out / "pretrain", num_images=params.base.num_images, split="pretrain", **common)
    val = generate_split(out / "val", num_images=emb.num_val, split="val", **common)
    summary = {"pretrain": pretrain.to_dict(), "val": val.to_dict()}  # no timings: the same bytes every time
    write_json_atomic(out / "summary.json", summary)
    logger.info("generated in %.1f s (pretrain) + %.1f s (val)", pretrain.seconds, val.seconds)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for pretrain/ and val/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(load_params(args.params, args.overrides), args.out)


if __name__ == "__main__":
    main()
