"""Stage ``evaluate`` of ``base/dvc.yaml``: the pretrained base SAM alone, precise vs loose prompts.

Same prompt protocol as the default pipeline's evaluate stage (``eval`` params: prompt kinds,
draws, seed, noise scale, multimask off), on the embedded validation split, overall and per shape
family of the target. The base must be strong with precise prompts (GT box, 10 clicks) and, like
SAM, weak with loose ones (noisy box, one click): ``metrics/base_eval.json`` holds both, and
``make release-base`` copies them into the model card. One click is also answered with multimask
on (SAM's pick of its three masks, and the best of the three chosen with the GT): how much of the
one-click failure a decoder-side repair could reach, and how much is the click's ambiguity.

    python -m pipeline.base_eval --model models/pretrained --val data/base/val \\
        --metrics metrics/base_eval.json --table reports/base_eval.csv
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.sources import CATEGORIES, target_families
from stable_sam.build import build_sam
from stable_sam.config import PluginConfig
from stable_sam.data import open_dataset
from stable_sam.evaluation import (
    PreparedImage,
    embed_images,
    eval_prompts,
    evaluate_prompts,
    logits_to_masks,
    prepare_image,
    summarize,
)
from stable_sam.metrics import mask_iou
from stable_sam.modeling import PromptTensors, StableSam

from .eval_inputs import set_resize
from .params import Params, load_params
from .sam_source import write_json_atomic
from .stage_cli import stage_argument_parser

__all__ = ["evaluate_base", "main", "one_click_outputs"]

logger = logging.getLogger("pipeline.base_eval")


def evaluate_base(model: StableSam, val: Path, params: Params) -> tuple[dict, dict[str, float]]:
    """Returns (by group, one click):

    - by group: {"all" | family: {kind: {"miou", "miou_std", "mbiou", "n", ("st")}}} in percent;
    - one click: :func:`one_click_outputs` (empty when ``point_1`` is not an eval prompt).
    """
    cfg = params.eval
    dataset = open_dataset(str(val), split="val")
    resize = set_resize(params.data.eval_resize, "embedded")  # the embedded generator's own split
    images = [
        prepare_image(dataset[i], index=i, resize=resize, image_size=model.img_size)
        for i in range(len(dataset))
    ]
    embeddings = embed_images(model, images, progress=False)
    one_click = one_click_outputs(model, images, embeddings, params) if "point_1" in cfg.prompts else {}
    records = evaluate_prompts(
        model,
        images,
        embeddings,
        kinds=cfg.prompts,
        draws=cfg.draws,
        seed=cfg.seed,
        settings={"sam": contextlib.nullcontext},
        noise_scale=cfg.noise_scale,
        min_iou=cfg.min_box_iou,
        multimask_output=cfg.multimask_output,
        dataset="embedded",
        progress=False,
    )
    family = target_families(val)
    out = {"all": summarize(records)["sam"]}
    for name in CATEGORIES:
        selected = [r for r in records if family[r["image"]] == name]
        # A family with no target in the split is listed with 0 images (not silently missing).
        out[name] = summarize(selected)["sam"] if selected else {}
    return out, one_click


@torch.no_grad()
def one_click_outputs(
    model: StableSam, images: Sequence[PreparedImage], embeddings: Sequence[torch.Tensor], params: Params
) -> dict[str, float]:
    """mIoU (percent) of the eval protocol's one-click prompts answered with multimask on.

    ``picked``: SAM's own answer (the one of its three masks its IoU head scores highest);
    ``oracle``: the best of the three chosen with the GT: what choosing among the base's own masks
    can give; its distance to ``picked`` is the click's ambiguity (which of the three it meant).
    Mask token 0 (multimask off) is the protocol's own ``point_1`` result.
    """
    cfg = params.eval
    ious: dict[str, list[float]] = {"picked": [], "oracle": []}
    for image, embedding in zip(images, embeddings):
        if not image.frame_mask.any():
            continue  # as evaluate_prompts: no prompt on an image whose GT vanished
        prompts = eval_prompts(
            image, "point_1", draws=cfg.draws, seed=cfg.seed, mask_input_size=model.mask_input_size,
            noise_scale=cfg.noise_scale, min_iou=cfg.min_box_iou,
        )  # fmt: skip
        # One click each: one structure, so one decoder call for all the draws of the image.
        batch = PromptTensors.stack(prompts, model.device)
        out = model.decode(embedding.to(model.device), batch, multimask_output=True)
        best = out.iou_predictions.argmax(dim=1)
        for low_res, chosen in zip(out.low_res_logits, best):
            three = [mask_iou(image.mask, m) for m in logits_to_masks(model, low_res, image)]
            ious["picked"].append(three[int(chosen)])
            ious["oracle"].append(max(three))
    return {k: round(100 * sum(v) / max(1, len(v)), 2) for k, v in ious.items()}


def _write_table(path: Path, results: dict[str, dict[str, dict[str, float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = list(results["all"])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["family", "images", *kinds])
        for group, by_kind in results.items():
            if not by_kind:
                writer.writerow([group, 0, *("–" for _ in kinds)])
                continue
            writer.writerow([group, by_kind[kinds[0]]["n"], *(f"{by_kind[k]['miou']:.1f}" for k in kinds)])
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = stage_argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="folder with sam_<type>.pth (pretrain)")
    parser.add_argument("--val", type=Path, required=True, help="the embedded val split (base data stage)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    parser.add_argument("--table", type=Path, required=True, help="per-family mIoU table (CSV)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, args.overrides)
    torch.set_num_threads(max(1, params.eval.threads or 1))
    sam, sha256 = build_sam(params.sam.type, args.model / f"sam_{params.sam.type}.pth")
    model = StableSam(sam=sam, sam_type=params.sam.type, plugin_config=PluginConfig(variant="none")).eval()
    results, one_click = evaluate_base(model, args.val, params)
    overall = results["all"]
    metrics = {
        kind: {"miou": round(v["miou"], 2), "mbiou": round(v["mbiou"], 2)} for kind, v in overall.items()
    }
    if one_click:
        metrics["point_1_multimask"] = one_click
    # (per shape family: the table, reports/base_eval.csv; DVC metrics stay what a comparison needs)
    metrics["checkpoint_sha256"] = sha256
    write_json_atomic(args.metrics, metrics)
    _write_table(args.table, results)
    for kind, v in overall.items():
        logger.info("%-12s mIoU %.1f  mBIoU %.1f", kind, v["miou"], v["mbiou"])
    if one_click:
        token0 = overall["point_1"]["miou"]
        logger.info("one click: token 0 %.1f, SAM's pick of 3 %.1f, oracle %.1f", token0, *one_click.values())
    return metrics


if __name__ == "__main__":
    main()
