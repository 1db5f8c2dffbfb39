"""What every self-KD task shares: the trainable module, timm's criterion, DDP/compile/eval-model plumbing."""
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler
from timm.models import group_parameters
from timm.utils import unwrap_model
from timm.task import TrainingTask, resolve_classification_loss

from timm_selfkd.components.losses import float32_region
from timm_selfkd.components.training_parts import TrainingPart, check_parts_state, load_parts_state, parts_state
from timm_selfkd.methods.layout import BatchLayout
from timm_selfkd.registry import hparam_flag
from timm_selfkd.runtime.metrics import CalibrationEvaluator
from timm_selfkd.run_facts import BatchInfo, RunInfo

__all__ = ['Needs', 'RunInfo', 'SelfKDTask', 'ModelWrapper', 'LogitsAndFeatures', 'has_pooled_features',
           'world_size']


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run that trains it: its one record, computed from its hyper-parameters by
    `SelfKDTask.requirements(hparams)`. The training loop, the upstream adapter, `create_task` and stacks read
    this record and the hooks of `SelfKDTask`, nothing else (`timm_selfkd.wiring` wires it).

    ======================  =========  ==========================================================  ===========
    field                   default    the method ...                                              used by
    ======================  =========  ==========================================================  ===========
    `run_facts`             {}         needs these `RunInfo` facts in `bind_run` (name -> why)     DLB, MrKD,
                                                                                                   PS-KD, BYOT
    `own_batches`           False      chooses which images share a batch (`batch_sampler`, drawn  DLB, BAKE,
                                       from the run's index sampler, so that --aug-repeats         CS-KD, DDGSD
                                       composes)
    `sample_indices`        False      reads each row's dataset index and epoch (`batch_info()`)   PS-KD, BYOT
                                       in every training forward                                   + PS-KD
    `mixup`                 'loader'   takes mixup/CutMix as 'loader' (mixed batches, soft         DLB, CS-KD,
                                       targets) or 'task' (unmixed batches, hard labels; it mixes  DDGSD, PS-KD,
                                       them with `RunInfo.mixup`)                                  MixSKD: task
    `bce_refusal`           ''         cannot train with --bce-loss, for this one-line reason (a   PS-KD
                                       loss defined only for softmax); '': its hard-label term is
                                       the criterion (`cross_entropy`), which BCE then replaces
    `row_aligned_output`    True       returns `output` with one row per input row, in order, so   CS-KD: False
                                       that a batch layout can stack on it
    ======================  =========  ==========================================================  ===========

    Derived: `streamed_data` (a streamed data set, which has neither sampler nor indices, can train the method).
    A batch layout (DDGSD) declares its layout on the task class (`SelfKDTask.layout`), not here.
    """
    run_facts: Mapping[str, str] = field(default_factory=dict)
    own_batches: bool = False
    sample_indices: bool = False
    mixup: str = 'loader'
    bce_refusal: str = ''
    row_aligned_output: bool = True

    def __post_init__(self):
        if self.mixup not in ('loader', 'task'):
            raise ValueError(f"Needs.mixup must be 'loader' or 'task', got {self.mixup!r}")

    @property
    def streamed_data(self) -> bool:
        return not (self.own_batches or self.sample_indices)


def world_size() -> int:
    """Number of processes of the initialised process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ModelWrapper(nn.Module):
    """Base of the trainable modules that wrap a timm model (`self.model`) to return more than its logits.

    All gradient work happens inside the wrapper's `forward`, so DDP sees a single forward per step.
    Parameter names gain a `model.` prefix; weight-decay exclusions and layer groups (for `--layer-decay`)
    follow the wrapped model, and the wrapper's own parameters (e.g. auxiliary heads) join the last group.
    `SelfKDTask.get_eval_model` returns the wrapped model, so validation, EMA evaluation and checkpoints see
    the plain timm model. Training-only parts (exits, branches, self-teachers) are declared in `training_parts`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_parts(self) -> Dict[str, TrainingPart]:
        """The wrapper's training-only parts by task-state key (none by default), e.g.
        `{'head': TrainingPart(self.head, {'head_level': self.level}, set_by=('level',))}`. Declaring a part is all
        a method does for it: `SelfKDTask` saves it, checks and loads it on resume, of the EMA model too."""
        return {}

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

    A method declares what it needs from a run in one record, `requirements(hparams) -> Needs` (see `Needs`),
    and implements `forward`. The hooks, each optional, who calls them (`timm_selfkd.wiring` for the three ways
    of running) and which methods define them:

    ===========================================  ===================================  ===========  =================
    hook                                         what it is for                       called by    defined by
    ===========================================  ===================================  ===========  =================
    `requirements(hparams)` (class method)       the method's `Needs`                 wiring,      every method
                                                                                      stack
    `check_setup(hparams, batch_size=)` (class)  refuse what cannot train at this     wiring       batch choosers,
                                                 batch size                                        stack
    `wrap_model(model)`                          the trainable module (default: the   `__init__`   most methods
                                                 model)
    `batch_sampler(index_sampler, labels, ...)`  the batches, for `Needs.own_batches` wiring       batch choosers,
                                                                                                   stack
    `bind_run(run)`                              the run's facts (`RunInfo`: length,  wiring       most methods
                                                 data-set size, mixup, batch records)
    `get/load/check/sync_task_state`             state that survives `--resume`       checkpoints  stateful methods
                                                 (gathered from every rank first); by
                                                 default the training-only parts of
                                                 the `ModelWrapper` (`training_parts()`:
                                                 saved, EMA-averaged, checked, loaded);
                                                 extend with super() for more
    `eval_forward(ema)`, `create_evaluator()`    what validation calls and measures   the loops    exits (BYOT, DKS)
    `layout` (class attribute)                   a `BatchLayout` that can lead a      stack        DDGSD
                                                 stack (`methods/layout.py`)
    ===========================================  ===================================  ===========  =================

    A task with `Needs.sample_indices` calls `batch_info()` once per training `forward`. The method's name and
    hyper-parameters travel with the task (`task.method`, `task.hparams`, `task.needs`).

    Args:
        model: A timm model, already on `device`.
        hparams: The method's hyper-parameter dataclass.
        criterion: Hard-label loss; created by timm's `create_classification_loss(**criterion_kwargs)` if None.
        criterion_kwargs: e.g. `dict(smoothing=0.1)`.
        device: Device of the task's tensors.
    """

    layout: Optional[BatchLayout] = None  # a batch layout's hooks (`methods/layout.py`); None: not a layout

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
        self._epoch = 0  # of a hand-written loop (`set_epoch`), for the indices given to `__call__`
        self._given: Optional[BatchInfo] = None
        self._given_steps = 0

    @property
    def method_hparams(self) -> Any:
        """The hyper-parameters as registered with the method (a stack's hold both parts)."""
        return self.hparams

    @property
    def method(self) -> str:
        """The registered name the task runs (a preset's or a stack's)."""
        return self.method_hparams.method

    @property
    def needs(self) -> Needs:
        """The method's record for the task's hyper-parameters."""
        return self.requirements(self.method_hparams)

    @classmethod
    def requirements(cls, hparams: Any) -> Needs:
        """What the method needs from a run with these hyper-parameters (default: nothing special)."""
        return Needs()

    @classmethod
    def check_setup(cls, hparams: Any, *, batch_size: int) -> None:
        """Raise a ValueError for hyper-parameters this method cannot train at `batch_size` images per step."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module that owns the parameters and runs the forward pass (the model itself by default)."""
        return model

    def batch_sampler(
            self,
            *,
            index_sampler: Sampler[int],
            labels: Optional[Sequence[int]],
            batch_size: int,
            seed: int,
            rank: int,
            world_size: int,
    ) -> Sampler:
        """The batch sampler of a method with `Needs.own_batches` (over the shuffled, rank-aware `index_sampler`)."""
        raise NotImplementedError(f'{type(self).__name__} keeps timm\'s batches (Needs.own_batches is False)')

    def bind_run(self, run: RunInfo) -> None:
        """Receive the run's facts before the first step (stored as `self.run`)."""
        self.run = run

    def set_epoch(self, epoch: int) -> None:
        """A hand-written loop tells the epoch of the next batches (read with the `indices` of `__call__`)."""
        self._epoch = epoch

    def __call__(self, input: torch.Tensor, target: torch.Tensor, indices: Optional[torch.Tensor] = None):
        """`task(images, labels)`; a hand-written loop training a method with `Needs.sample_indices` passes each
        image's dataset index too (`indices=`, a (B,) integer tensor), and calls `set_epoch` every epoch."""
        if indices is not None:
            self._given = BatchInfo(self._epoch, self._given_steps, torch.as_tensor(indices).flatten())
            self._given_steps += 1
        return super().__call__(input, target)

    def batch_info(self, batch_size: Optional[int] = None) -> BatchInfo:
        """Epoch, step and dataset indices (on the task's device) of the batch being trained on.

        Args:
            batch_size: The batch's size, checked against the record so that a channel out of step fails loudly.
        """
        if self._given is not None:
            info, self._given = self._given, None
        elif self.run is not None and self.run.batch_info is not None:
            info = self.run.batch_info()
        else:
            raise ValueError(f'{self.method} reads the dataset index of every image: call the task as '
                             'task(images, labels, indices=...) (and task.set_epoch(epoch) every epoch)')
        if batch_size is not None and info.indices.numel() != batch_size:
            raise RuntimeError(f'batch information of {info.indices.numel()} images for a batch of {batch_size}')
        return BatchInfo(info.epoch, info.step, info.indices.to(self.device, non_blocking=True))

    # Task state. By default it is the training-only parts the trainable module declares
    # (`ModelWrapper.training_parts`); a method with more state extends these hooks and calls super().

    def unwrapped_module(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """`module`, or the trainable module (of the EMA model with `ema`), without its DDP/compile/EMA wrappers:
        the `ModelWrapper` whose training-only parts a task saves and loads as task state. None before setup."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        return None if module is None else unwrap_model(module)

    def training_parts(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, TrainingPart]:
        """The training-only parts of `module` or the trainable module (of the EMA model with `ema`); {} before
        `setup_ema()` and for a module that is not a `ModelWrapper`."""
        module = self.unwrapped_module(module, ema)
        return module.training_parts() if isinstance(module, ModelWrapper) else {}

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The training-only parts (of the EMA model with `ema`): each one's weights and what it was built for."""
        return parts_state(self.training_parts(module, ema))

    def sync_task_state(self) -> None:
        """Collective run on every rank before rank 0 saves a checkpoint, for per-rank task state."""

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        """Raise a ValueError when a checkpoint's task state cannot resume this run (checked before the model
        weights are loaded, so that a mismatch is reported as such, not as a failed `load_state_dict`): by default,
        a training-only part built for other levels or shapes, naming the flags to set."""
        self._check_parts(self.training_parts(), state)

    def _check_parts(self, parts: Dict[str, TrainingPart], state: Optional[Dict[str, Any]]) -> None:
        check_parts_state(parts, state, self.method, partial(hparam_flag, self.hparams.method))

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        """Load the training-only parts (of the EMA model with `ema`, which must be set up); a part the checkpoint
        lacks starts from scratch, with a warning."""
        if ema and module is None and not self.has_ema() and self.training_parts():
            raise RuntimeError(f'{self.method}: cannot load the EMA model\'s training-only parts before setup_ema()')
        parts = self.training_parts(module, ema)
        self._check_parts(parts, state)
        load_parts_state(parts, state, self.method, strict=strict)

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
