"""What every self-KD task shares: the trainable module, timm's criterion, DDP/compile/eval-model plumbing."""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler
from timm.models import group_parameters
from timm.task import TrainingTask, resolve_classification_loss

from timm_selfkd.components.losses import float32_region
from timm_selfkd.runtime.metrics import CalibrationEvaluator
from timm_selfkd.registry import method_name
from timm_selfkd.runtime.batch_stream import BatchInfo

__all__ = ['SelfKDTask', 'ModelWrapper', 'LogitsAndFeatures', 'has_pooled_features', 'RunInfo', 'check_range',
           'world_size']


@dataclass(frozen=True)
class RunInfo:
    """Facts about the training run that a task may need, given to it by `bind_run` before the first step.

    Attributes:
        num_epochs: Epochs of the whole run.
        steps_per_epoch: Training steps (batches) per epoch.
        num_samples: Training-set size; None for streamed data sets.
        num_classes: Classes of the model.
        batch_size: Images per step and process.
        world_size: Number of processes.
        rank: This process's rank.
        local_rank: Its rank within its node.
        local_world_size: Processes on its node.
    """
    num_epochs: int
    steps_per_epoch: int
    num_samples: Optional[int]
    num_classes: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1


def world_size() -> int:
    """Number of processes of the initialised process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_range(method: str, name: str, value: float, low: float, high: float = float('inf')) -> None:
    """Raise a ValueError naming the hyper-parameter when `value` lies outside [low, high]."""
    if not low <= value <= high:
        upper = '' if high == float('inf') else f' and <= {high}'
        raise ValueError(f'{method} {name} must be >= {low}{upper}, got {value}')


class ModelWrapper(nn.Module):
    """Base of the trainable modules that wrap a timm model (`self.model`) to return more than its logits.

    All gradient work happens inside the wrapper's `forward`, so DDP sees a single forward per step.
    Parameter names gain a `model.` prefix; weight-decay exclusions and layer groups (for `--layer-decay`)
    follow the wrapped model, and the wrapper's own parameters (e.g. auxiliary heads) join the last group.
    `SelfKDTask.get_eval_model` returns the wrapped model, so validation, EMA evaluation and checkpoints see
    the plain timm model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def no_weight_decay(self):
        return {f'model.{name}' for name in getattr(self.model, 'no_weight_decay', lambda: ())()}

    def group_matcher(self, coarse: bool = False):
        if not hasattr(self.model, 'group_matcher'):  # not a timm model: one group, layer decay has no effect
            return lambda name: 0
        layer_of = group_parameters(self.model, self.model.group_matcher(coarse=coarse), reverse=True)
        last = max(layer_of.values(), default=0)
        return lambda name: layer_of.get(name[len('model.'):], last) if name.startswith('model.') else last

    def logits_and_features(self, feature_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled pre-logit features from the output of `forward_features`, running the head once.

        The features are the input of the model's classifier, captured while `forward_head` runs, so the head
        (pooling, head convs and norms, dropout) runs once per step as in plain training. (With `--drop`,
        models that drop out after their pre-logits, e.g. MobileNetV3, give dropped-out features.) Models
        whose classifier is not one module (e.g. distilled DeiT's two heads) get `forward_head(pre_logits=True)`.
        """
        classifier = self.model.get_classifier() if hasattr(self.model, 'get_classifier') else None
        if not isinstance(classifier, nn.Module):
            return self.model.forward_head(feature_map), self.model.forward_head(feature_map, pre_logits=True)
        captured = []
        handle = classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.model.forward_head(feature_map)
        finally:
            handle.remove()
        if not captured:
            return logits, self.model.forward_head(feature_map, pre_logits=True)
        return logits, captured[0].flatten(1)  # conv classifiers (ResNetV2, DLA, DPN) take (B, C, 1, 1)


class LogitsAndFeatures(ModelWrapper):
    """A timm model that returns `(logits, pooled pre-logit features)` from one forward pass
    (see `ModelWrapper.logits_and_features`)."""

    def __init__(self, model: nn.Module):
        if not has_pooled_features(model):
            raise ValueError(f'model {type(model).__name__} has no forward_features/forward_head(pre_logits=True), '
                             'which this method needs for pooled features')
        super().__init__(model)

    def forward(self, input: torch.Tensor):
        return self.logits_and_features(self.model.forward_features(input))


def has_pooled_features(model: nn.Module) -> bool:
    head = getattr(model, 'forward_head', None)
    return (callable(getattr(model, 'forward_features', None)) and callable(head)
            and 'pre_logits' in inspect.signature(head).parameters)


class SelfKDTask(TrainingTask):
    """Base class of every method: returns `loss`, `output` and named loss terms from `forward`.

    Subclasses implement `forward`, and may override `wrap_model` (to change what the trainable module
    returns), `check_setup` (to refuse option combinations that cannot work), `batch_sampler` and
    `bind_batch_sampler` (to choose which images share a batch), `bind_run` (to learn the run's length and
    data set size) and `get_task_state`/`load_task_state` with `sync_task_state` (for state that must survive
    `--resume`, per rank under DDP). A task that sets `needs_batch_info` calls `batch_info()` once per training
    `forward` to learn the epoch, step and dataset indices of its batch. A task that sets `mixes_batches`
    receives timm's batch-form `Mixup` through `bind_mixup` when mixup/CutMix is on, gets its batches unmixed
    (hard labels) and mixes them itself (DLB replays the previous step's mix on its repeated half).

    Args:
        model: A timm model, already on `device`.
        hparams: The method's hyper-parameter dataclass.
        criterion: Hard-label loss; created by timm's `create_classification_loss(**criterion_kwargs)` if None.
        criterion_kwargs: e.g. `dict(smoothing=0.1)`.
        device: Device of the task's tensors.
    """

    supports_mixup = False
    needs_batch_info = False
    mixes_batches = False  # with mixup/CutMix on, the loop leaves batches unmixed and calls bind_mixup
    full_batch_output = True  # `output` has a row per input row, in order (a batch layout can stack on it)
    mixup_conflict = 'its soft targets are not defined for mixed images'

    def __init__(
            self,
            model: nn.Module,
            hparams: Any,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = False,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.hparams = hparams
        self.trainable_module = self.wrap_model(model)
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.run: Optional[RunInfo] = None
        self._batch_info_source: Optional[Callable[[], BatchInfo]] = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module that owns the parameters and runs the forward pass (the model itself by default)."""
        return model

    @classmethod
    def check_setup(cls, hparams: Any, *, batch_size: int, mixup: bool) -> None:
        """Raise a ValueError for option combinations this method cannot train correctly."""
        if mixup and not cls.supports_mixup:
            raise ValueError(f'--mixup/--cutmix are not supported with --selfkd {method_name(hparams)}: '
                             f'{cls.mixup_conflict}')

    @classmethod
    def batch_sampler(
            cls,
            hparams: Any,
            *,
            index_sampler: Sampler[int],
            labels: Optional[Sequence[int]],
            batch_size: int,
            seed: int,
            rank: int,
            world_size: int,
    ) -> Optional[Sampler]:
        """The batch sampler that replaces the loader's own, or None to keep timm's batching."""
        return None

    def takes_streamed_data(self) -> bool:
        """Whether the task trains on a streamed data set: with timm's own batches and no sample indices
        (`needs_batch_info` may be set per task, from its hyper-parameters)."""
        return type(self).batch_sampler.__func__ is SelfKDTask.batch_sampler.__func__ and not self.needs_batch_info

    def bind_batch_sampler(self, batch_sampler: Sampler) -> None:
        """Receive the sampler `batch_sampler()` returned, for tasks that depend on its batch layout."""

    def bind_mixup(self, mixup) -> None:
        """Receive timm's batch-form `Mixup` (tasks with `mixes_batches`, which mix each batch in `forward`)."""

    def bind_run(self, run: RunInfo) -> None:
        """Receive the run's facts before the first step (stored as `self.run`)."""
        self.run = run

    def bind_batch_info_source(self, source: Callable[[], BatchInfo]) -> None:
        """Where `batch_info()` reads from: the training `BatchStream.pop`, or any callable in tests."""
        self._batch_info_source = source

    def batch_info(self, batch_size: Optional[int] = None) -> BatchInfo:
        """Epoch, step and dataset indices (on the task's device) of the batch being trained on.

        Args:
            batch_size: The batch's size, checked against the record so that a channel out of step fails loudly.
        """
        if self._batch_info_source is None:
            raise RuntimeError(f'{type(self).__name__} needs the batch information channel (bind_batch_info_source)')
        info = self._batch_info_source()
        if batch_size is not None and info.indices.numel() != batch_size:
            raise RuntimeError(f'batch information of {info.indices.numel()} images for a batch of {batch_size}')
        return BatchInfo(info.epoch, info.step, info.indices.to(self.device, non_blocking=True))

    def sync_task_state(self) -> None:
        """Collective run on every rank before rank 0 saves a checkpoint, for per-rank task state."""

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        """Raise a ValueError when a checkpoint's task state cannot resume this run (checked before the model
        weights are loaded, so that a mismatch is reported as such, not as a failed `load_state_dict`)."""

    def load_checkpoint_state(self, state_dict, task_state=None, ema: bool = False, strict: bool = True) -> None:
        if not ema:
            self.check_task_state(task_state)
        super().load_checkpoint_state(state_dict, task_state, ema=ema, strict=strict)

    def create_evaluator(self, **kwargs) -> CalibrationEvaluator:
        """timm's loss/top-1/top-5 evaluator plus NLL, ECE and AURC (`timm_selfkd.runtime.metrics`)."""
        return CalibrationEvaluator(device=self.device, **kwargs)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The hard-label term, in float32 under any autocast."""
        with float32_region(logits):
            return self.criterion(logits.float(), target)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'SelfKDTask':
        from torch.nn.parallel import DistributedDataParallel
        if device_ids is not None and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None  # DDP of a CPU module takes none (timm's train.py passes [device] on every device)
        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        eval_model = self.get_eval_model()
        wrapped = eval_model is not self.trainable_module
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = torch.compile(eval_model, backend=backend, mode=mode, **compile_kwargs) \
            if wrapped else self.trainable_module
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The bare timm model inside any wrapper (DDP, EMA, compile, a `ModelWrapper`)."""
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:
            if isinstance(current, ModelWrapper):
                return current.model
            current = getattr(current, 'module', None) or getattr(current, '_orig_mod', None)
        return resolved

    def eval_forward(self, ema: bool = False) -> Callable[[torch.Tensor], Any]:
        """What validation calls on each batch of images; its output goes to `create_evaluator()`'s `update`.

        The default is the eval model itself (logits). Tasks whose evaluator reports more than the deployed
        model's metrics (e.g. auxiliary exits) return a callable that also computes what that evaluator needs.
        """
        return self.get_eval_model(ema=ema)
