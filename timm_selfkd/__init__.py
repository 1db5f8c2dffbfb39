"""timm-selfkd: self-knowledge distillation methods as one flag on any timm model.

Example:
    >>> import timm, timm_selfkd
    >>> model = timm.create_model('resnet18', num_classes=10)
    >>> task = timm_selfkd.create_task('bake', model, omega=0.5)
    >>> out = task(images, labels)  # {'loss', 'output', 'loss_ce', 'loss_kd'}

A loop of one's own: see `create_task` and `batch_sampler` (README, "Your own training loop").
"""
from timm_selfkd.registry import MethodSpec, get_method, list_methods, register_method
from timm_selfkd import methods  # noqa: F401  (registers the built-in methods)
from timm_selfkd.wiring import batch_sampler, create_task
from timm_selfkd.methods.base import Needs, RunInfo, SelfKDTask

__all__ = ['create_task', 'batch_sampler', 'register_method', 'list_methods', 'get_method', 'MethodSpec',
           'SelfKDTask', 'Needs', 'RunInfo']
__version__ = '0.1.0'
