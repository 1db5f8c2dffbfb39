"""USKD: Universal Self-Knowledge Distillation, a normalized loss with customized soft labels (Yang et al., From
Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
Labels, ICCV 2023; official code yzd-v/cls_KD, mmcls/models/dis_losses/uskd.py and the `sd` branch of
mmcls/models/classifiers/distiller.py).

The paper's text is not available to this project, so its equation numbers are not cited: the terms are written
out below (`uskd_loss`) as the official code computes them, which the tests check line for line."""
import inspect
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_selfkd.components.feature_levels import choose_levels, model_name, stage_ends
from timm_selfkd.components.losses import float32_region, known_label_smoothing, mixed_label_weights
from timm_selfkd.components.training_parts import TrainingPart, like_model, training_only_parameters
from timm_selfkd.methods.base import ModelWrapper, Needs, SelfKDTask
from timm_selfkd.registry import hparam, register_method

__all__ = ['USKDHparams', 'WeakHead', 'USKDModule', 'USKDTask', 'uskd_level', 'uskd_labels', 'uskd_loss']

_logger = logging.getLogger(__name__)

RANK_EPS = 1e-6  # the official code's guard in the rank's normalisers


@dataclass
class USKDHparams:
    alpha: float = hparam(1.0, 'weight of the normalized target loss -V_t log S_t (official code: 1 for ImageNet, the '
                               'class default; 0.1 in its CIFAR-100 config)', within='[0, inf)')
    beta: float = hparam(0.1, 'weight of the non-target loss to the Zipf soft labels over the normalized non-target '
                              'probabilities (official code: 0.1 for ImageNet and CIFAR-100)', within='[0, inf)')
    mu: float = hparam(0.005, 'weight of the weak head\'s cross-entropy (official code: 0.005 for ImageNet, the class '
                              'default; 0.1 in its CIFAR-100 config)', within='[0, inf)')
    weak_smoothing: float = hparam(0.1, 'label smoothing of the weak head\'s target, (1 - s) y + s / K (the official '
                                        'code\'s fixed 0.1)', within='[0, 1]')
    level: int = hparam(-1, 'forward_intermediates() level the weak head reads; -1: the end of the second-to-last '
                            'stage (official: ResNet stage 3, Swin stage 3), or for ViT-like models (all levels at one '
                            'resolution) block depth/2 - 1, the official DeiT mid token', within='[-1, inf)')
    weak_norm: bool = hparam(False, 'a LayerNorm over channels before the weak head\'s pooling (the official Swin '
                                    'config: mmcls\'s Swin normalizes every output stage; its ResNet and DeiT features '
                                    'have none); on in the Swin recipe')


def uskd_level(model: nn.Module, level: int = -1) -> int:
    """The `forward_intermediates()` level whose output feeds the weak head, checked against the model.

    Default (-1): the end of the second-to-last stage, i.e. the last level before the final one that is followed
    by a change of resolution (ResNet's layer3, Swin's third stage, EfficientNet's stride-16 blocks), as the
    official code's `fea_s[-2]`; for models whose levels all share one resolution (ViT, DeiT, MLP-Mixer) the
    block at half depth, `depth // 2 - 1`, where the official code takes DeiT's class token (`mid_token`).

    Raises:
        ValueError: The model has no `forward_intermediates`/`feature_info`, or `level` does not exist (the message
            names the valid range).
    """
    def last_stage_end_or_half_depth() -> List[int]:
        ends = stage_ends(model)
        return [ends[-1] if ends else max(len(model.feature_info) // 2 - 1, 0)]

    chosen, = choose_levels(model, 'uskd', [level] if level >= 0 else [], last_stage_end_or_half_depth)
    if not callable(getattr(model, 'forward_head', None)):
        raise ValueError(f'uskd needs forward_head() for the logits after forward_intermediates(), and model '
                         f'{model_name(model)} has none')
    return chosen


class WeakHead(nn.Module):
    """USKD's weak classifier: a linear layer on a pooled intermediate feature (the official `self.fc` on
    `neck(fea_s[-2])`, global average pooling, or on DeiT's mid class token).

    Args:
        in_chs: Channels of the feature.
        num_classes: Classes of the model.
        norm: A LayerNorm over channels before pooling (mmcls's Swin output-stage norm).
        token: The feature is a class token (B, C), not a map (B, C, H, W).
    """

    def __init__(self, in_chs: int, num_classes: int, norm: bool = False, token: bool = False):
        super().__init__()
        self.token = token
        self.norm = nn.LayerNorm(in_chs) if norm else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # (B, C, H, W): per-position norm, then the global average
            return self.norm(x.permute(0, 2, 3, 1)).mean(dim=(1, 2))
        if x.ndim == 3:  # (B, L, C) tokens
            return self.norm(x).mean(dim=1)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def _uses_class_token(model: nn.Module) -> bool:
    """A ViT-like model that classifies from its class token and can return it from forward_intermediates()."""
    return (getattr(model, 'global_pool', None) == 'token' and getattr(model, 'cls_token', None) is not None
            and 'return_prefix_tokens' in inspect.signature(model.forward_intermediates).parameters)


class USKDModule(ModelWrapper):
    """A timm model and USKD's weak head on one `forward_intermediates()` level; `forward` returns
    `(logits, weak_logits)` from one pass. The head is a parameter of this module (trained, EMA-averaged, saved as
    task state), not of the wrapped model, so the deployed checkpoint stays the plain timm model."""

    def __init__(self, model: nn.Module, level: int, head: WeakHead):
        super().__init__(model)
        self.level = level
        self.head = head

    def training_parts(self) -> Dict[str, TrainingPart]:
        return {'weak_head': TrainingPart(self.head, {'weak_level': self.level}, set_by=('level',))}

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.head.token:
            final, (intermediate,) = self.model.forward_intermediates(input, indices=[self.level],
                                                                     return_prefix_tokens=True)
            feature = intermediate[1][:, 0]  # (spatial, prefix tokens): the class token comes first
        else:
            final, (feature,) = self.model.forward_intermediates(input, indices=[self.level])
        return self.model.forward_head(final), self.head(feature)


def uskd_labels(target: torch.Tensor, num_classes: int, smoothing: Optional[float] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labels USKD distils to: `(labels, values, present, label_dist)`.

    Class indices (N,): one label per row, value 1. timm's mixed soft targets (N, K): as the official code, the two
    largest classes of the mixed label with their weights (lam and 1 - lam), read exactly from timm's targets with
    the label smoothing removed (`mixed_label_weights`: the official code receives mmcls's unsmoothed mixed label;
    smoothing there is the CE's). A row whose mix has one class (both images of one class, or lam = 1) has one
    label: `present` is False for the second column (the official code would take an arbitrary zero-weight class as
    its second label and drop it from the non-target labels; we do not). `label_dist` (N, K) is the label
    distribution (one-hot or the mixed weights) the weak head's target is made from.
    """
    if target.ndim == 1:
        labels = target.long()[:, None]
        values = torch.ones(labels.shape, device=target.device)
        return labels, values, torch.ones_like(labels, dtype=torch.bool), F.one_hot(labels[:, 0], num_classes).float()
    weights = mixed_label_weights(target, smoothing)
    values, labels = weights.topk(min(2, num_classes), dim=-1)
    present = values > 0
    return labels, values * present, present, weights


def uskd_loss(
        logits: torch.Tensor,
        weak_logits: torch.Tensor,
        target: torch.Tensor,
        weak_smoothing: float = 0.1,
        smoothing: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """USKD's three terms, unweighted, in float32 (the official `USKDLoss.forward` is
    `alpha * loss_target + beta * loss_nontarget + mu * loss_weak`).

    With `S = softmax(z)` of the final logits, `W = softmax(w)` of the weak head's, and the label(s) t of each row
    (`uskd_labels`: one, or the mix's two with values v_t):

    - Customized soft target label (the student's own target prediction, smoothed): `V_t = S_t^2 + v_t -
      mean_batch(S_t^2)` per label column, detached; `loss_target = -mean_rows sum_t V_t log S_t` (the normalized
      target loss: target terms only).
    - Weak supervision: `loss_weak = CE(w, (1 - s) y + s / K)`, y the (mixed) label distribution, s = weak_smoothing.
    - Soft non-target labels by Zipf's law: every class is ranked by `W_c / (1 - sum_t W_t) + log S_c / (1 - sum_t
      log S_t)` (as the official code, whose `s_i` is the log-softmax by then: the final prediction enters the rank
      as its log-probabilities), class of rank r (1-based) gets `1 / r`; the labels' entries are dropped and the
      rest normalized to `Z`; `loss_nontarget = -mean_rows sum_{c not t} Z_c log softmax_{c not t}(z)_c`, the CE to
      the softmax over the non-target logits only (the normalized non-target loss).

    Absent second labels (`present` False) count 0 in the batch mean of `S_t^2`, in the rank's sums and in the mask.
    The batch mean is over this process's rows, as the official code's (per GPU under DDP).

    Args:
        logits: Final logits (N, K).
        weak_logits: Weak head logits (N, K).
        target: Class indices (N,) or timm's mixed soft targets (N, K).
        weak_smoothing: Label smoothing of the weak head's target.
        smoothing: timm's label smoothing of soft targets, read only with K = 2 classes (`mixed_label_weights`).
    """
    with float32_region(logits):
        logits, weak_logits = logits.float(), weak_logits.float()
        num_rows, num_classes = logits.shape
        labels, values, present, label_dist = uskd_labels(target, num_classes, smoothing)
        log_p = F.log_softmax(logits, dim=-1)
        log_p_t = log_p.gather(1, labels)

        # customized soft target label V_t (detached) and the normalized target loss
        with torch.no_grad():
            square = log_p_t.exp().square() * present
            soft_target = (square + values - square.mean(dim=0, keepdim=True)) * present
        loss_target = -(soft_target * log_p_t).sum(dim=1).mean()

        # weak supervision
        log_w = F.log_softmax(weak_logits, dim=-1)
        weak_target = (1 - weak_smoothing) * label_dist + weak_smoothing / num_classes
        loss_weak = -(weak_target * log_w).sum(dim=1).mean()

        # Zipf soft non-target labels from the rank of the weak and final predictions
        is_label = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels, present)
        with torch.no_grad():
            weak_p = log_w.exp()
            weak_t = (weak_p.gather(1, labels) * present).sum(dim=1, keepdim=True)
            final_t = (log_p_t * present).sum(dim=1, keepdim=True)
            score = weak_p / (1 - weak_t + RANK_EPS) + log_p / (1 - final_t + RANK_EPS)
            position = score.argsort(dim=1, descending=True).argsort(dim=1)  # 0-based rank of every class
            zipf = (position + 1).float().reciprocal().masked_fill(is_label, 0.)
            zipf = zipf / zipf.sum(dim=1, keepdim=True).clamp_min(torch.finfo(zipf.dtype).tiny)
        non_target = logits.masked_fill(is_label, torch.finfo(logits.dtype).min)
        log_q = F.log_softmax(non_target, dim=-1).masked_fill(is_label, 0.)
        loss_nontarget = -(zipf * log_q).sum(dim=1).mean()
    return {'loss_target': loss_target, 'loss_nontarget': loss_nontarget, 'loss_weak': loss_weak}


@register_method('uskd', hparams=USKDHparams,
                 paper='Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach '
                       'with Normalized Loss and Customized Soft Labels, ICCV 2023')
class USKDTask(SelfKDTask):
    """USKD: normalized target/non-target losses to customized soft labels, Zipf's ranked by a weak head and the model

    `L = CE(z, y) + alpha L_target + beta L_non-target + mu CE(w, y_weak)` (`uskd_loss`). A weak linear head
    (`WeakHead`) on a pooled intermediate feature (`uskd_level`: the second-to-last stage, or a ViT's class token
    at half depth) ranks the non-target classes together with the final prediction; the ranks
    give Zipf soft non-target labels (`1 / rank`), and the final prediction's squared target probability,
    re-centred on the batch, is the soft target label. `CE(z, y)` is timm's criterion (`--smoothing`, mixup's soft
    targets; `--bce-loss` replaces it), as the official code keeps the model head's own loss (mmcls's CE or label
    smoothing). The weak head is training-only: it lives in the trainable module and the task state (saved and
    resumed, EMA-averaged), not in the deployed checkpoint.

    Mixup/CutMix (`Needs.mixup='loader'`): timm mixes the batch; the USKD terms use the two classes of each mixed
    label with their weights lam, 1 - lam (the official code's top-2 of the mixed label), recovered exactly from
    timm's label-smoothed targets; the weak head's target is the mixed label, smoothed by `weak_smoothing`.
    """

    def __init__(self, model: nn.Module, hparams: USKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        # timm's label smoothing, for mixed targets of 2 classes (which cannot tell it); None when not given
        self.label_smoothing = known_label_smoothing(self.criterion, kwargs.get('criterion_kwargs'))

    @classmethod
    def requirements(cls, hparams: USKDHparams) -> Needs:
        return Needs(mixup='loader')  # the official code takes mixed labels: their top two classes

    def wrap_model(self, model: nn.Module) -> USKDModule:
        level = uskd_level(model, self.hparams.level)
        num_classes = getattr(model, 'num_classes', 0)
        if not num_classes:
            raise ValueError(f'uskd needs a model with a classifier, and {model_name(model)} has none')
        token = _uses_class_token(model)
        head = like_model(WeakHead(model.feature_info[level]['num_chs'], num_classes, norm=self.hparams.weak_norm,
                                   token=token), model)
        _logger.info(f'uskd: weak head on forward_intermediates() level {level} of {model_name(model)} '
                     f'({"class token" if token else "pooled map"}, {training_only_parameters(head)})')
        return USKDModule(model, level, head)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, weak_logits = self.trainable_module(input)
        loss_ce = self.cross_entropy(logits, target)
        terms = uskd_loss(logits, weak_logits, target, self.hparams.weak_smoothing, self.label_smoothing)
        h = self.hparams
        loss = loss_ce + h.alpha * terms['loss_target'] + h.beta * terms['loss_nontarget'] + h.mu * terms['loss_weak']
        return {'loss': loss, 'output': logits, 'loss_ce': loss_ce, **terms}
