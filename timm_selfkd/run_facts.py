"""What a run tells a task: its facts before the first step (`RunInfo`, given to `SelfKDTask.bind_run`) and each
training step's record (`BatchInfo`, read by `SelfKDTask.batch_info()`). A leaf: the methods, the components and
the run machinery all read these records, and it imports none of them."""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ['RunInfo', 'BatchInfo']


@dataclass(frozen=True)
class BatchInfo:
    """What the task may know about the batch it trains on.

    Attributes:
        epoch: Epoch of the batch (the sampler's epoch, which may differ from the loop's near an epoch boundary
            for samplers whose stream crosses epochs).
        step: Batch number within the epoch, from 0.
        indices: Dataset index of each image, in batch order (CPU int64 tensor).
    """
    epoch: int
    step: int
    indices: torch.Tensor


@dataclass(frozen=True)
class RunInfo:
    """Facts about the training run that a task may need, given to it by `bind_run` before the first step.

    Attributes:
        num_epochs: Epochs of the whole run (None where a method does not need it, in `create_task`).
        steps_per_epoch: Training steps (batches) per epoch.
        num_samples: Training-set size; None for streamed data sets.
        num_classes: Classes of the model (None for a model that does not tell).
        batch_size: Images (rows) per step and process.
        world_size: Number of processes.
        rank: This process's rank.
        local_rank: Its rank within its node.
        local_world_size: Processes on its node.
        mixup: timm's batch-form `Mixup` for a method whose `Needs.mixup` is 'task' (None: no mixup).
        batch_info: Where `batch_info()` reads each step's record (the batch stream), for `Needs.sample_indices`;
            None in a hand-written loop, which passes `indices=` to the task's call.
    """
    num_epochs: Optional[int]
    steps_per_epoch: Optional[int]
    num_samples: Optional[int]
    num_classes: Optional[int]
    batch_size: Optional[int]
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    mixup: Optional[Any] = None
    batch_info: Optional[Callable[[], BatchInfo]] = None
