"""Image-embedding cache: the encoder runs once per image, preprocessing and SAM weights.

SAM's image encoder is frozen in Stable-SAM, so its output for an image never changes. Entries are
keyed by the image content (sha256 of the pixels, shape and dtype), the preprocessing that turned
it into the model input ("longest_side", "stretch", ...) and the encoder's identity (SAM type +
SAM checkpoint sha256, or a hash of the weights for random models). Entries live in memory (LRU)
and, optionally, on disk as ``<dir>/<key[:2]>/<key>.pt`` written atomically.
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

__all__ = ["CachedEmbedding", "EmbeddingCache", "image_key"]

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

    def get(self, key: str) -> CachedEmbedding | None:
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return entry
        if self.directory is not None and self._path(key).is_file():
            try:
                payload = torch.load(self._path(key), map_location="cpu", weights_only=True)
                entry = CachedEmbedding(
                    embedding=payload["embedding"],
                    input_size=tuple(payload["input_size"]),
                    original_size=tuple(payload["original_size"]),
                )
            except Exception as err:  # a damaged entry is recomputed, never trusted
                logger.warning("ignoring unreadable embedding cache entry %s: %s", self._path(key), err)
            else:
                self._remember(key, entry)
                self.hits += 1
                return entry
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
