"""The occluded training set, one image at a time: draw, write, and merge back in image order.

What the ``synthesize`` stage runs (``pipeline/synthesize.py`` lists the sources, assembles the
manifest and renames the folder into place). Every output draws from its own generator seeded by
``(occlusion.seed, image index, copy)`` and writes only its own files, so the images can be
synthesised in any order and in a pool of processes (:func:`outcomes`) with a byte-identical
result.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.raw_data import portable_path
from stable_sam import data as data_lib
from stable_sam.atomic_write import write_bytes_atomic
from stable_sam.config import OcclusionConfig
from stable_sam.occlusion import OcclusionResult, synthesize_occlusion

__all__ = [
    "JPEG_QUALITY",
    "Merged",
    "Source",
    "Synthesis",
    "SynthesisError",
    "atomic_bytes",
    "examples_figure",
    "outcomes",
    "output_name",
    "worker_count",
]

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
_MIN_OCCLUDER_PIXELS = 16  # an occluder object smaller than this is not worth pasting


@dataclass(frozen=True)
class Source:
    dataset: str
    pair: data_lib.ImagePair
    out_name: str


def output_name(dataset: str, pair_name: str, multi: bool) -> str:
    name = pair_name.replace("/", "__")
    if multi:
        name = f"{dataset.strip('/').replace('/', '_')}__{name}"
    return name


def _objects(sample: data_lib.Sample) -> tuple[list[np.ndarray], list[int], int]:
    """The image's objects, their instance ids (0: the GT itself) and the index of the target."""
    if sample.instances is None:
        return [sample.mask], [0], 0
    ids = [int(k) for k in np.unique(sample.instances) if k > 0]
    masks = [sample.instances == k for k in ids]
    if not masks:
        return [sample.mask], [0], 0
    # The target is the instance that matches the GT (identical in the embedded data).
    ious = [(m & sample.mask).sum() / max(1, (m | sample.mask).sum()) for m in masks]
    best = int(np.argmax(ious))
    if ious[best] < 0.99:  # the GT is not one of the instances: its own object, on top
        return [*[m & ~sample.mask for m in masks], sample.mask], [*ids, 0], len(masks)
    return masks, ids, best


def _occluder_object(sample: data_lib.Sample, generator: np.random.Generator) -> tuple[np.ndarray, int]:
    """One object of the occluder image (random instance, or the GT) and its id (0 for the GT)."""
    if sample.instances is not None:
        ids = [int(k) for k in np.unique(sample.instances) if k > 0]
        ids = [k for k in ids if (sample.instances == k).sum() >= _MIN_OCCLUDER_PIXELS]
        if ids:
            k = ids[int(generator.integers(len(ids)))]
            return sample.instances == k, k
    return sample.mask, 0


def atomic_bytes(path: Path, payload: bytes) -> None:
    # No fsync per image: the work folder is renamed into place only when complete.
    write_bytes_atomic(path, payload, fsync=False)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _link(src: Path, dst: Path) -> None:
    """Hard-link (same file system) or copy ``src`` to ``dst``."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_occluded(out: Path, name: str, result: OcclusionResult, with_instances: bool) -> None:
    buffer = io.BytesIO()
    Image.fromarray(result.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    atomic_bytes(out / "im" / f"{name}.jpg", buffer.getvalue())
    gt = np.where(result.masks[result.target], 255, 0).astype(np.uint8)
    atomic_bytes(out / "gt" / f"{name}.png", _png(gt))
    if with_instances:
        ids = np.zeros(gt.shape, np.uint8)
        for k, m in enumerate(result.masks, start=1):
            ids[m] = k
        ids[result.occluder_mask] = len(result.masks) + 1  # the occluder is the topmost object
        atomic_bytes(out / "instances" / f"{name}.png", _png(ids))


def examples_figure(path: Path, examples: list[dict[str, Any]]) -> None:
    """A grid of before / occluder / after panels with the target's outline (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(examples))
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, ex in zip(axes, examples):
        panels = [
            (ex["before"], ex["before_mask"], f"before: {ex['name']}"),
            (ex["occluder_image"], ex["occluder_mask"], "occluder source"),
            (ex["after"], ex["after_mask"], f"after (visible {ex['visible']:.3f})"),
        ]
        for ax, (image, mask, title) in zip(row, panels):
            ax.imshow(image)
            ax.contour(mask.astype(float), levels=[0.5], colors=["#00ff66"], linewidths=1.0)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[2].contour(ex["pasted"].astype(float), levels=[0.5], colors=["#ff3366"], linewidths=0.8)
    for ax in axes.ravel()[3 * len(examples) :]:
        ax.axis("off")
    fig.suptitle("Occlusion synthesis: target outline green, pasted occluder red", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


REASON_NOT_DRAWN = "not drawn"
REASON_OCCLUDER_UNUSABLE = "occluder image unusable"
REASON_NO_PLACEMENT = "no placement keeps the target visible"


class SynthesisError(RuntimeError):
    """Synthesising the outputs of one training image failed (the message names the image)."""


@dataclass
class _Drawn:
    """One synthesised occlusion (not yet written) and what the examples figure shows of it."""

    result: OcclusionResult
    occluder: data_lib.Sample
    occluder_mask: np.ndarray


@dataclass
class _Outcome:
    """What one training image gave: its outputs' manifest entries, in copy order.

    ``visible``: per entry, the visible fraction unrounded (None: not occluded); ``unusable``:
    (source index, reason) of every unusable sample met on the way, in the order met, repeats
    included (the merge records each once, where a single pass would have met it first).
    """

    index: int
    entries: list[dict[str, Any]] = field(default_factory=list)
    visible: list[float | None] = field(default_factory=list)
    unusable: list[tuple[int, str]] = field(default_factory=list)


class Synthesis:
    """Draws and writes the outputs of one training image at a time (in any process: picklable).

    Every output draws from its own generator seeded by ``(seed, image index, copy)`` and writes
    only its own files, so the images can be synthesised in any order and in several processes;
    :class:`Merged` puts the outcomes back in image order.
    """

    def __init__(
        self, sources: list[Source], *, cfg: OcclusionConfig, raw: Path, work: Path, instances: bool
    ):
        self.sources, self.cfg, self.raw, self.work, self.instances = sources, cfg, raw, work, instances
        self._bad: dict[int, str] = {}  # this process's unusable samples (index -> reason)

    def rel(self, path: Path | None) -> str | None:
        return portable_path(path, self.raw) if path is not None else None

    def name(self, index: int, copy: int) -> str:
        source = self.sources[index]
        return source.out_name if self.cfg.copies == 1 else f"{source.out_name}__c{copy}"

    def load(self, index: int, unusable: list[tuple[int, str]]) -> data_lib.Sample | None:
        """The sample of ``sources[index]``, or None (appended to ``unusable``) when it is unusable."""
        if index not in self._bad:
            try:
                return data_lib.load_sample(self.sources[index].pair)
            except data_lib.BadSampleError as err:
                self._bad[index] = str(err)
        unusable.append((index, self._bad[index]))
        return None

    def image(self, index: int) -> _Outcome:
        """Every output of image ``index``, written into the work folder; a failure names the image."""
        try:
            return self._image(index)
        except Exception as err:
            source = self.sources[index]
            raise SynthesisError(
                f"occlusion synthesis of {source.dataset}:{source.pair.name} ({source.pair.image_path}) "
                f"failed: {type(err).__name__}: {err}"
            ) from err

    def _image(self, index: int) -> _Outcome:
        outcome = _Outcome(index)
        sample = self.load(index, outcome.unusable)
        if sample is None:
            return outcome
        source = self.sources[index]
        for copy in range(self.cfg.copies):
            name = self.name(index, copy)
            entry, drawn = self.draw(index, sample, copy, outcome.unusable)
            if drawn is not None:
                _write_occluded(self.work, name, drawn.result, self.instances)
            else:
                _link(source.pair.image_path, self.work / "im" / f"{name}.jpg")
                _link(source.pair.mask_path, self.work / "gt" / f"{name}.png")
                if self.instances:
                    _link(source.pair.instances_path, self.work / "instances" / f"{name}.png")
            outcome.entries.append(entry)
            outcome.visible.append(None if drawn is None else drawn.result.visible_fraction)
        return outcome

    def draw(
        self, index: int, sample: data_lib.Sample, copy: int, unusable: list[tuple[int, str]]
    ) -> tuple[dict[str, Any], _Drawn | None]:
        """Output ``copy`` of image ``index``: its manifest entry, and the occlusion (with
        probability ``cfg.probability``; None: the image stays as it is). Writes nothing."""
        source, cfg = self.sources[index], self.cfg
        generator = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, copy]))
        entry: dict[str, Any] = {
            "name": self.name(index, copy),
            "source": f"{source.dataset}:{source.pair.name}",
            "source_image": self.rel(source.pair.image_path),
            "occluded": False,
        }
        if len(self.sources) < 2 or generator.random() >= cfg.probability:
            entry["reason"] = REASON_NOT_DRAWN
            return entry, None
        other = int(generator.integers(len(self.sources) - 1))
        other += other >= index  # another image, never the same one
        occluder = self.load(other, unusable)
        if occluder is None:
            entry["reason"] = REASON_OCCLUDER_UNUSABLE
            return entry, None
        occ_mask, occ_id = _occluder_object(occluder, generator)
        masks, object_ids, target = _objects(sample)
        result = synthesize_occlusion(
            sample.image, masks, occluder.image, occ_mask, target=target, generator=generator, config=cfg
        )
        entry["occluder"] = {
            "source": f"{self.sources[other].dataset}:{self.sources[other].pair.name}",
            "image": self.rel(self.sources[other].pair.image_path),
            "instance": occ_id,
        }
        if result is None:
            entry["reason"] = REASON_NO_PLACEMENT
            return entry, None
        entry.update(
            occluded=True,
            placement=result.placement.to_dict(),
            visible_fraction=round(result.visible_fraction, 5),
            dropped_objects=[object_ids[i] for i in result.dropped],  # ids of the source instance map
        )
        return entry, _Drawn(result, occluder, occ_mask)

    def example(self, index: int, copy: int) -> dict[str, Any]:
        """The before / occluder / after panels of an occluded output, drawn again (same generator)."""
        sample = self.load(index, [])
        entry, drawn = self.draw(index, sample, copy, [])
        result = drawn.result
        return {
            "name": entry["name"],
            "before": sample.image,
            "before_mask": sample.mask,
            "occluder_image": drawn.occluder.image,
            "occluder_mask": drawn.occluder_mask,
            "after": result.image,
            "after_mask": result.masks[result.target],
            "pasted": result.occluder_mask,
            "visible": result.visible_fraction,
        }


class Merged:
    """The outcomes put back in image order: entries, totals, visible fractions, skipped files,
    and which outputs the examples figure shows: what a single pass in image order records."""

    def __init__(self, job: Synthesis, skipped: list[dict[str, str]]):
        self.job = job
        self.skipped = list(skipped)
        self.entries: list[dict[str, Any]] = []
        self.visible: list[float] = []
        self.totals = dict.fromkeys(
            ("occluded", "unchanged", "placement_failed", "occluder_unusable", "dropped_objects"), 0
        )
        self._recorded: set[int] = set()
        # (image index, copy) of the occluded outputs the figure shows: clearly visible occlusions
        # first, in image order (tiny ones as a fallback).
        self._examples: list[tuple[int, int]] = []
        self._fallback_examples: list[tuple[int, int]] = []

    def add(self, outcome: _Outcome) -> None:
        for index, reason in outcome.unusable:
            if index not in self._recorded:
                self._recorded.add(index)
                pair = self.job.sources[index].pair
                logger.warning("skipping %s: %s", pair.image_path, reason)
                self.skipped.append(
                    {
                        "path": portable_path(pair.image_path, self.job.raw),
                        "reason": reason,
                        "dataset": self.job.sources[index].dataset,
                    }
                )
        for copy, (entry, visible) in enumerate(zip(outcome.entries, outcome.visible)):
            self.entries.append(entry)
            if visible is None:
                self.totals["unchanged"] += 1
                self.totals["placement_failed"] += entry["reason"] == REASON_NO_PLACEMENT
                self.totals["occluder_unusable"] += entry["reason"] == REASON_OCCLUDER_UNUSABLE
                continue
            self.totals["occluded"] += 1
            self.totals["dropped_objects"] += len(entry["dropped_objects"])
            self.visible.append(visible)
            pool = self._examples if visible < 0.95 else self._fallback_examples
            if len(pool) < self.job.cfg.num_examples:
                pool.append((outcome.index, copy))

    def examples(self) -> list[dict[str, Any]]:
        chosen = (self._examples + self._fallback_examples)[: self.job.cfg.num_examples]
        return [self.job.example(index, copy) for index, copy in chosen]


# The pool's workers: the job is sent once to each (initializer), then only image indices.
_WORKER_JOB: Synthesis | None = None


def _start_worker(job: Synthesis) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)  # one process per core already
    _WORKER_JOB = job


def _worker_image(index: int) -> _Outcome:
    return _WORKER_JOB.image(index)


def worker_count(workers: int | None) -> int:
    """``synthesize.workers``: None is every core this process may use; 0 and 1 run in-process."""
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers


def outcomes(job: Synthesis, workers: int) -> Iterator[_Outcome]:
    """Every image's outcome, in image order; with ``workers`` > 1 from a pool of processes."""
    indices = range(len(job.sources))
    if workers <= 1 or len(indices) < 2:
        yield from map(job.image, indices)
        return
    # spawn: a forked child would inherit the parent's OpenMP and thread state (torch), which can hang.
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(32, len(indices) // (4 * workers)))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(job,)) as pool:
        yield from pool.map(_worker_image, indices, chunksize=chunksize)
