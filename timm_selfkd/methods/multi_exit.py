"""Multi-exit self-distillation on any timm model with `forward_intermediates()`: BYOT's auxiliary exits, DMFL's
mutual feature loss and PS-KD's progressive soft targets (Chottananurak et al., Progressive Self-Knowledge
Distillation with Mutual Learning, sec. 3.1, eq. 2-3, after Zhang et al., Be Your Own Teacher, ICCV 2019, and
Kim et al., PS-KD, ICCV 2021).

The exits machinery is shared with the methods whose exits are deep (`dks`): an exit is either BYOT's light
`Exit` (on a `forward_intermediates()` output) or a deep branch (`components.deep_branch.DeepBranch`, a fresh copy
of the model's remaining stages, norm and head, on the raw output of the level's module); `MultiExitModule` runs
both kinds from one pass of the model, and `ExitsTask` gives their tasks validation (`MultiExitEvaluator`) and task
state."""
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from timm_selfkd.components.deep_branch import DeepBranch, LevelCapture, branch_no_weight_decay
from timm_selfkd.components.feature_levels import choose_levels, default_levels, model_name, parse_levels
from timm_selfkd.components.losses import float32_region, kd_kl_from_logits, soft_target_ce
from timm_selfkd.components.progressive_targets import BCE_REFUSAL, RUN_FACTS, ProgressiveTargets
from timm_selfkd.components.training_parts import TrainingPart, like_model, training_only_parameters
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.methods.base import ModelWrapper, Needs, RunInfo, SelfKDTask, has_pooled_features

__all__ = ['MultiExitHparams', 'Exit', 'MultiExitModule', 'MultiExitEvaluator', 'ExitsTask', 'MultiExitTask',
           'exit_indices', 'multi_exit_loss']

_logger = logging.getLogger(__name__)

DEFAULT_EXITS = 3  # BYOT and seed 4 table 2: three exits plus the model's own classifier


@dataclass
class MultiExitHparams:
    byot: bool = hparam(True, 'BYOT loss on every exit (eq. 2): (1 - alpha) CE to the target + alpha KL to the deepest '
                              'classifier + lambda feature hint')
    dmfl: bool = hparam(True, 'deep mutual feature loss (eq. 3): symmetric KL between each exit\'s feature '
                              'distribution and the deepest one\'s')
    alpha: float = hparam(0.1, 'BYOT weight alpha of the KL to the deepest classifier (eq. 2; the CE gets 1 - alpha)',
                          within='[0, 1]')
    feature_weight: float = hparam(1e-6, 'BYOT weight lambda of the L2 feature hint (eq. 2)', within='[0, inf)')
    temperature: float = hparam(1.0, 'temperature of the exits\' KL, scaled by T^2 (eq. 2 uses 1; BYOT\'s code 3)',
                                within='(0, inf)')
    indices: str = hparam('', 'forward_intermediates() levels that get an exit, comma-separated (e.g. ViT blocks '
                              '2,5,8); default: the three stage ends before the last (ViT-like models: blocks at 1/4, '
                              '1/2, 3/4 depth)', check=parse_levels)
    pskd: bool = hparam(False, 'PS-KD\'s progressive soft targets (sec. 3.1): every classifier\'s CE (the deepest '
                               'one\'s, BYOT\'s exits\') is to (1 - a_e) y + a_e P[i], P[i] the deepest classifier\'s '
                               'last softmax of image i')
    pskd_alpha_t: float = hparam(0.8, 'PS-KD alpha_T: weight of the past prediction at the last epoch; epoch e '
                                      '(0-based) of E uses alpha_T (e + 1) / E', within='[0, 1]')
    pskd_topk: int = hparam(0, 'PS-KD memory: keep the k largest probabilities of each past prediction, the rest '
                               'spread evenly (0 = all K, in fp16)', within='[0, inf)')

    def __post_init__(self):  # a rule across fields, not a range
        if not (self.byot or self.dmfl or self.pskd):
            raise ValueError('multi_exit needs byot or dmfl or pskd (or several); without them it is plain training')


def exit_indices(model: nn.Module, indices: str = '', method: str = 'multi_exit',
                 default_exits: int = DEFAULT_EXITS) -> List[int]:
    """The `forward_intermediates()` levels that get an exit, checked against the model (`choose_levels`).

    The last level feeds the model's own classifier (the deepest exit, N) and gets no auxiliary exit. By default:
    the ends of the `default_exits` stages before the last, or, for models whose levels all share one resolution
    (ViT, MLP-Mixer, ...), the blocks at 1/(n+1), ..., n/(n+1) of the depth for n = `default_exits` (1/4, 1/2, 3/4
    for three exits).

    Args:
        model: A timm model.
        indices: Comma-separated levels, or '' for the default.
        method: The method named in the error messages.
        default_exits: Number of exits by default.

    Raises:
        ValueError: The model has no `forward_intermediates` or no `forward_head(pre_logits=True)`, or an index does
            not exist (the message names the valid range).
    """
    levels = choose_levels(model, method, parse_levels(indices),
                           lambda: default_levels(model, default_exits), noun='exit index')
    if not has_pooled_features(model):
        raise ValueError(f'{method} needs forward_head(pre_logits=True) for the deepest feature, and model '
                         f'{model_name(model)} has none')
    return levels


class Exit(nn.Module):
    """A light auxiliary classifier on a stage output (BYOT; seed 4 sec. 3.1): bottleneck -> pooled feature -> fc.
    (`components.deep_branch.DeepBranch` is the deep kind: a copy of the model's remaining stages.)

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


class MultiExitModule(ModelWrapper):
    """A timm model with auxiliary exits on some `forward_intermediates()` levels; one pass gives all outputs.

    `forward` returns `(logits, features, exit_logits, exit_features)`: the model's logits and pooled
    pre-logit features (`F_N`) and, per exit in depth order, its logits and feature (a light exit's `F_i`, a deep
    branch's final map). The exits are parameters of this module (trained, averaged by EMA) but not of the wrapped
    model, so the deployed checkpoint stays the plain timm model.

    Light exits (`Exit`) take the model's `forward_intermediates()` outputs (NCHW); deep branches (`DeepBranch`)
    take the raw output of their level's module, captured during the same pass (`LevelCapture`; for ViT-like models
    the token sequence, prefix tokens included). With deep branches only, the pass is `forward_features`.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int], exits: nn.ModuleList):
        super().__init__(model)
        self.indices = list(indices)
        self.exits = exits

    def training_parts(self) -> Dict[str, TrainingPart]:
        return {'exits': TrainingPart(self.exits, {'exit_indices': self.indices}, set_by=('indices',))}

    def no_weight_decay(self):
        return super().no_weight_decay() | branch_no_weight_decay(self)  # e.g. a copied Swin's position tables

    def _exit_inputs(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The final feature map and each exit's input, from one pass of the model."""
        light = [i for i, exit_head in zip(self.indices, self.exits) if not isinstance(exit_head, DeepBranch)]
        deep = [exit_head.module_name for exit_head in self.exits if isinstance(exit_head, DeepBranch)]
        with LevelCapture(self.model, deep) as capture:
            if light:
                final, intermediates = self.model.forward_intermediates(input, indices=light)
            else:
                final, intermediates = self.model.forward_features(input), []
            raw = iter(capture.outputs)
        intermediates = iter(intermediates)
        return final, [next(raw if isinstance(exit_head, DeepBranch) else intermediates) for exit_head in self.exits]

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
    model and of every exit (`MultiExitEvaluator`, through `eval_forward`). The exits are the module's training-only
    parts (`MultiExitModule.training_parts`): task state, of the EMA model too; the checkpoint's `state_dict` stays
    the plain timm model."""

    def eval_forward(self, ema: bool = False) -> Callable[[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        module = self.unwrapped_module(ema=ema)
        module.eval()
        return module.classifier_logits

    def create_evaluator(self, **kwargs) -> MultiExitEvaluator:
        main = super().create_evaluator(**kwargs)
        module = self.unwrapped_module()
        return MultiExitEvaluator(main, len(module.exits), self.device, max_samples=kwargs.get('max_samples'))


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
            raise ValueError(f'multi_exit needs a model with a classifier, and {model_name(model)} has none')
        feature_dim = getattr(model, 'head_hidden_size', None) or model.num_features
        exits = like_model(nn.ModuleList([
            Exit(model.feature_info[i]['num_chs'], feature_dim, model.num_classes,
                 detach_classifier=not self.hparams.byot)
            for i in indices]), model)
        _logger.info(f'multi_exit: exits on forward_intermediates() levels {indices} of {model_name(model)} '
                     f'({training_only_parameters(exits)})')
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
        super().check_task_state(state)
        if self.progressive is not None:
            self.progressive.check_state(state)

    def load_task_state(self, state, strict: bool = True, module: Optional[nn.Module] = None, ema: bool = False):
        if not ema and self.progressive is not None:
            self.progressive.load_state_dict(state)
        super().load_task_state(state, strict=strict, module=module, ema=ema)
