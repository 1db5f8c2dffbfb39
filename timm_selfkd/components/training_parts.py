"""The training-only parts a method adds to a model (exits, branches, heads, self-teachers): placed like the model,
counted for the method's log line, and kept as task state (`TrainingPart`, declared by `ModelWrapper.training_parts`;
`SelfKDTask` saves, checks and loads them with the functions below)."""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn

__all__ = ['TrainingPart', 'like_model', 'training_only_parameters', 'parts_state', 'check_parts_state',
           'load_parts_state']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPart:
    """A training-only part of a trainable module: trained and EMA-averaged with it, saved and resumed as task state
    (its weights under its key, beside the facts in `built_for`), never part of the deployed model.

    Attributes:
        module: The part.
        built_for: What it was built for, by task-state key (levels, width, depth; ints and lists): a checkpoint's
            part loads only into one built for the same.
        set_by: The method's hyper-parameters (field names) that decide `built_for`, whose flags a mismatch names.
    """
    module: nn.Module
    built_for: Mapping[str, Any] = field(default_factory=dict)
    set_by: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.built_for and not self.set_by:
            raise ValueError('TrainingPart.set_by names the hyper-parameters that decide built_for')


def like_model(part: nn.Module, model: nn.Module) -> nn.Module:
    """`part` on the model's device and dtype, its BatchNorms synchronised where the model's are (train.py converts
    the model for --sync-bn before the method wraps it)."""
    reference = next(model.parameters())
    part = part.to(device=reference.device, dtype=reference.dtype)
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        part = nn.SyncBatchNorm.convert_sync_batchnorm(part)
    return part


def training_only_parameters(part: nn.Module) -> str:
    """'1.23M training-only parameters': the trained parameters of `part`, for a log line."""
    return f'{sum(p.numel() for p in part.parameters() if p.requires_grad) / 1e6:.2f}M training-only parameters'


def parts_state(parts: Mapping[str, TrainingPart]) -> Dict[str, Any]:
    """The task state of `parts`: each part's facts and, under its key, its weights (on the CPU)."""
    state: Dict[str, Any] = {}
    for key, part in parts.items():
        state.update(part.built_for)
        state[key] = {name: value.detach().cpu() for name, value in part.module.state_dict().items()}
    return state


def check_parts_state(parts: Mapping[str, TrainingPart], state: Optional[Mapping[str, Any]], method: str,
                      flag: Callable[[str], str]) -> None:
    """Raise a ValueError naming the flags to set when a part in `state` was built for other facts than this run's.

    Args:
        method: The run's method, for the message.
        flag: The flag of a hyper-parameter field name (of the registered method whose hyper-parameters they are).
    """
    for key, part in parts.items():
        if not state or key not in state:
            continue
        built = dict(part.built_for)
        saved = {fact: state.get(fact) for fact in built}
        if saved != built:
            flags = '/'.join(flag(name) for name in part.set_by)
            raise ValueError(f'{method}: the checkpoint\'s training-only part {key!r} was built for {saved}, '
                             f'this run\'s for {built} (set {flags} to match)')


def load_parts_state(parts: Mapping[str, TrainingPart], state: Optional[Mapping[str, Any]], method: str,
                     strict: bool = True) -> None:
    """Load the weights of every part that `state` holds (check them first: `check_parts_state`); a part it lacks
    starts from scratch, with a warning."""
    missing = [key for key in parts if not state or key not in state]
    if missing:
        _logger.warning(f'{method}: the checkpoint has no {", ".join(missing)} (training-only); '
                        f'{"it starts" if len(missing) == 1 else "they start"} from scratch')
    for key, part in parts.items():
        if key not in missing:
            part.module.load_state_dict(state[key], strict=strict)
