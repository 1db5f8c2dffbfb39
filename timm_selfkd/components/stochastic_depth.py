"""Stochastic depth of any timm model: find its blocks, add them where it has none, switch them per pass.

timm implements stochastic depth with `timm.layers.DropPath` modules on the residual branches of its blocks
(attributes `drop_path`, `drop_path1`/`drop_path2`, ...), created only when the model is built with
`drop_path_rate > 0`; otherwise those attributes are `nn.Identity()` (or `None` in ResNets). This module
  - groups a model's DropPath modules by the block that owns them (`find_depth_units`), keeping timm's rate
    schedule (each module's `drop_prob`),
  - inserts DropPath modules into the empty slots of a model built without stochastic depth, with the linear
    rule of the stochastic-depth paper, 0 for the first block to `rate` for the last (`add_stochastic_depth`),
  - switches them for one forward pass: the full network with every block on (`full_network`, eq. 4 of
    Self-Guidance) or a sampled sub-network (`sampled_subnetwork`, eq. 3): one keep-or-drop draw per block
    for the whole batch (Algorithm 1, the default) or timm's per-sample rows; `subnetwork_pass` is one pass of
    either kind, optionally leaving BatchNorm running statistics alone (`frozen_norm_stats`),
  - prepares a model for a method that trains sub-networks (Self-Guidance, R-Drop): its own stochastic depth,
    checked, or the default schedule added with a log line (`prepare_depth_units`), gradient checkpointing
    refused (`refuse_grad_checkpointing`), and its other sampled layers (dropout: `stochastic_layers`).

A block dropped for the whole batch is not computed at all where its output is then known without it (a
pure residual block returns its input; a ResNet block its activated shortcut): `SKIP_RULES` lists the
block classes for which this is exact; other blocks are computed and their branch zeroed.

DropPath modules have no parameters or buffers, so none of this changes a model's `state_dict`.

Example:
    >>> units = find_depth_units(model) or add_stochastic_depth(model, 0.5)
    >>> with full_network(units):
    ...     teacher_logits = model(x)
    >>> with sampled_subnetwork(units):
    ...     student_logits = model(x)
"""
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import DropBlock2d, DropPath, PatchDropout
from timm.models import _efficientnet_blocks as effnet_blocks
from timm.models import convnext, resnet, swin_transformer, vision_transformer
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

__all__ = ['DepthUnit', 'SKIP_RULES', 'find_depth_units', 'empty_drop_path_slots', 'add_stochastic_depth',
           'check_rates', 'full_network', 'sampled_subnetwork', 'subnetwork_pass', 'frozen_norm_stats',
           'grad_checkpointing_modules', 'refuse_grad_checkpointing', 'prepare_depth_units', 'stochastic_layers']

_logger = logging.getLogger(__name__)

SkipForward = Callable[..., torch.Tensor]


@dataclass(eq=False)
class DepthUnit:
    """One stochastic-depth block: the module owning one or more DropPath layers that share its drop rate.

    Attributes:
        name: The block's module name in the model.
        block: The block module.
        drop_paths: Its DropPath layers (e.g. ViT's `drop_path1` and `drop_path2`), dropped together per batch.
        rate: Its drop probability `1 - p_l` (the largest `drop_prob` of its layers).
        skip: The block's forward when all its branches are dropped, or None when it must be computed.
    """
    name: str
    block: nn.Module
    drop_paths: List[DropPath]
    rate: float
    skip: Optional[SkipForward]


def _passthrough(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def _residual_skip(block: nn.Module) -> Optional[SkipForward]:
    """Blocks computing `x + drop_path(branch(x))`: the input itself once the branch is dropped."""
    return _passthrough


def _efficientnet_skip(block: nn.Module) -> Optional[SkipForward]:
    """EfficientNet/MobileNet blocks add their branch only when `has_skip` (otherwise DropPath is never used)."""
    return _passthrough if block.has_skip else None


def _convnext_skip(block: nn.Module) -> Optional[SkipForward]:
    return _passthrough if isinstance(block.shortcut, nn.Identity) else None


def _resnet_skip(block: nn.Module) -> Optional[SkipForward]:
    """ResNet blocks compute `act(drop_path(branch(x)) + shortcut(x))`: `act(shortcut(x))` once dropped (eq. 3)."""
    act = block.act3 if isinstance(block, resnet.Bottleneck) else block.act2

    def skip(x: torch.Tensor) -> torch.Tensor:
        shortcut = block.downsample(x) if block.downsample is not None else x
        return act(shortcut.clone())  # the activation may be in place; `x` may be saved for the backward pass

    return skip


# Block classes (exact types) whose output is known without computing them once all their branches are
# dropped; tests check each rule against computing the block with zeroed branches.
SKIP_RULES: Dict[type, Callable[[nn.Module], Optional[SkipForward]]] = {
    resnet.BasicBlock: _resnet_skip,
    resnet.Bottleneck: _resnet_skip,
    vision_transformer.Block: _residual_skip,
    swin_transformer.SwinTransformerBlock: _residual_skip,
    convnext.ConvNeXtBlock: _convnext_skip,
    effnet_blocks.ConvBnAct: _efficientnet_skip,
    effnet_blocks.DepthwiseSeparableConv: _efficientnet_skip,
    effnet_blocks.InvertedResidual: _efficientnet_skip,
    effnet_blocks.UniversalInvertedResidual: _efficientnet_skip,
    effnet_blocks.EdgeResidual: _efficientnet_skip,
    effnet_blocks.CondConvResidual: _efficientnet_skip,
}


def _skip_rule(block: nn.Module) -> Optional[SkipForward]:
    rule = SKIP_RULES.get(type(block))
    return rule(block) if rule is not None else None


def find_depth_units(model: nn.Module) -> List[DepthUnit]:
    """The model's stochastic-depth blocks in forward order, with their timm drop rates; rate-0 layers are left out.

    Each DropPath module belongs to the module holding it as a direct child (a block); the DropPath layers of
    one block form one unit, dropped together by `sampled_subnetwork`'s per-batch sampling.
    """
    units = []
    for name, module in model.named_modules():
        drop_paths = [child for child in module.children() if isinstance(child, DropPath) and child.drop_prob > 0]
        if drop_paths:
            rate = max(float(dp.drop_prob) for dp in drop_paths)
            units.append(DepthUnit(name, module, drop_paths, rate, _skip_rule(module)))
    return units


def empty_drop_path_slots(model: nn.Module) -> List[Tuple[str, nn.Module, List[str]]]:
    """Where timm would have put DropPath layers: `(block name, block, attribute names)` in forward order.

    A slot is an attribute whose name contains `drop_path` and whose value is `nn.Identity()` or None, timm's
    convention for a model built with `drop_path_rate=0`.
    """
    slots = []
    for name, module in model.named_modules():
        attributes = [key for key, value in list(module._modules.items()) + list(vars(module).items())
                      if 'drop_path' in key and (value is None or isinstance(value, nn.Identity))]
        if attributes:
            slots.append((name, module, sorted(set(attributes))))
    return slots


def add_stochastic_depth(model: nn.Module, rate: float) -> List[DepthUnit]:
    """Insert DropPath layers into the empty slots of a model built without stochastic depth.

    Block l = 0..L-1 (in forward order) gets the drop rate `rate * l / (L - 1)`, timm's `drop_path_rate`
    schedule (a linspace from 0: the first block is never dropped, the last with `rate`); the stochastic-depth
    paper's rule, `rate * l / L` for l = 1..L, would drop the first block too. Blocks with rate 0 are left as
    they are. Returns the new units (empty when the model has no slots).

    Args:
        model: A timm model built with `drop_path_rate=0` (or without the argument).
        rate: Drop rate of the deepest block, in [0, 1).
    """
    check_rates(rate)
    slots = empty_drop_path_slots(model)
    for index, (_, block, attributes) in enumerate(slots):
        block_rate = rate * index / max(len(slots) - 1, 1)
        if block_rate > 0:
            for attribute in attributes:
                setattr(block, attribute, DropPath(block_rate))
    return find_depth_units(model)


def check_rates(*rates: float) -> None:
    """Raise a ValueError for a drop rate outside [0, 1) (a rate of 1 would drop a block in every pass)."""
    for rate in rates:
        if not 0 <= rate < 1:
            raise ValueError(f'a stochastic-depth (drop path) rate must be in [0, 1), got {rate}')


def grad_checkpointing_modules(model: nn.Module) -> List[str]:
    """Names of the modules with timm's gradient checkpointing switched on."""
    return [name or type(model).__name__ for name, module in model.named_modules()
            if getattr(module, 'grad_checkpointing', False) is True]


def refuse_grad_checkpointing(model: nn.Module, method: str) -> None:
    """Raise a ValueError when timm's gradient checkpointing is on: its recomputation runs in the backward pass,
    outside the pass that chose the sub-network (and outside any `frozen_norm_stats`)."""
    checkpointed = grad_checkpointing_modules(model)
    if checkpointed:
        raise ValueError(f'{method} cannot run with gradient checkpointing (on in {checkpointed[0]}): '
                         'its recomputation would not see the sampled sub-network')


def prepare_depth_units(model: nn.Module, method: str, default_rate: float, rate_flag: str,
                        add: bool = True, needs: str = 'needs stochastic depth') -> List[DepthUnit]:
    """The stochastic-depth units a sub-network method trains: the model's own (their rates checked), else, with
    `add`, a linear 0 -> `default_rate` schedule inserted into its empty slots (`add_stochastic_depth`). Logs
    which, as `method: ...`.

    Args:
        model: A timm model.
        method: The method's name, for the messages.
        default_rate: Drop rate of the deepest block of the added schedule.
        rate_flag: The command-line flag of `default_rate`, named in the log line.
        add: Add the schedule when the model has none (else return no units).
        needs: What the refusal says the method needs, when nothing can be added.

    Raises:
        ValueError: a rate of the model outside [0, 1), or no unit and no place for one while `add`.
    """
    units = find_depth_units(model)
    try:
        check_rates(*(dp.drop_prob for unit in units for dp in unit.drop_paths))
    except ValueError as e:
        raise ValueError(f'{method}: the model\'s {e}') from None
    if units:
        _logger.info(f'{method}: the model\'s own stochastic depth, {len(units)} blocks with drop rates '
                     f'{units[0].rate:.3f} to {units[-1].rate:.3f}')
        return units
    if not add:
        return units
    units = add_stochastic_depth(model, default_rate)
    if not units:
        raise ValueError(f'{method} {needs}, and model {type(model).__name__} has no DropPath layers or places '
                         'for them (timm\'s drop_path_rate)')
    _logger.info(f'{method}: the model was built without stochastic depth; added DropPath to {len(units)} blocks, '
                 f'drop rates rising linearly from 0 to {default_rate} ({rate_flag})')
    return units


def stochastic_layers(model: nn.Module, drop_path: bool = True) -> List[str]:
    """Names of the model's layers that sample in training mode: dropout (`nn.Dropout` and its kinds with p > 0,
    and the `drop_rate` > 0 of timm models whose heads call `F.dropout`, e.g. ResNet, EfficientNet), DropBlock
    with a rate > 0, timm's PatchDropout with a probability > 0 and, with `drop_path`, DropPath with a rate > 0."""
    names = []
    for name, module in model.named_modules():
        rate = 0.0
        if isinstance(module, _DropoutNd):
            rate = module.p
        elif isinstance(module, DropBlock2d) or (drop_path and isinstance(module, DropPath)):
            rate = module.drop_prob
        elif isinstance(module, PatchDropout):
            rate = module.prob
        elif isinstance(getattr(module, 'drop_rate', None), (int, float)):
            rate = module.drop_rate
        if rate > 0:
            names.append(name or type(model).__name__)
    return names


@contextmanager
def _forwards(replacements: List[Tuple[nn.Module, SkipForward]]) -> Iterator[None]:
    """Run modules with other forward functions inside the context; their own ones are restored on exit."""
    saved = []
    try:
        for module, forward in replacements:
            saved.append((module, module.__dict__.get('forward')))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _scale(factor: float) -> SkipForward:
    return lambda x: x * factor


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@contextmanager
def full_network(units: List[DepthUnit]) -> Iterator[None]:
    """Every block on and unscaled (Self-Guidance's teacher, eq. 4 with timm's train-time rescaling): the pass
    draws no random numbers and equals the model in eval mode as far as stochastic depth is concerned."""
    with _forwards([(dp, _passthrough) for unit in units for dp in unit.drop_paths]):
        yield


@contextmanager
def sampled_subnetwork(
        units: List[DepthUnit],
        per_sample: bool = False,
        skip: bool = True,
        generator: Optional[torch.Generator] = None,
) -> Iterator[Optional[List[bool]]]:
    """A random sub-network (Self-Guidance's student, eq. 3) for the passes run inside the context.

    Per batch (Algorithm 1, default): each block is kept with probability `1 - rate` for the whole batch;
    kept branches are scaled by `1 / (1 - rate)` as timm does (its `scale_by_keep`), dropped ones contribute
    nothing and, with `skip` and a block in `SKIP_RULES`, are not computed. The draw happens on the host (the
    CPU random generator), so choosing what to compute never waits for the device. Per sample: timm's own
    DropPath behaviour, an independent draw per image and branch (the model must be in training mode).

    Yields:
        Per batch, whether each unit is kept; per sample, None.
    """
    if per_sample:
        yield None
        return
    rates = torch.tensor([unit.rate for unit in units], dtype=torch.float64)
    keep = (torch.rand(len(units), generator=generator, dtype=torch.float64) >= rates).tolist()
    replacements = []
    for unit, kept in zip(units, keep):
        if not kept and skip and unit.skip is not None:
            replacements.append((unit.block, unit.skip))
            continue
        for dp in unit.drop_paths:
            if not kept:
                replacements.append((dp, _zeros))
            else:
                replacements.append((dp, _scale(1 / (1 - unit.rate)) if dp.scale_by_keep else _passthrough))
    with _forwards(replacements):
        yield keep


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but leave their running statistics (and batch count)
    unchanged inside the context, e.g. so that only the full network's passes set the deployed statistics."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    try:
        for layer in layers:
            layer.track_running_stats = False
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


@contextmanager
def subnetwork_pass(
        model: nn.Module,
        units: List[DepthUnit],
        full: bool = False,
        per_sample: bool = False,
        skip: bool = True,
        norm_stats: bool = True,
        generator: Optional[torch.Generator] = None,
) -> Iterator[Optional[List[bool]]]:
    """One pass of a sub-network method: the full network (`full_network`) or a sampled sub-network
    (`sampled_subnetwork`, per batch or per sample); with `norm_stats=False` BatchNorm normalises with batch
    statistics but its running statistics stay as they are (`frozen_norm_stats`).

    Yields:
        What `sampled_subnetwork` yields (whether each unit is kept, per batch; None per sample); None for the full
        network.
    """
    norm = nullcontext() if norm_stats else frozen_norm_stats(model)
    if full:
        with full_network(units), norm:
            yield None
    else:
        with sampled_subnetwork(units, per_sample=per_sample, skip=skip, generator=generator) as keep, norm:
            yield keep
