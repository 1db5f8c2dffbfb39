"""Auxiliary branches made of copies of a timm model's later stages, run from an earlier stage's raw output.

A branch on level i (a `feature_info` entry) is a fresh copy of every module that `forward_features` runs after
level i's module, up to the last level's module, followed by the modules `forward_features` applies after that
(EfficientNet's `conv_head`/`bn2`, a ViT's or Swin's final `norm`): it turns level i's output into a map of the
final map's shape and format, the way MixSKD's (and DKS's) auxiliary branches repeat a ResNet's remaining stages.

Nothing is family-specific: the modules are the model's children in registration order, a child that holds a
level module expanded into its own children (ResNet: `conv1 ... layer1 layer2 layer3 layer4 global_pool fc`; ViT:
`... blocks.0 ... blocks.11 norm fc_norm ...`), and `stage_tails` checks on a test input, in eval mode, that the
model's own modules run in that order from every branch's level reproduce `forward_features` (else a ValueError
names the model). The raw outputs of the levels are captured by forward hooks while `forward_features` runs
(`LevelCapture`), so they are exactly what the next module receives (tokens with their class token, NHWC maps).
"""
import copy
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['LevelCapture', 'channels_last_maps', 'default_levels', 'level_paths', 'ordered_modules', 'pool_map',
           'stage_tails']


def level_paths(model: nn.Module) -> List[str]:
    """The module path of every `feature_info` level (e.g. `layer2`, `blocks.4`, `layers.1`)."""
    return [info['module'] for info in model.feature_info]


def default_levels(model: nn.Module, count: int = 3) -> List[int]:
    """The `count` stage ends before the last level (levels followed by a change of resolution), or, for models
    whose levels all share one resolution (ViT-like), the blocks at 1/4, 1/2 and 3/4 of the depth."""
    reductions = [info['reduction'] for info in model.feature_info]
    levels = len(reductions)
    stage_ends = [i for i in range(levels - 1) if reductions[i + 1] != reductions[i]]
    if stage_ends:
        return stage_ends[-count:]
    return sorted({max(round(levels * k / (count + 1)) - 1, 0) for k in range(1, count + 1)})


def ordered_modules(model: nn.Module, paths: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """The model's modules in registration order: its children, each child that holds one of `paths` (below it)
    expanded into its own children, recursively."""
    def expand(prefix: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
        out = []
        for name, child in module.named_children():
            full = prefix + name
            if any(path.startswith(full + '.') for path in paths):
                out += expand(full + '.', child)
            else:
                out.append((full, child))
        return out
    return expand('', model)


def _last_called(module: nn.Module) -> nn.Module:
    """The module whose output is `module`'s: the last element of a (nested) `nn.Sequential`, which runs also
    when timm's gradient checkpointing (`checkpoint_seq(..., flatten=True)`) calls a stage's blocks one by one."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module


class LevelCapture:
    """Forward hooks that keep the raw outputs of the modules at `paths` while the model runs; read `outputs`
    inside the `with` block (the hooks are removed on leaving it, before a checkpointed backward re-runs them).

    Example:
        >>> with LevelCapture(model, ['layer1', 'layer2']) as capture:
        ...     final = model.forward_features(x)
        ...     stage1, stage2 = capture.outputs
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.modules = [_last_called(model.get_submodule(path)) for path in paths]
        self.found: Dict[int, torch.Tensor] = {}
        self.handles = []

    def _hook(self, index: int):
        def hook(module, args, output):
            self.found[index] = output
        return hook

    def __enter__(self) -> 'LevelCapture':
        self.found = {}
        self.handles = [module.register_forward_hook(self._hook(i)) for i, module in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.found = {}

    @property
    def outputs(self) -> List[torch.Tensor]:
        if len(self.found) != len(self.modules):
            raise RuntimeError(f'{len(self.modules) - len(self.found)} of the captured levels did not run')
        return [self.found[i] for i in range(len(self.modules))]


def pool_map(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Global average of a final map: (B, C, H, W) -> (B, C), (B, H, W, C) with `channels_last` -> (B, C),
    tokens (B, N, C) -> (B, C) (class and other prefix tokens included), (B, C) as is."""
    if x.ndim == 4:
        return x.mean(dim=(1, 2) if channels_last else (2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    return x


def _probe_input(model: nn.Module, reference: torch.Tensor) -> torch.Tensor:
    """Two seeded test images for the order check, at the model's fixed size if it has one (ViT, Swin), else at
    64 px (or its minimum input size); the global RNG is left alone."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    channels = (cfg.get('input_size') or (3,))[0]
    size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if size is None or getattr(model, 'dynamic_img_size', False):
        minimum = (cfg.get('min_input_size') or (3, 64, 64))[1:]
        size = (max(64, minimum[0]), max(64, minimum[1]))
    size = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, *size, generator=generator).to(device=reference.device, dtype=reference.dtype)


def _run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _same(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))


@torch.no_grad()
def stage_tails(model: nn.Module, levels: Sequence[int], what: str = 'a branch') -> List[nn.Sequential]:
    """One branch per level in `levels`: copies of the modules after that level's module up to the last level's,
    then of the modules `forward_features` runs after the last level (found as the shortest run of the following
    modules that reproduces it), as an `nn.Sequential` whose input is the level's raw output (`LevelCapture`)
    and whose output has the shape and format of `forward_features`' output.

    The copies start from the model's current weights (its initialisation, or its pretrained weights).

    Raises:
        ValueError: The model's modules, run in registration order from a level, do not reproduce its
            `forward_features` (checked in eval mode on two test images), or a level is the last one.
    """
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    paths = level_paths(model)
    order = ordered_modules(model, paths)
    position = {path: k for k, (path, _) in enumerate(order)}
    missing = [path for path in paths if path not in position]
    if missing:
        raise ValueError(f'{what}: the level modules {missing} of model {name} are not among its modules in order')
    last = position[paths[-1]]
    reference = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        x = _probe_input(model, reference)
        with LevelCapture(model, paths) as capture:
            final = model.forward_features(x)
            raw = capture.outputs
        after = [module for _, module in order[last + 1:]]
        post = None
        for count in range(len(after) + 1):
            try:
                if _same(_run(after[:count], raw[-1]), final):
                    post = after[:count]
                    break
            except Exception:  # noqa: BLE001  a head module (pooling, classifier) does not take the map
                break
        if post is None:
            raise ValueError(f'{what}: model {name}\'s forward_features is not its last level\'s output followed by '
                             'the modules registered after it')
        tails = []
        for level in levels:
            if not 0 <= level < len(paths) - 1:
                raise ValueError(f'{what}: level {level} of model {name} has no stage after it (levels 0-'
                                 f'{len(paths) - 2} do)')
            tail = [module for _, module in order[position[paths[level]] + 1:last + 1]] + post
            try:
                reproduced = _same(_run(tail, raw[level]), final)
            except Exception:  # noqa: BLE001  a module needs more than the previous output (masks, rope, ...)
                reproduced = False
            if not reproduced:
                raise ValueError(f'{what}: model {name}\'s forward_features does not run its modules after level '
                                 f'{level} ({paths[level]}) one after the other, so they cannot be copied into a '
                                 'branch')
            tails.append(nn.Sequential(*[copy.deepcopy(module) for module in tail]))
    finally:
        model.train(was_training)
    for tail in tails:
        tail.train(was_training)
    return tails


def channels_last_maps(model: nn.Module) -> bool:
    """Whether the model's 4-D maps are NHWC (timm's `output_fmt`, e.g. Swin) rather than NCHW."""
    return getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
