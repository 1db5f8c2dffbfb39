"""Deep branches (DKS's and MixSKD's auxiliary branches): a freshly initialised copy of a timm model's stages after a
`forward_intermediates()` level, with the model's final norm, pooling and classifier, run from the raw output of that
level's module; `LevelCapture` keeps those raw outputs while the model runs."""
import copy
from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
from timm.models import EfficientNet, MobileNetV3, checkpoint_seq
from timm.models._efficientnet_builder import efficientnet_init_weights

from timm_selfkd.components.feature_levels import model_name
from timm_selfkd.components.training_parts import like_model
from timm_selfkd.errors import first_line

__all__ = ['LevelCapture', 'DeepBranch', 'deep_branches', 'branch_no_weight_decay']


def _last_called(module: nn.Module) -> nn.Module:
    """The module whose output is `module`'s: the last element of a (nested) `nn.Sequential`, which runs also
    when timm's gradient checkpointing (`checkpoint_seq(..., flatten=True)`) calls a stage's blocks one by one."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module


class LevelCapture:
    """Forward hooks that keep the raw outputs of the modules at `paths` (e.g. `feature_info[i]['module']`) while
    the model runs: what the next module receives (tokens with their class token, NHWC maps). Read `outputs` inside
    the `with` block; the hooks are removed on leaving it, before a checkpointed backward re-runs the modules.

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


def _probe_inputs(model: nn.Module) -> List[torch.Tensor]:
    """Probe batches of two seeded images (drawn without touching the global RNG), float32 on the CPU, to try in
    turn: at the size of the model's patch embedding where it has one (ViT, Swin, MLP-Mixer: fixed sizes); else
    a small one (twice the largest reduction, at least 64 px: cheap) and the model's default input size (for CNNs
    that need more, e.g. Inception)."""
    size = next((m.img_size for m in model.modules()
                 if hasattr(m, 'patch_size') and getattr(m, 'img_size', None) is not None), None)
    if size is not None:
        sizes = [(size, size) if isinstance(size, int) else tuple(size)]
    else:
        side = max(64, 2 * max(info['reduction'] for info in model.feature_info))
        sizes = [(side, side), tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224)))[1:]]
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    return [torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0)) for size in sizes]


def _logits_and_level(model: nn.Module, module_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on the first probe batch it accepts, and the raw output of `module_name` in that pass."""
    *smaller, last = _probe_inputs(model)
    for probe in smaller:
        try:
            with LevelCapture(model, [module_name]) as capture:
                return model(probe), capture.outputs[0]
        except Exception:  # noqa: BLE001  too small for this model: the next size
            pass
    with LevelCapture(model, [module_name]) as capture:
        return model(last), capture.outputs[0]


def _cut_before(branch: nn.Module, module_name: str) -> None:
    """Replace by an empty `nn.Sequential` (the identity, and iterable where timm's gradient checkpointing flattens
    the stages) every module of `branch` that runs before `module_name` (a dotted path), and that module: at each
    depth of the path, the children registered before it (the stem, the earlier stages and blocks), so that the
    copy's forward starts from the module's output."""
    parent, parts = branch, module_name.split('.')
    for depth, part in enumerate(parts):
        names = [name for name, _ in parent.named_children()]
        if part not in names:
            raise ValueError(f'no module {module_name}')
        last = depth == len(parts) - 1
        for name in names[:names.index(part) + last]:
            setattr(parent, name, nn.Sequential())
        if not last:
            parent = getattr(parent, part)


class DeepBranch(nn.Module):
    """A deep auxiliary branch: a fresh, independently initialised copy of the model's stages after a
    `forward_intermediates()` level, with the model's final norm, pooling and classifier, on the raw output of that
    level's module (`LevelCapture`); `forward` gives its logits and its final map (`forward_features`' output).

    Built by `deep_branches`: the model is deep-copied and cut before the level (the stem and every stage or block
    up to the level's module, `feature_info[level]['module']`, become identities), and the rest runs as the model
    does: `forward_features` where the model's forward is a chain of modules (ResNet layer{i+1}..layer4;
    EfficientNet and MobileNet blocks[i+1:], conv_head, bn2; ConvNeXt, RegNet, Swin stages[i+1:] and their norm),
    and `norm(blocks(x))` on the token sequence (prefix tokens included) for ViT-like models (those with
    `_pos_embed`, whose embedding step is no module), then `forward_head`. The cut copy is checked before it is
    re-initialised: on two probe images its logits from the captured level output must equal the model's own bit
    for bit, else the family is refused in one line (a forward that is no chain of modules from that level, e.g.
    CaiT, EVA, BEiT, XCiT, LeViT: position embeddings added late, rotary embeddings, masks). Parameters that the cut
    copy never uses (ViT's position embedding and class token) are frozen (no gradient, so DDP and the optimizer
    skip them).

    Re-initialisation: every module's `reset_parameters()` (PyTorch's defaults), then the model family's own
    initialisation where timm exposes one (`init_weights()`: ResNet, ViT, Swin, ...; `efficientnet_init_weights`:
    EfficientNet, MobileNetV3). Parameters neither re-draws (e.g. layer-scale constants, Swin's relative position
    tables) keep the values the model had when the branch was built (their initial values in a run from scratch).

    Args:
        model: The cut copy of the model.
        level: Its `forward_intermediates()` level.
        module_name: The module whose output the branch takes (`feature_info[level]['module']`).
        tokens: Run `blocks` and `norm` (ViT-like models) rather than `forward_features`.
    """

    def __init__(self, model: nn.Module, level: int, module_name: str, tokens: bool = False):
        super().__init__()
        self.model = model
        self.level = level
        self.module_name = module_name
        self.tokens = tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return self.model.forward_features(x)
        if getattr(self.model, 'grad_checkpointing', False) and torch.is_grad_enabled():
            x = checkpoint_seq(self.model.blocks, x)
        else:
            x = self.model.blocks(x)
        return self.model.norm(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns `(logits, final map)` of the level module's output `x`."""
        final = self.forward_features(x)
        return self.model.forward_head(final), final

    def no_weight_decay(self) -> Set[str]:
        """The copy's parameters the model keeps from weight decay (e.g. Swin's relative position tables)."""
        return {f'model.{name}' for name in getattr(self.model, 'no_weight_decay', lambda: ())()}

    @torch.no_grad()
    def _check(self, reference: nn.Module, where: str) -> torch.Tensor:
        """Run the reference copy on probe images and the branch (still holding the model's weights) on the
        captured output of the level module, both in eval mode on the CPU; the logits must be bit-identical (a
        step the cut left out, e.g. a position embedding added to the tokens, can change a freshly initialised
        model's logits by less than any tolerance). Returns the captured output."""
        reference.eval(), self.eval()
        try:
            expected, captured = _logits_and_level(reference, self.module_name)
            if not isinstance(captured, torch.Tensor):
                raise ValueError(f'{self.module_name} gives no single tensor')
            got = self(captured)[0]
            if got.shape != expected.shape:
                raise ValueError(f'logits of shape {tuple(got.shape)} instead of {tuple(expected.shape)}')
            if not torch.equal(got, expected):
                raise ValueError(f'its logits differ from the model\'s by up to {(got - expected).abs().max():.3g}')
        except Exception as e:  # noqa: BLE001  any failure of the cut copy means no branch: one line
            reason = first_line(e)
            raise ValueError(f'{where}: a copy of the model run from that module does not reproduce the model '
                             f'(its forward is not a chain of modules from there: {reason})') from None
        finally:
            self.train()
        return captured

    def _freeze_unused(self, captured: torch.Tensor) -> None:
        """Take the gradient off the copy's parameters that the branch does not use (found by one backward pass on
        the probe in eval mode), e.g. ViT's position embedding and class token."""
        params = [p for p in self.parameters() if p.requires_grad]
        training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                logits = self(captured.detach())[0]
                grads = torch.autograd.grad(logits.float().sum(), params, allow_unused=True)
        finally:
            self.train(training)
        for param, grad in zip(params, grads):
            if grad is None:
                param.requires_grad_(False)

    @torch.no_grad()
    def _reinitialise(self) -> None:
        """Fresh weights, independent of the model's: every module's `reset_parameters()`, then the family's init."""
        for module in self.model.modules():
            reset = getattr(module, 'reset_parameters', None)
            if callable(reset):
                reset()
        if isinstance(self.model, (EfficientNet, MobileNetV3)):
            efficientnet_init_weights(self.model)
        elif callable(getattr(self.model, 'init_weights', None)):
            self.model.init_weights()


def deep_branches(model: nn.Module, levels: Sequence[int], method: str) -> List[DeepBranch]:
    """Checked, re-initialised deep branches after `levels` of `model`, on the model's device and dtype (see
    `DeepBranch`). They are checked against a float32 CPU copy of the model (on the CPU the copy run from a level
    repeats the model's own arithmetic, so the check can ask for bit-identical logits).

    Raises:
        ValueError: (one line, naming `method`, the level and the model) the model cannot be run from a level.
    """
    reference = copy.deepcopy(model).to(device='cpu', dtype=torch.float32)
    branches = []
    for level in levels:
        module_name = model.feature_info[level]['module']
        where = (f'{method}: no deep branch after forward_intermediates() level {level} ({module_name}) of '
                 f'{model_name(model)}')
        try:
            cut = copy.deepcopy(reference)
            _cut_before(cut, module_name)
        except (AttributeError, ValueError) as e:
            raise ValueError(f'{where}: {e}') from None
        tokens = callable(getattr(model, '_pos_embed', None)) and module_name.startswith('blocks.')
        branch = DeepBranch(cut, level, module_name, tokens)
        captured = branch._check(reference, where)
        branch._freeze_unused(captured)
        branch._reinitialise()
        branches.append(like_model(branch, model))
    return branches


def branch_no_weight_decay(module: nn.Module) -> Set[str]:
    """The names, within `module`, of its deep branches' parameters kept from weight decay."""
    return {f'{prefix}.{name}' for prefix, branch in module.named_modules() if isinstance(branch, DeepBranch)
            for name in branch.no_weight_decay()}
