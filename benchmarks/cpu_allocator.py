"""glibc's default allocator against the Makefile's setting, on segment-anything's fp32 encoder (CPU).

    python -m benchmarks.cpu_allocator [--image-size 1024] [--repeats 2] [--threads 1] [--shape tiny]

A SAM of vit_b's shape (``benchmarks.encoder_fast_path.vit_b_shaped``, random weights) embeds
one image in fp32, segment-anything's own encoder, under ``torch.inference_mode``, in two fresh
child processes, alternating: one with glibc's defaults, one with the environment that the
Makefile exports (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_=100000000000``: big tensors
stay in the heap, no ``mmap``/``munmap`` per tensor). With the defaults every large intermediate
(the 12 blocks' attention maps and MLP activations) is a fresh ``mmap`` whose pages the kernel
faults in one at a time and a ``munmap`` that gives them back, so the encoder spends much of its
time in system calls and page faults. Each child prints the wall time of every call (the first
includes the heap's growth), its system CPU time, its minor page faults and its peak RSS
(``resource.getrusage``); the parent checks the two embeddings are bit-identical and prints the
ratio default / tuned of the median wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TUNED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def _child(shape: str, image_size: int, repeats: int, threads: int) -> dict[str, object]:
    """One process's timings (run with ``--child``): the allocator is fixed at process start."""
    from stable_sam.build import SMALL_SAM_SPECS

    from .encoder_fast_path import random_model, vit_b_shaped

    torch.set_num_threads(threads)
    spec = vit_b_shaped(image_size) if shape == "vit_b" else SMALL_SAM_SPECS["tiny"]
    model = random_model(dataclasses.replace(spec, img_size=image_size))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, image_size, image_size, generator=generator) * 255
    before = resource.getrusage(resource.RUSAGE_SELF)
    walls = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            embedding = model.embed_images(image)
            walls.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "walls": walls,
        "sys_s": after.ru_stime - before.ru_stime,
        "user_s": after.ru_utime - before.ru_utime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "max_rss_mb": after.ru_maxrss / 1024,  # Linux: KiB
        "checksum": float(embedding.double().sum()),
        "first_values": embedding.flatten()[:16].tolist(),
    }


def _run_child(shape: str, image_size: int, repeats: int, threads: int, *, tuned: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_ENV}
    if tuned:
        env.update(TUNED_ENV)
    args = [sys.executable, "-m", "benchmarks.cpu_allocator", "--child", "--shape", shape]
    args += ["--image-size", str(image_size), "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child (tuned={tuned}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(label: str, result: dict[str, object]) -> None:
    walls = ", ".join(f"{w:.2f}" for w in result["walls"])
    print(
        f"{label:>8}: wall {walls} s (median {statistics.median(result['walls']):.2f}), "
        f"user {result['user_s']:.1f} s, sys {result['sys_s']:.1f} s, "
        f"{result['minor_faults']:,} minor faults, peak RSS {result['max_rss_mb']:.0f} MB"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=1024, help="input size (vit_b: 1024)")
    parser.add_argument("--shape", choices=("vit_b", "tiny"), default="vit_b", help="tiny: a smoke test")
    parser.add_argument("--repeats", type=int, default=2, help="encoder calls per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.shape, args.image_size, args.repeats, args.threads)))
        return {}
    print(
        f"{args.shape}-shaped fp32 encoder, {args.image_size} px, {args.threads} thread(s), torch {torch.__version__}"
    )
    run = (args.shape, args.image_size, args.repeats, args.threads)
    default = _run_child(*run, tuned=False)
    tuned = _run_child(*run, tuned=True)
    _report("default", default)
    _report("tuned", tuned)
    identical = default["first_values"] == tuned["first_values"] and default["checksum"] == tuned["checksum"]
    ratio = statistics.median(default["walls"]) / statistics.median(tuned["walls"])
    print(f"identical embeddings: {identical}; ratio default/tuned (median wall): {ratio:.2f}x")
    if not identical:
        raise SystemExit("the two allocators gave different embeddings")
    return {
        "ratio": ratio,
        "default_s": statistics.median(default["walls"]),
        "tuned_s": statistics.median(tuned["walls"]),
        "default_faults": float(default["minor_faults"]),
        "tuned_faults": float(tuned["minor_faults"]),
    }


if __name__ == "__main__":
    main()
