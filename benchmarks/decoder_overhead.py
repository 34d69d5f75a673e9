"""Decoder time with the Stable-SAM plug-ins enabled vs disabled, on the same model and embeddings.

    python -m benchmarks.decoder_overhead [--iters 200] [--threads N]

Decoder only (prompt encoder + mask decoder, as the evaluation runs it on cached embeddings):
random image embeddings, no encoder pass. Two models: the pipeline's small SAM (its trained
plug-in if `dvc repro` built one, else random weights; 1 x 64 x 16 x 16 embeddings) and a
vit_b-shaped SAM with random weights (1 x 256 x 64 x 64 embeddings, the decoder of every official
SAM). Calls alternate between plug-ins on and off so drift hits both equally. Prints milliseconds
per decoder call for 1 and 5 prompts per call, and the ratio on / off.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

from stable_sam.build import build_stable_sam
from stable_sam.modeling import PromptTensors, StableSam

from ._common import default_model


def _prompts(model: StableSam, count: int) -> PromptTensors:
    size = model.img_size
    generator = np.random.default_rng(0)
    centres = generator.uniform(0.3 * size, 0.7 * size, size=(count, 2))
    half = generator.uniform(0.1 * size, 0.25 * size, size=(count, 2))
    boxes = np.concatenate([centres - half, centres + half], axis=1)
    return PromptTensors(boxes=torch.as_tensor(boxes, dtype=torch.float32))


def time_decoder(model: StableSam, *, iters: int, prompts: int) -> tuple[float, float]:
    """(ms per call with plug-ins off, ms per call with plug-ins on): medians of interleaved calls."""
    c = model.sam.prompt_encoder.embed_dim
    h, w = model.sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
    batch = _prompts(model, prompts)
    modes = {"off": model.plugins_disabled, "on": contextlib.nullcontext}
    times: dict[str, list[float]] = {"off": [], "on": []}
    with torch.no_grad():
        for i in range(iters + 10):
            for name, context in modes.items() if i % 2 else reversed(modes.items()):
                with context():
                    started = time.perf_counter()
                    model.decode(embedding, batch, multimask_output=False)
                    elapsed = time.perf_counter() - started
                if i >= 10:  # warm-up
                    times[name].append(elapsed)
    return 1000 * statistics.median(times["off"]), 1000 * statistics.median(times["on"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    small, small_desc = default_model()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit_b = build_stable_sam(sam_type="vit_b").eval()
    print(f"torch threads {torch.get_num_threads()}; median of {args.iters} interleaved calls")
    results = {}
    for label, model, desc in (
        ("small", small, small_desc),
        ("vit_b", vit_b, "vit_b-shaped, random weights"),
    ):
        trainable = model.num_trainable_parameters()
        for prompts in (1, 5):
            off, on = time_decoder(model, iters=args.iters, prompts=prompts)
            results[f"{label}_p{prompts}"] = on / off
            print(
                f"{label:5s} ({desc}; plug-in {trainable:,} params) {prompts} prompt(s)/call: "
                f"off {off:7.3f} ms  on {on:7.3f} ms  ratio on/off {on / off:.3f}"
            )
    return results


if __name__ == "__main__":
    main()
