"""Image-embedding cache: the encoder runs once per image, preprocessing and SAM weights.

SAM's image encoder is frozen in Stable-SAM, so its output for an image never changes. Entries are
keyed by the image content (sha256 of the pixels, shape and dtype), the preprocessing that turned
it into the model input ("longest_side", "stretch", ...) and the encoder's identity
(``StableSam.encoder_id()``: SAM type + SAM checkpoint sha256, or a hash of the weights for random
models, + the encoder precision of the fast path: a bf16 embedding is never served to an fp32 run,
nor the other way round). Entries live in memory (LRU)
and, optionally, on disk as ``<dir>/<key[:2]>/<key>.pt`` written atomically.

An entry is never trusted blindly: one that does not load, or loads but does not have the form
the reader expects (:class:`EmbeddingSpec`: embedding shape and dtype, input and original
sizes), is a miss with a warning naming the entry file; the caller recomputes it and ``put``
overwrites it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_torch_save

__all__ = [
    "CachedEmbedding",
    "EmbeddingCache",
    "EmbeddingSpec",
    "ReadOnlyEmbeddingCache",
    "image_key",
]

logger = logging.getLogger(__name__)


@dataclass
class CachedEmbedding:
    """One image's encoder output.

    Attributes:
      embedding: 1 x C x H x W image embedding (CPU tensor).
      input_size: (h, w) of the resized image inside the model's square input.
      original_size: (H, W) of the image as given.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a reader expects of an entry; None fields are not checked.

    Attributes:
      shape: of the embedding, 1 x C x H x W (SAM: 1 x prompt_encoder.embed_dim x
        prompt_encoder.image_embedding_size).
      dtype: of the embedding.
      input_size: (h, w) the image was resized to.
      original_size: (H, W) of the image.
    """

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    input_size: tuple[int, int] | None = None
    original_size: tuple[int, int] | None = None


def _size(value: object) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, (tuple, list, torch.Size)) else repr(value)


def _problem(entry: CachedEmbedding, spec: EmbeddingSpec | None) -> str | None:
    """Why an entry cannot be used (None: it can)."""
    emb = entry.embedding
    if not isinstance(emb, torch.Tensor) or emb.ndim != 4 or emb.shape[0] != 1 or not emb.is_floating_point():
        what = (
            f"{_size(tuple(emb.shape))} {emb.dtype}" if isinstance(emb, torch.Tensor) else type(emb).__name__
        )
        return f"the embedding is {what}, not a 1 x C x H x W float tensor"
    for name, size in (("input_size", entry.input_size), ("original_size", entry.original_size)):
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            return f"{name} is {size!r}, not two positive ints"
    if spec is None:
        return None
    if spec.shape is not None and tuple(emb.shape) != tuple(spec.shape):
        return f"the embedding is {_size(tuple(emb.shape))}, the model expects {_size(tuple(spec.shape))}"
    if spec.dtype is not None and emb.dtype != spec.dtype:
        return f"the embedding is {emb.dtype}, the model expects {spec.dtype}"
    for name, got, want in (
        ("input_size", entry.input_size, spec.input_size),
        ("original_size", entry.original_size, spec.original_size),
    ):
        if want is not None and tuple(got) != tuple(want):
            return f"{name} is {_size(got)}, expected {_size(want)}"
    return None


def image_key(image: np.ndarray | torch.Tensor, *, model_id: str, preprocess: str) -> str:
    """The cache key of an image for one encoder and one preprocessing."""
    digest = hashlib.sha256()
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    digest.update(f"{model_id}|{preprocess}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """A memory LRU of image embeddings, backed by an optional folder.

    Args:
      directory: where to persist entries (None: memory only).
      max_memory_items: LRU size; 0 keeps nothing in memory (disk only).
    """

    def __init__(self, directory: str | Path | None = None, *, max_memory_items: int = 256) -> None:
        self.directory = None if directory is None else Path(directory)
        self.max_memory_items = max_memory_items
        self._memory: OrderedDict[str, CachedEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str, spec: EmbeddingSpec | None = None) -> CachedEmbedding | None:
        """The entry of ``key``, or None (a miss).

        An entry that does not load, or does not fit ``spec`` (or is not a 1 x C x H x W float
        embedding with two (h, w) sizes at all), is a miss: a warning names the entry and why,
        and the memory copy is dropped; the caller's ``put`` of the recomputed one overwrites it.
        """
        entry = self._memory.get(key)
        if entry is not None:
            problem = _problem(entry, spec)
            if problem is None:
                self._memory.move_to_end(key)
                self.hits += 1
                return entry
            logger.warning("ignoring in-memory embedding cache entry %s: %s; recomputing it", key, problem)
            del self._memory[key]
        elif self.directory is not None and self._path(key).is_file():
            path = self._path(key)
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                entry = CachedEmbedding(
                    embedding=payload["embedding"],
                    input_size=tuple(payload["input_size"]),
                    original_size=tuple(payload["original_size"]),
                )
            except Exception as err:  # a damaged entry is recomputed, never trusted
                logger.warning("ignoring unreadable embedding cache entry %s: %s; recomputing it", path, err)
            else:
                problem = _problem(entry, spec)
                if problem is None:
                    self._remember(key, entry)
                    self.hits += 1
                    return entry
                logger.warning("ignoring embedding cache entry %s: %s; recomputing it", path, problem)
        self.misses += 1
        return None

    def put(self, key: str, entry: CachedEmbedding) -> None:
        entry = CachedEmbedding(
            entry.embedding.detach().cpu(), tuple(entry.input_size), tuple(entry.original_size)
        )
        self._remember(key, entry)
        if self.directory is not None:
            atomic_torch_save(
                {
                    "embedding": entry.embedding,
                    "input_size": list(entry.input_size),
                    "original_size": list(entry.original_size),
                },
                self._path(key),
            )

    def _remember(self, key: str, entry: CachedEmbedding) -> None:
        if self.max_memory_items <= 0:
            return
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_memory_items:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)


class ReadOnlyEmbeddingCache(EmbeddingCache):
    """An :class:`EmbeddingCache` that reads a folder written by someone else and never writes it.

    Pipeline stages read the ``embed`` stage's output through it: a miss is computed and kept in
    memory only, so no stage modifies another stage's DVC output. ``computed`` counts those misses.
    """

    def __init__(self, directory: str | Path | None = None, *, max_memory_items: int = 100_000) -> None:
        super().__init__(directory, max_memory_items=max_memory_items)
        self.computed = 0

    def put(self, key: str, entry: CachedEmbedding) -> None:
        self.computed += 1
        self._remember(
            key,
            CachedEmbedding(
                entry.embedding.detach().cpu(), tuple(entry.input_size), tuple(entry.original_size)
            ),
        )
