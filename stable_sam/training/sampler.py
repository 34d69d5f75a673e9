"""Batches sharded over Ray Train workers, deterministic per (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from .prompt_sampling import seeded_generator

__all__ = ["ShardedBatchSampler"]


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Deterministic, resumable sharding: batch ``s`` of rank ``r`` is a pure function of (seed, s, r).

    Batches are lists of ``(epoch, index)`` keys, so the dataset's per-sample randomness does not
    depend on which process loads the sample or when.

    Each epoch is a seeded permutation of the dataset, cut into global batches of
    ``num_replicas * local_batch`` (the last incomplete one dropped, as HQ-SAM's drop_last);
    rank ``r`` takes the ``r``-th slice of each global batch. Starting at ``start_step`` skips the
    finished steps without loading them (``DistributedSampler`` can only skip by iterating).

    Args:
      dataset_size: number of samples.
      local_batch: samples per rank and step.
      num_replicas, rank: the worker group.
      seed: base seed.
      total_steps: steps to produce (may span several epochs).
      start_step: first step to produce (resume).
    """

    def __init__(
        self,
        *,
        dataset_size: int,
        local_batch: int,
        num_replicas: int,
        rank: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
    ) -> None:
        if local_batch < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sharding: local_batch={local_batch}, rank={rank} of {num_replicas}")
        self.steps_per_epoch = dataset_size // (local_batch * num_replicas)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"dataset of {dataset_size} samples is smaller than one global batch "
                f"({num_replicas} workers x {local_batch})"
            )
        self.dataset_size = dataset_size
        self.local_batch = local_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.total_steps = total_steps
        self.start_step = start_step

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = seeded_generator(self.seed, epoch).permutation(self.dataset_size)
        global_batch = self.local_batch * self.num_replicas
        start = within * global_batch + self.rank * self.local_batch
        return [(epoch, int(i)) for i in order[start : start + self.local_batch]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)
