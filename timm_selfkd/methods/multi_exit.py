"""Multi-exit self-distillation on any timm model with `forward_intermediates()`: BYOT's auxiliary exits, DMFL's
mutual feature loss and PS-KD's progressive soft targets (Chottananurak et al., Progressive Self-Knowledge
Distillation with Mutual Learning, sec. 3.1, eq. 2-3, after Zhang et al., Be Your Own Teacher, ICCV 2019, and
Kim et al., PS-KD, ICCV 2021).

The exits machinery is shared with the methods whose exits are deep (`dks`): an exit is either BYOT's light
`Exit` (on a `forward_intermediates()` output) or a `DeepExit`, a fresh copy of the model's remaining stages,
norm and head (on the raw output of the level's module); `MultiExitModule` runs both kinds from one pass of the
model, and `ExitsTask` gives their tasks validation (`MultiExitEvaluator`) and task state."""
import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.utils import unwrap_model

from timm_selfkd.components.losses import float32_region, kd_kl_from_logits, soft_target_ce
from timm_selfkd.components.progressive_targets import BCE_REFUSAL, RUN_FACTS, ProgressiveTargets
from timm_selfkd.registry import register_method
from timm_selfkd.methods.base import ModelWrapper, Needs, RunInfo, SelfKDTask, check_range, has_pooled_features

__all__ = ['MultiExitHparams', 'Exit', 'DeepExit', 'MultiExitModule', 'MultiExitEvaluator', 'ExitsTask',
           'MultiExitTask', 'exit_indices', 'parse_indices', 'multi_exit_loss']

_logger = logging.getLogger(__name__)

DEFAULT_EXITS = 3  # BYOT and seed 4 table 2: three exits plus the model's own classifier


def parse_indices(text: str, method: str = 'multi_exit') -> Tuple[int, ...]:
    """The levels of an `indices` hyper-parameter ('2,5,8'); a ValueError naming `method` if malformed."""
    try:
        indices = tuple(int(item) for item in text.split(',')) if text.strip() else ()
    except ValueError:
        raise ValueError(f'{method} indices must be comma-separated integers (e.g. 2,5,8), got {text!r}') from None
    if len(set(indices)) != len(indices):
        raise ValueError(f'{method} indices must be distinct, got {text!r}')
    return indices


@dataclass
class MultiExitHparams:
    byot: bool = field(default=True, metadata={
        'help': 'BYOT loss on every exit (eq. 2): (1 - alpha) CE to the target + alpha KL to the deepest '
                'classifier + lambda feature hint'})
    dmfl: bool = field(default=True, metadata={
        'help': 'deep mutual feature loss (eq. 3): symmetric KL between each exit\'s feature distribution and '
                'the deepest one\'s'})
    alpha: float = field(default=0.1, metadata={'help': 'BYOT weight alpha of the KL to the deepest classifier '
                                                        '(eq. 2; the CE gets 1 - alpha)'})
    feature_weight: float = field(default=1e-6, metadata={'help': 'BYOT weight lambda of the L2 feature hint (eq. 2)'})
    temperature: float = field(default=1.0, metadata={'help': 'temperature of the exits\' KL, scaled by T^2 (eq. 2 '
                                                              'uses 1; BYOT\'s code 3)'})
    indices: str = field(default='', metadata={
        'help': 'forward_intermediates() levels that get an exit, comma-separated (e.g. ViT blocks 2,5,8); '
                'default: the three stage ends before the last (ViT-like models: blocks at 1/4, 1/2, 3/4 depth)'})
    pskd: bool = field(default=False, metadata={
        'help': 'PS-KD\'s progressive soft targets (sec. 3.1): every classifier\'s CE (the deepest one\'s, BYOT\'s '
                'exits\') is to (1 - a_e) y + a_e P[i], P[i] the deepest classifier\'s last softmax of image i'})
    pskd_alpha_t: float = field(default=0.8, metadata={
        'help': 'PS-KD alpha_T: weight of the past prediction at the last epoch; epoch e (0-based) of E uses '
                'alpha_T (e + 1) / E'})
    pskd_topk: int = field(default=0, metadata={
        'help': 'PS-KD memory: keep the k largest probabilities of each past prediction, the rest spread evenly '
                '(0 = all K, in fp16)'})

    def __post_init__(self):
        check_range('multi_exit', 'alpha', self.alpha, 0., 1.)
        check_range('multi_exit', 'feature_weight', self.feature_weight, 0.)
        check_range('multi_exit', 'temperature', self.temperature, 1e-6)
        check_range('multi_exit', 'pskd_alpha_t', self.pskd_alpha_t, 0., 1.)
        check_range('multi_exit', 'pskd_topk', self.pskd_topk, 0)
        if not (self.byot or self.dmfl or self.pskd):
            raise ValueError('multi_exit needs byot or dmfl or pskd (or several); without them it is plain training')
        parse_indices(self.indices)


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def exit_indices(model: nn.Module, indices: str = '', method: str = 'multi_exit',
                 default_exits: int = DEFAULT_EXITS) -> List[int]:
    """The `forward_intermediates()` levels that get an exit, checked against the model.

    Levels are the model's `feature_info` entries; the last one feeds the model's own classifier (the
    deepest exit, N) and gets no auxiliary exit. By default: the ends of the `default_exits` stages before the
    last (levels followed by a change of resolution), or, for models whose levels all share one resolution (ViT,
    MLP-Mixer, ...), the blocks at 1/(n+1), ..., n/(n+1) of the depth for n = `default_exits` (1/4, 1/2, 3/4 for
    three exits).

    Args:
        model: A timm model.
        indices: Comma-separated levels, or '' for the default.
        method: The method named in the error messages.
        default_exits: Number of exits by default.

    Raises:
        ValueError: The model has no `forward_intermediates`, or an index does not exist (the message names the
            valid range).
    """
    name = _model_name(model)
    feature_info = getattr(model, 'feature_info', None)
    if not callable(getattr(model, 'forward_intermediates', None)) or not feature_info:
        raise ValueError(f'{method} needs the stage outputs of timm\'s forward_intermediates(), and model {name} '
                         'has no forward_intermediates()')
    if not has_pooled_features(model):
        raise ValueError(f'{method} needs forward_head(pre_logits=True) for the deepest feature, and model {name} '
                         'has none')
    levels = len(feature_info)
    if levels < 2:
        raise ValueError(f'{method}: model {name} has a single forward_intermediates() level, no room for exits')
    requested = parse_indices(indices, method)
    for index in requested:
        if not 0 <= index <= levels - 2:
            raise ValueError(f'{method}: exit index {index} does not exist for {name}: valid indices are '
                             f'0-{levels - 2} (of its {levels} forward_intermediates() levels, the last feeds the '
                             'model\'s own classifier)')
    if requested:
        return sorted(requested)
    reductions = [info['reduction'] for info in feature_info]
    stage_ends = [i for i in range(levels - 1) if reductions[i + 1] != reductions[i]]
    if stage_ends:
        return stage_ends[-default_exits:]
    return sorted({max(round(levels * k / (default_exits + 1)) - 1, 0) for k in range(1, default_exits + 1)})


class Exit(nn.Module):
    """A light auxiliary classifier on a stage output (BYOT; seed 4 sec. 3.1): bottleneck -> pooled feature -> fc.
    (`DeepExit` is the deep kind: a copy of the model's remaining stages.)

    The bottleneck is a 1x1 convolution with BatchNorm and ReLU at the stage's width; after global average
    pooling a linear map gives the exit's feature `F_i` the size of the deepest classifier's pooled feature
    `F_N` (so eq. 2's hint and eq. 3's KL compare like with like), and a linear classifier its logits. Light
    by design: pooling comes before the widening map, so an exit costs a small fraction of its stage.

    Args:
        in_chs: Channels of the stage output (NCHW).
        feature_dim: Size of `F_N`, the input of the model's classifier.
        num_classes: Classes of the model.
        detach_classifier: Train the classifier on a detached feature (an exit whose feature is trained by
            DMFL alone, so that its accuracy can still be reported).
    """

    def __init__(self, in_chs: int, feature_dim: int, num_classes: int, detach_classifier: bool = False):
        super().__init__()
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, kernel_size=1, bias=False), nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature = nn.Linear(in_chs, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)
        self.detach_classifier = detach_classifier

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns `(logits, feature)` of a (B, C, H, W) stage output."""
        feature = self.feature(self.pool(self.bottleneck(x)).flatten(1))
        return self.fc(feature.detach() if self.detach_classifier else feature), feature


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


def _run_probe(reference: nn.Module, captured: list) -> torch.Tensor:
    """The reference's logits on the first probe batch it accepts (`captured`, filled by a hook, is emptied before
    each try)."""
    *smaller, last = _probe_inputs(reference)
    for probe in smaller:
        captured.clear()
        try:
            return reference(probe)
        except Exception:  # noqa: BLE001  too small for this model: the next size
            pass
    captured.clear()
    return reference(last)


def _cut_before(branch: nn.Module, module_name: str) -> None:
    """Replace by `nn.Identity` every module of `branch` that runs before `module_name` (a dotted path), and that
    module: at each depth of the path, the children registered before it (the stem, the earlier stages and
    blocks), so that the copy's forward starts from the module's output."""
    parent, parts = branch, module_name.split('.')
    for depth, part in enumerate(parts):
        names = [name for name, _ in parent.named_children()]
        if part not in names:
            raise ValueError(f'no module {module_name}')
        last = depth == len(parts) - 1
        for name in names[:names.index(part) + last]:
            setattr(parent, name, nn.Identity())
        if not last:
            parent = getattr(parent, part)


class DeepExit(ModelWrapper):
    """A deep auxiliary branch (DKS; Sun et al., Deeply-supervised Knowledge Synergy, CVPR 2019, sec. 3): a
    fresh, independently initialised copy of the model's stages after a `forward_intermediates()` level, with the
    model's final norm, pooling and classifier, on the raw output of that level's module.

    `DeepExit.build(model, level)` deep-copies the model, cuts it before the level (`nn.Identity` in place of the
    stem and of every stage or block up to the level's module, `feature_info[level]['module']`), and runs the
    rest as the model does: `forward_head(forward_features(x))` where the model's forward is a chain of modules
    (ResNet layer{i+1}..layer4; EfficientNet and MobileNet blocks[i+1:], conv_head, bn2; ConvNeXt, RegNet, Swin
    stages[i+1:] and their norm), and `forward_head(norm(blocks(x)))` on the token sequence (prefix tokens
    included) for ViT-like models (those with `_pos_embed`, whose embedding step is no module). The cut copy is
    checked before it is re-initialised: on two probe images its output from the captured level output must equal
    the model's own logits, else the family is refused in one line (a forward that is no chain of modules from
    that level, e.g. blocks that take rotary embeddings or masks). Parameters that the cut copy never uses (ViT's
    position embedding and class token) are frozen (no gradient, so DDP and the optimizer skip them).

    Re-initialisation: every module's `reset_parameters()` (PyTorch's defaults), then the model family's own
    initialisation where timm exposes one (`init_weights()`: ResNet, ViT, Swin, ...; `efficientnet_init_weights`:
    EfficientNet, MobileNetV3). Parameters neither re-draws (e.g. layer-scale constants, Swin's relative position
    tables) keep the values the model had when the branch was built (their initial values in a run from scratch).

    Args:
        branch: The cut copy of the model.
        level: Its `forward_intermediates()` level.
        module_name: The module whose output the branch takes (`feature_info[level]['module']`).
        tokens: Run `blocks`, `norm` and the head (ViT-like models) rather than `forward_features`.
    """

    def __init__(self, branch: nn.Module, level: int, module_name: str, tokens: bool = False):
        super().__init__(branch)
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
        """Returns `(logits, pooled pre-logit feature)` of the level module's output."""
        return self.logits_and_features(self.forward_features(x))

    @staticmethod
    def reference_copy(model: nn.Module) -> nn.Module:
        """A float32 CPU copy of the model, against which `build` checks its branches (on the CPU the copy run from
        a level repeats the model's own arithmetic, so the check can ask for bit-identical logits)."""
        return copy.deepcopy(model).to(device='cpu', dtype=torch.float32)

    @classmethod
    def build(cls, model: nn.Module, level: int, method: str = 'dks',
              reference: Optional[nn.Module] = None) -> 'DeepExit':
        """A checked, re-initialised deep branch after `level` of `model`, on the model's device and dtype (see
        the class docstring).

        Args:
            model: The timm model.
            level: The `forward_intermediates()` level.
            method: The method named in the error message.
            reference: `reference_copy(model)`, to share between the levels (made here if None).

        Raises:
            ValueError: (one line, naming `method`, the level and the model) the model cannot be run from that level.
        """
        reference = cls.reference_copy(model) if reference is None else reference
        module_name = model.feature_info[level]['module']
        where = (f'{method}: no deep branch after forward_intermediates() level {level} ({module_name}) of '
                 f'{_model_name(model)}')
        try:
            level_module = reference.get_submodule(module_name)
            branch = copy.deepcopy(reference)
            _cut_before(branch, module_name)
        except (AttributeError, ValueError) as e:
            raise ValueError(f'{where}: {e}') from None
        tokens = callable(getattr(model, '_pos_embed', None)) and module_name.startswith('blocks.')
        deep_exit = cls(branch, level, module_name, tokens)
        captured = deep_exit._check(reference, level_module, where)
        deep_exit._freeze_unused(captured)
        deep_exit._reinitialise()
        param = next(model.parameters())
        return deep_exit.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def _check(self, reference: nn.Module, level_module: nn.Module, where: str) -> torch.Tensor:
        """Run the reference copy on probe images and the branch (still holding the model's weights) on the
        captured output of the level module, both in eval mode on the CPU; the logits must be bit-identical (a
        step the cut left out, e.g. a position embedding added to the tokens, can change a freshly initialised
        model's logits by less than any tolerance). Returns the captured output."""
        captured = []
        handle = level_module.register_forward_hook(lambda module, args, output: captured.append(output))
        reference.eval(), self.eval()
        try:
            expected = _run_probe(reference, captured)
            if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
                raise ValueError(f'{type(level_module).__name__} gives no single tensor')
            got = self(captured[0])[0]
            if got.shape != expected.shape:
                raise ValueError(f'logits of shape {tuple(got.shape)} instead of {tuple(expected.shape)}')
            if not torch.equal(got, expected):
                raise ValueError(f'its logits differ from the model\'s by up to {(got - expected).abs().max():.3g}')
        except Exception as e:  # noqa: BLE001  any failure of the cut copy means no branch: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f'{where}: a copy of the model run from that module does not reproduce the model '
                             f'(its forward is not a chain of modules from there: {reason})') from None
        finally:
            handle.remove()
            self.train()
        return captured[0]

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
        from timm.models import EfficientNet, MobileNetV3
        from timm.models._efficientnet_builder import efficientnet_init_weights
        for module in self.model.modules():
            reset = getattr(module, 'reset_parameters', None)
            if callable(reset):
                reset()
        if isinstance(self.model, (EfficientNet, MobileNetV3)):
            efficientnet_init_weights(self.model)
        elif callable(getattr(self.model, 'init_weights', None)):
            self.model.init_weights()


class MultiExitModule(ModelWrapper):
    """A timm model with auxiliary exits on some `forward_intermediates()` levels; one pass gives all outputs.

    `forward` returns `(logits, features, exit_logits, exit_features)`: the model's logits and pooled
    pre-logit features (`F_N`) and, per exit in depth order, its logits and feature `F_i`. The exits are
    parameters of this module (trained, averaged by EMA) but not of the wrapped model, so the deployed
    checkpoint stays the plain timm model.

    Light exits (`Exit`) take the model's `forward_intermediates()` outputs (NCHW); deep exits (`DeepExit`) take
    the raw output of their level's module, captured by a forward hook during the same pass (for ViT-like models
    the token sequence, prefix tokens included). With deep exits only, the pass is `forward_features`.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int], exits: nn.ModuleList):
        super().__init__(model)
        self.indices = list(indices)
        self.exits = exits

    def no_weight_decay(self):
        names = super().no_weight_decay()
        for j, exit_head in enumerate(self.exits):
            if isinstance(exit_head, DeepExit):  # e.g. a copied Swin's relative position tables
                names |= {f'exits.{j}.{name}' for name in exit_head.no_weight_decay()}
        return names

    def _exit_inputs(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The final feature map and each exit's input, from one pass of the model."""
        light = [i for i, exit_head in zip(self.indices, self.exits) if not isinstance(exit_head, DeepExit)]
        captured, handles = {}, []
        for j, exit_head in enumerate(self.exits):
            if isinstance(exit_head, DeepExit):
                store = lambda module, args, output, j=j: captured.__setitem__(j, output)
                handles.append(self.model.get_submodule(exit_head.module_name).register_forward_hook(store))
        try:
            if light:
                final, intermediates = self.model.forward_intermediates(input, indices=light)
            else:
                final, intermediates = self.model.forward_features(input), []
        finally:
            for handle in handles:
                handle.remove()
        intermediates = iter(intermediates)
        return final, [captured[j] if isinstance(exit_head, DeepExit) else next(intermediates)
                       for j, exit_head in enumerate(self.exits)]

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        final, exit_inputs = self._exit_inputs(input)
        logits, features = self.logits_and_features(final)
        exit_logits, exit_features = [], []
        for exit_head, exit_input in zip(self.exits, exit_inputs):
            exit_output, exit_feature = exit_head(exit_input)
            exit_logits.append(exit_output)
            exit_features.append(exit_feature)
        return logits, features, exit_logits, exit_features

    @torch.no_grad()
    def classifier_logits(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The model's logits and every exit's, for validation."""
        final, exit_inputs = self._exit_inputs(input)
        return self.model.forward_head(final), [exit_head(x)[0] for exit_head, x in zip(self.exits, exit_inputs)]


def feature_hint(exit_feature: torch.Tensor, deepest_feature: torch.Tensor) -> torch.Tensor:
    """BYOT's L2 hint `||F_i - F_N||^2` (eq. 2), `F_N` detached (the teacher side), summed over the batch and
    the feature dimensions as in the code whose lambda = 1e-6 the seed adopts (BYOT's `feature_loss_function`),
    so lambda means what it means there whatever the batch size. That code leaves out the entries where both
    features are <= 0 (its feature maps are post-ReLU); so does this hint: on post-ReLU pooled features (CNNs)
    such entries are both 0 and the mask changes nothing, on features that can be negative (ViT-like models,
    the exits' projections) it drops the entries where both are."""
    with float32_region(exit_feature):
        student, teacher = exit_feature.float(), deepest_feature.detach().float()
        return ((student - teacher).pow(2) * ((student > 0) | (teacher > 0))).sum()


def multi_exit_loss(
        logits: torch.Tensor,
        features: torch.Tensor,
        exit_logits: Sequence[torch.Tensor],
        exit_features: Sequence[torch.Tensor],
        target: torch.Tensor,
        cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        hparams: MultiExitHparams,
) -> Dict[str, torch.Tensor]:
    """`L = L_CE + L_Self-KD + L_DMFL` (seed 4 sec. 3.1) for exits i = 1..N-1 and the deepest classifier N.

    `target` is the labels, mixup's soft targets, or PS-KD's `y_soft` (B, K) (sec. 3.1: distilled "to each
    classifier", i.e. both cross-entropies below); float targets take a soft-target cross-entropy in
    `cross_entropy`.

    - `L_CE = CE(P_N, y)`: the model's own classifier against the (soft) target, with weight 1 as in the seed's
      `L = L_CE + L_Self-KD + L_DMFL` (BYOT's code weighs it 1 - alpha, as the exits' CE).
    - `L_Self-KD = sum_i (1 - alpha) CE(P_i, y) + alpha T^2 KL(P_N || P_i) + lambda ||F_i - F_N||^2` (eq. 2),
      with `P_N` and `F_N` detached (the teacher side), when `byot`; the hint is `feature_hint` (summed over
      the batch, as BYOT's code).
    - `L_DMFL = 1 / (N - 1) sum_i KL(F_i || F_N) + KL(F_N || F_i)` (eq. 3) between the softmax over feature
      dimensions of `F_i` and `F_N`, when `dmfl`. Mutual learning as in DML: in each direction the target
      side is detached, so the first term trains `F_N`, the second `F_i`.
    - Without `byot`, the exits' classifiers learn `CE(P_i, y)` on detached features (`Exit.detach_classifier`),
      which leaves the backbone and the exits' features to DMFL alone.

    Logged terms are unweighted sums over the exits: `loss_ce`, `loss_exit_ce`, `loss_exit_kl`, `loss_hint`,
    `loss_dmfl`.
    """
    loss_ce = cross_entropy(logits, target)
    exit_ce = torch.stack([cross_entropy(z, target) for z in exit_logits]).sum()
    out = {'loss_ce': loss_ce, 'loss_exit_ce': exit_ce}
    if hparams.byot:
        exit_kl = torch.stack([kd_kl_from_logits(z, logits, hparams.temperature) for z in exit_logits]).sum()
        hint = torch.stack([feature_hint(f, features) for f in exit_features]).sum()
        loss = loss_ce + (1 - hparams.alpha) * exit_ce + hparams.alpha * exit_kl + hparams.feature_weight * hint
        out.update(loss_exit_kl=exit_kl, loss_hint=hint)
    else:
        loss = loss_ce + exit_ce
    if hparams.dmfl:
        mutual = [kd_kl_from_logits(features, f, 1.0) + kd_kl_from_logits(f, features, 1.0) for f in exit_features]
        out['loss_dmfl'] = torch.stack(mutual).sum() / len(exit_features)
        loss = loss + out['loss_dmfl']
    out['loss'] = loss
    return out


class MultiExitEvaluator:
    """The task's own evaluator for the deployed model's logits, plus each exit's top-1 (`exit1_top1` is the
    shallowest) and the top-1 of the ensemble of all classifiers, exits and model, by their mean softmax
    (`ensemble_top1`): seed 4 table 2. Counts stay on the device until `compute`.

    Args:
        main: The evaluator of the model's logits (timm's `ClassificationEvaluator` interface).
        num_exits: Number of auxiliary exits.
        device: Device of the counts.
        max_samples: Ignore predictions beyond this many examples (distributed sampler padding).
    """

    def __init__(self, main: Any, num_exits: int, device: torch.device, max_samples: Optional[int] = None):
        self.main = main
        self.num_exits = num_exits
        self.device = torch.device(device)
        self.max_samples = max_samples
        self.default_metric = main.default_metric
        self.metric_names = tuple(main.metric_names) + self._names()
        self.reset()

    def _names(self) -> Tuple[str, ...]:
        return tuple(f'exit{i + 1}_top1' for i in range(self.num_exits)) + ('ensemble_top1',)

    def reset(self) -> None:
        self.main.reset()
        self.num_samples = 0
        self.counts = torch.zeros(self.num_exits + 2, dtype=torch.int64, device=self.device)  # examples, correct

    @torch.no_grad()
    def update(self, output: Tuple[torch.Tensor, List[torch.Tensor]], target: torch.Tensor) -> None:
        logits, exit_logits = output
        self.main.update(logits, target)
        count = logits.shape[0] if self.max_samples is None else max(0, min(logits.shape[0],
                                                                            self.max_samples - self.num_samples))
        self.num_samples += count
        if not count:
            return
        classifiers = [z[:count].float() for z in exit_logits] + [logits[:count].float()]
        target = target[:count]
        ensemble = torch.stack([z.softmax(dim=-1) for z in classifiers]).mean(0)
        correct = [z.argmax(dim=-1).eq(target).sum() for z in classifiers[:-1] + [ensemble]]
        self.counts[0] += count
        self.counts[1:] += torch.stack(correct)

    def _summary(self, main_metrics: Dict[str, float], counts: torch.Tensor) -> Dict[str, float]:
        total, *correct = counts.tolist()
        metrics = OrderedDict(main_metrics)
        metrics.update((name, 100 * c / max(total, 1)) for name, c in zip(self._names(), correct))
        return metrics

    def summary(self) -> Dict[str, float]:
        return self._summary(self.main.summary(), self.counts)

    def compute(self, distributed: bool = False) -> Dict[str, float]:
        counts = self.counts.clone()
        if distributed:
            dist.all_reduce(counts)
        return self._summary(self.main.compute(distributed=distributed), counts)


class ExitsTask(SelfKDTask):
    """What the tasks whose trainable module is a `MultiExitModule` share (`multi_exit`, `dks`): validation of the
    model and of every exit (`MultiExitEvaluator`, through `eval_forward`), and the exits as task state (saved and
    resumed, of the EMA model too; the checkpoint's `state_dict` stays the plain timm model)."""

    def _exit_module(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[MultiExitModule]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        return None if module is None else unwrap_model(module)

    def eval_forward(self, ema: bool = False) -> Callable[[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        module = self._exit_module(ema=ema)
        module.eval()
        return module.classifier_logits

    def create_evaluator(self, **kwargs) -> MultiExitEvaluator:
        main = super().create_evaluator(**kwargs)
        module = self._exit_module()
        return MultiExitEvaluator(main, len(module.exits), self.device, max_samples=kwargs.get('max_samples'))

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The exits (of the EMA model with `ema`): their levels and weights."""
        module = self._exit_module(module, ema)
        if module is None:
            return {}
        return dict(exit_indices=list(module.indices),
                    exits={k: v.detach().cpu() for k, v in module.exits.state_dict().items()})

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        module = self._exit_module(module, ema)
        if module is None:
            raise RuntimeError(f'cannot load the {self.method} exits before setup_ema()' if ema else
                               f'cannot load the {self.method} exits without a trainable module')
        if not state or 'exits' not in state:
            _logger.warning(f'{self.method}: the checkpoint has no exits; they start from scratch')
            return
        if list(state.get('exit_indices', ())) != module.indices:
            flag = f'--{self.method.replace("_", "-")}-indices'
            raise ValueError(f'{self.method}: the checkpoint\'s exits sit on levels {state.get("exit_indices")}, '
                             f'this run\'s on {module.indices} (set {flag} to match)')
        module.exits.load_state_dict(state['exits'], strict=strict)


@register_method('multi_exit', hparams=MultiExitHparams, paper='BYOT: Zhang et al., Be Your Own Teacher, ICCV 2019; '
                                                              'DMFL: Chottananurak et al., Progressive '
                                                              'Self-Knowledge Distillation with Mutual Learning; '
                                                              'PS-KD: Kim et al., ICCV 2021')
class MultiExitTask(ExitsTask):
    """Auxiliary exits on stage outputs learn from the labels and the deepest classifier (BYOT), and exchange
    feature distributions with it (DMFL); with `pskd`, every classifier learns from PS-KD's soft targets.

    Exits (bottleneck -> pooled feature -> fc, `Exit`) sit on the `forward_intermediates()` levels chosen by
    `indices`; one forward pass gives the model's and the exits' outputs, and the loss is
    `multi_exit_loss`. The exits are training-only: they live in the trainable module and the task state
    (saved and resumed, EMA-averaged), not in the deployed checkpoint, and inference runs the plain model.
    Validation also reports each exit's top-1 and the ensemble top-1 (`MultiExitEvaluator`).

    PS-KD (seed 4 sec. 3.1, after Kim et al.): the target of `L_CE` and of eq. 2's exit CE is
    `y_soft = (1 - a_e) y + a_e P^T(x)`, where the teacher `P^T` is the previous epoch's model, i.e. the
    softmax the deepest classifier (the deployed model) gave the image when it was last trained on, kept per
    sample by `components.progressive_targets.ProgressiveTargets` (the component `--selfkd pskd` uses). The
    exits' predictions are not stored: the paper's teacher is "the trained model in the previous epoch". PS-KD
    alone (no BYOT, no DMFL) trains the model exactly as `--selfkd pskd`; its exits are then probes on detached
    features, for the per-exit accuracies. With PS-KD on, the task reads `batch_info()`, refuses streamed data
    sets, and mixes mixup/CutMix batches itself exactly as `--selfkd pskd` (`ProgressiveTargets.mix`: image i with
    image B-1-i under a lambda/box, the progressive targets of both lambda-weighted as the target of every
    classifier, the mixed image's prediction stored as P[i]).
    """

    def __init__(self, model: nn.Module, hparams: MultiExitHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.progressive = ProgressiveTargets(
            hparams.pskd_alpha_t, hparams.pskd_topk, float(getattr(self.criterion, 'smoothing', 0.)), self.device,
            name='PS-KD (--multi-exit-pskd)', topk_flag='--multi-exit-pskd-topk') if hparams.pskd else None

    @classmethod
    def requirements(cls, hparams: MultiExitHparams) -> Needs:
        if not hparams.pskd:
            return Needs()
        return Needs(sample_indices=True, mixup='task', run_facts=RUN_FACTS,
                     bce_refusal=f'--multi-exit-pskd trains every classifier on PS-KD\'s targets: {BCE_REFUSAL}')

    def bind_run(self, run: RunInfo) -> None:
        super().bind_run(run)
        if self.progressive is not None:
            self.progressive.bind_run(run)

    def wrap_model(self, model: nn.Module) -> MultiExitModule:
        indices = exit_indices(model, self.hparams.indices)
        if not getattr(model, 'num_classes', 0):
            raise ValueError(f'multi_exit needs a model with a classifier, and {_model_name(model)} has none')
        feature_dim = getattr(model, 'head_hidden_size', None) or model.num_features
        reference = next(model.parameters())
        exits = nn.ModuleList([
            Exit(model.feature_info[i]['num_chs'], feature_dim, model.num_classes,
                 detach_classifier=not self.hparams.byot)
            for i in indices]).to(device=reference.device, dtype=reference.dtype)
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            exits = nn.SyncBatchNorm.convert_sync_batchnorm(exits)
        _logger.info(f'multi_exit: exits on forward_intermediates() levels {indices} of {_model_name(model)} '
                     f'({sum(p.numel() for p in exits.parameters()) / 1e6:.2f}M training-only parameters)')
        return MultiExitModule(model, indices, exits)

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """PS-KD's soft-target cross-entropy on its `y_soft`; otherwise timm's criterion (the labels or mixup's soft
        targets; --bce-loss replaces it)."""
        if self.progressive is not None and target.is_floating_point():
            return soft_target_ce(logits, target)
        return self.cross_entropy(logits, target)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        info = self.batch_info(batch_size=input.shape[0]) if self.progressive is not None and self.training else None
        if info is not None:
            target = self.progressive.targets(target, info)
            input, target = self.progressive.mix(input, target)
        logits, features, exit_logits, exit_features = self.trainable_module(input)
        out = multi_exit_loss(logits, features, exit_logits, exit_features, target, self._cross_entropy, self.hparams)
        if info is not None:
            self.progressive.record(info, logits)
        out['output'] = logits
        return out

    def sync_task_state(self) -> None:
        if self.progressive is not None:
            self.progressive.sync()

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The exits (of the EMA model with `ema`) and, with PS-KD, the memory (not part of the EMA state)."""
        state = {} if ema or self.progressive is None else self.progressive.state_dict()
        state.update(super().get_task_state(module, ema))
        return state

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        if self.progressive is not None:
            self.progressive.check_state(state)

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        if not ema and self.progressive is not None:
            self.progressive.load_state_dict(state)
        super().load_task_state(state, strict=strict, module=module, ema=ema)
