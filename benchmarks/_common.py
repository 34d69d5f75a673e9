"""What the benchmarks share: the default data and models, or stand-ins of the same shape."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from stable_sam.build import build_stable_sam
from stable_sam.data import open_dataset
from stable_sam.evaluation import PreparedImage, prepare_image
from stable_sam.modeling import StableSam

logger = logging.getLogger(__name__)

RAW_VAL = Path("data/raw/embedded/val")
BASE = Path("models/base")
PLUGIN = Path("models/stable_sam/plugin.pt")


def default_model(*, plugin: bool = True, sam_type: str | None = None) -> tuple[StableSam, str]:
    """The pipeline's SAM (+ plug-in) if `dvc repro` produced them, else random weights.

    ``sam_type`` other than the pipeline's (e.g. "vit_b"): that architecture with random weights
    and the default plug-in config (the paper's block-2 placement).
    """
    from pipeline.sam_source import read_sam_source

    pipeline_type = read_sam_source(BASE).sam_type if (BASE / "sam.json").is_file() else None
    if sam_type is not None and sam_type != pipeline_type:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_stable_sam(sam_type=sam_type)
        return model.eval(), f"{sam_type} with random weights"
    if pipeline_type is not None:
        source = read_sam_source(BASE)
        use_plugin = plugin and PLUGIN.is_file()
        model = build_stable_sam(
            sam_type=source.sam_type,
            sam_checkpoint=source.checkpoint,
            plugin_checkpoint=PLUGIN if use_plugin else None,
        )
        return model.eval(), f"{source.sam_type} from {BASE}" + (f" + {PLUGIN}" if use_plugin else "")
    from pipeline.params import load_params

    # The stand-in has the plug-ins the pipeline would train (params.yaml's placements).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_stable_sam(sam_type="small", plugin_config=load_params().plugin)
    return model.eval(), "small SAM with random weights and params.yaml's plug-ins (models/base not built)"


def default_images(
    image_size: int, limit: int | None = None, *, resize: str = "stretch"
) -> tuple[list[PreparedImage], str]:
    """The embedded validation split (64 images of 128 px; the first ``limit``), generated if absent.

    ``resize``: how images reach the model frame ("stretch" or "longest_side", SAM's own).
    """
    root = RAW_VAL
    if not (root / "im").is_dir():
        from pipeline.sources import generate_split

        root = Path(tempfile.mkdtemp(prefix="bench-val-")) / "val"
        generate_split(root, num_images=64, image_size=128, generator_seed=0, split="val")
        where = f"generated {root}"
    else:
        where = str(root)
    dataset = open_dataset(str(root), split="val")
    images = [
        prepare_image(dataset[i], index=i, resize=resize, image_size=image_size)
        for i in range(len(dataset) if limit is None else min(limit, len(dataset)))
    ]
    return images, where
