"""timm-selfkd: self-knowledge distillation methods as one flag on any timm model.

Example:
    >>> import timm, timm_selfkd
    >>> model = timm.create_model('resnet18', num_classes=10)
    >>> task = timm_selfkd.create_task('bake', model, omega=0.5)
    >>> out = task(images, labels)  # {'loss', 'output', 'loss_ce', 'loss_kd'}
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from timm_selfkd.registry import MethodSpec, build_hparams, get_method, list_methods, register_method
from timm_selfkd import methods  # noqa: F401  (registers the built-in methods)

__all__ = ['create_task', 'register_method', 'list_methods', 'get_method', 'MethodSpec']
__version__ = '0.1.0'


def create_task(
        name: str,
        model: nn.Module,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        **hparams,
):
    """Create the `timm.task.TrainingTask` of method `name` around `model`.

    Args:
        name: A registered method (`list_methods()`), `none` for plain classification.
        model: A timm model, already on `device`.
        criterion_kwargs: Arguments for timm's `create_classification_loss` (e.g. `smoothing`, `soft_targets`).
        device: Device of the task's state; defaults to the model's.
        **hparams: The method's hyper-parameters (`get_method(name).hparams_cls` fields); defaults are the paper's.
    """
    spec = get_method(name)
    if device is None:
        device = next(model.parameters()).device
    return spec.task_cls(model, build_hparams(spec, hparams), criterion_kwargs=criterion_kwargs, device=device)
