"""Training: the prompt-mixture dataset, the sharded sampler, step functions and the one loop.

Everything random here is a pure function of explicit seeds: sample ``i`` of epoch ``e`` draws its
flip, jitter and prompt from ``np.random.default_rng([seed, e, i])`` and step ``s`` of rank ``r``
samples its loss points from ``torch.Generator`` seeded with ``(seed, s, r)``. So a run resumed at
step ``s`` sees exactly the batches and loss points of an uninterrupted run: the RNG state *is*
the step counter. :class:`ShardedBatchSampler` shards the same way across any number of workers.
"""

from .dataset import AugmentedPromptDataset, TrainingBatch, TrainingSample, collate_training
from .loop import LoopConfig, train_loop
from .prompt_sampling import (
    PromptSampler,
    jittered_box,
    precise_prompt_sampler,
    robust_prompt_sampler,
    seeded_generator,
)
from .sampler import ShardedBatchSampler
from .steps import StepOutput, correction_round, iou_head_targets, sam_training_step, supervised_step

__all__ = [
    "AugmentedPromptDataset",
    "LoopConfig",
    "PromptSampler",
    "ShardedBatchSampler",
    "StepOutput",
    "TrainingBatch",
    "TrainingSample",
    "collate_training",
    "correction_round",
    "iou_head_targets",
    "jittered_box",
    "precise_prompt_sampler",
    "robust_prompt_sampler",
    "sam_training_step",
    "seeded_generator",
    "supervised_step",
    "train_loop",
]
