"""The `forward_intermediates()` levels a method reads (its `feature_info` entries): an `indices` hyper-parameter
parsed, checked against a model, or chosen by default from the levels' resolutions."""
from typing import Callable, List, Sequence, Tuple

import torch.nn as nn

__all__ = ['model_name', 'parse_levels', 'stage_ends', 'default_levels', 'choose_levels']


def model_name(model: nn.Module) -> str:
    """The model's timm architecture name (its class name if it has none), for messages."""
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def parse_levels(text: str) -> Tuple[int, ...]:
    """The levels of an `indices` hyper-parameter, in the order given; () for ''.

    Raises:
        ValueError: not comma-separated integers, or a level given twice (the message follows the hyper-parameter's
            name: 'must be ...').
    """
    try:
        levels = tuple(int(item) for item in text.split(',')) if text.strip() else ()
    except ValueError:
        raise ValueError(f'must be comma-separated integers (e.g. 2,5,8), got {text!r}') from None
    if len(set(levels)) != len(levels):
        raise ValueError(f'must be distinct, got {text!r}')
    return levels


def stage_ends(model: nn.Module) -> List[int]:
    """The levels before the last that are followed by a change of resolution: the ends of every stage but the last
    (none for models whose levels all share one resolution: ViT, MLP-Mixer, ...)."""
    reductions = [info['reduction'] for info in model.feature_info]
    return [i for i in range(len(reductions) - 1) if reductions[i + 1] != reductions[i]]


def default_levels(model: nn.Module, count: int, with_last: bool = False) -> List[int]:
    """The last `count` stage ends (`stage_ends`, followed by the last level `with_last`); for models whose levels all
    share one resolution, the blocks at k/(count + 1) of the depth for k = 1..count (with_last: k/count, the last
    block included), e.g. 1/4, 1/2, 3/4 for three."""
    ends = stage_ends(model)
    if ends:
        return (ends + [len(model.feature_info) - 1] if with_last else ends)[-count:]
    levels, parts = len(model.feature_info), count if with_last else count + 1
    return sorted({max(round(levels * k / parts) - 1, 0) for k in range(1, count + 1)})


def choose_levels(model: nn.Module, method: str, requested: Sequence[int], default: Callable[[], List[int]],
                  noun: str = 'level', with_last: bool = False) -> List[int]:
    """The levels `method` reads, sorted: `requested`, checked against the model, or `default()` if none is.

    Args:
        model: A timm model.
        method: The method named in the messages.
        requested: Levels asked for (`parse_levels`).
        default: The method's default levels (called once the model is known to have levels).
        noun: What the messages call one requested level ('exit index', 'branch index', 'level').
        with_last: The last level may be requested (else it is the model's own classifier's).

    Raises:
        ValueError: The model has no `forward_intermediates()`, a single level, or no level `noun` (the message
            names the valid range).
    """
    name = model_name(model)
    if not callable(getattr(model, 'forward_intermediates', None)) or not getattr(model, 'feature_info', None):
        raise ValueError(f'{method} needs the stage outputs of timm\'s forward_intermediates(), and model {name} has '
                         'no forward_intermediates()')
    levels = len(model.feature_info)
    if levels < 2:
        raise ValueError(f'{method} needs two or more forward_intermediates() levels, and model {name} has one')
    top = levels - 1 if with_last else levels - 2
    for level in requested:
        if not 0 <= level <= top:
            which = 'indices' if noun.endswith('index') else 'levels'
            last = '' if with_last else ', the last feeds the model\'s own classifier'
            raise ValueError(f'{method}: {noun} {level} does not exist for {name}: valid {which} are 0-{top} (of its '
                             f'{levels} forward_intermediates() levels{last})')
    return sorted(requested) if requested else default()
