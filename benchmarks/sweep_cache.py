"""A 20-setting sweep with and without the image-embedding cache, timed in one run.

    python -m benchmarks.sweep_cache [--draws 5] [--threads N] [--sam-type vit_b --images 4]

The sweep is the alpha1 sweep's shape: 10 forced alpha1 values x {1 point, 10 points} = 20
settings, each evaluated on every image of the default data (the embedded validation split,
64 images) with ``--draws`` prompt draws. "Without the cache" embeds every image again for every
setting (what a per-setting script does); "with the cache" embeds each image once and reuses the
embedding for all 20 settings. Both sweeps give identical records (checked). Prints wall times,
encoder passes and the ratio. ``--sam-type vit_b --images N`` runs the same sweep on the first N
images with a random-weight ViT-B SAM (1024 px input), to show the ratio for an official encoder.
"""

from __future__ import annotations

import argparse
import time

import torch
from segment_anything.modeling import ImageEncoderViT

from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.evaluation import embed_images, evaluate_prompts

from ._common import default_images, default_model

ALPHAS = [round(0.1 * i, 1) for i in range(10)]
KINDS = ["point_1", "point_10"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared CPU)"
    )
    parser.add_argument(
        "--sam-type", default=None, help="e.g. vit_b (random weights); default: the pipeline's"
    )
    parser.add_argument("--images", type=int, default=None, help="use the first N images only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_desc = default_model(sam_type=args.sam_type)
    images, data_desc = default_images(model.img_size, limit=args.images)
    settings = [(kind, alpha) for kind in KINDS for alpha in ALPHAS]
    passes = {"n": 0}

    def count(module, inputs, output) -> None:
        passes["n"] += inputs[0].shape[0]

    hook = next(m for m in model.modules() if isinstance(m, ImageEncoderViT)).register_forward_hook(count)

    def sweep(cache: EmbeddingCache | None) -> tuple[float, int, list]:
        passes["n"] = 0
        records = []
        started = time.perf_counter()
        for kind, alpha in settings:
            embeddings = embed_images(model, images, cache=cache, progress=False)
            records += evaluate_prompts(
                model,
                images,
                embeddings,
                kinds=[kind],
                draws=args.draws,
                seed=0,
                settings={f"alpha1={alpha}": lambda a=alpha: model.forced_alpha1(a)},
                progress=False,
            )
        return time.perf_counter() - started, passes["n"], records

    with torch.no_grad():
        embed_images(model, images[:2], cache=None, progress=False)  # warm-up
        uncached, uncached_passes, records_a = sweep(None)
        cached, cached_passes, records_b = sweep(EmbeddingCache())
    hook.remove()
    same = [r.get("iou") for r in records_a] == [r.get("iou") for r in records_b]
    print(
        f"model: {model_desc}; data: {data_desc} ({len(images)} images); torch threads {torch.get_num_threads()}"
    )
    print(f"sweep: {len(settings)} settings (alpha1 x {KINDS}), {args.draws} draws per random prompt")
    print(f"without cache: {uncached:8.2f} s  ({uncached_passes} encoder passes)")
    print(f"with cache:    {cached:8.2f} s  ({cached_passes} encoder passes)")
    print(f"ratio (without / with): {uncached / cached:.2f}x   identical records: {same}")
    return {"uncached_s": uncached, "cached_s": cached, "ratio": uncached / cached}


if __name__ == "__main__":
    main()
