"""What a method costs besides its step: the state it keeps between steps, and how its batches read the data set.

Both are read from the method itself, not from a table: the state from `task.get_task_state()` (what its
checkpoint keeps beyond the model: training-only parts, weight copies, per-sample tables), the reading pattern from
its batch sampler (`timm_selfkd.batch_sampler`) over N images.
"""
from typing import Any, Callable, List

import numpy as np
import torch

import timm_selfkd
from timm_selfkd.methods.base import SelfKDTask

__all__ = ['state_bytes', 'per_sample_state_bytes', 'balanced_labels', 'steps_per_epoch']

PROBE_SAMPLES = 256  # data-set sizes of the two probe tasks whose state difference gives the per-sample bytes


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: dicts, lists and tuples of tensors and plain values."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def state_bytes(task: SelfKDTask) -> int:
    """Bytes of the task state: what the method keeps between steps beyond the model and its optimizer."""
    return tensor_bytes(task.get_task_state())


def per_sample_state_bytes(task: SelfKDTask, build_task: Callable[[int], SelfKDTask]) -> float:
    """Bytes per training image of the method's state (PS-KD's table of past predictions), 0 for a method that is
    not told the data-set size: the state difference of two tasks built for `PROBE_SAMPLES` and twice as many
    images (`build_task(num_samples)`)."""
    if 'num_samples' not in task.needs.run_facts:
        return 0.
    small, large = (state_bytes(build_task(n)) for n in (PROBE_SAMPLES, 2 * PROBE_SAMPLES))
    return (large - small) / PROBE_SAMPLES


def balanced_labels(num_classes: int, num_samples: int) -> List[int]:
    """Labels of `num_samples` images in `num_classes` classes of (nearly) equal size."""
    return (np.arange(num_samples) % num_classes).tolist()


def steps_per_epoch(task: SelfKDTask, labels: List[int], batch_size: int) -> int:
    """Steps of one epoch of the method's batches over images of these labels: `len(labels)` / steps images per
    step are new, steps x `batch_size` / `len(labels)` reads per image."""
    return len(timm_selfkd.batch_sampler(task, labels, batch_size))
