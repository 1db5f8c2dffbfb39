"""FRSKD: a BiFPN self-teacher over the stage outputs refines them and teaches them back (Ji et al., Refine Myself
by Teaching Myself: Feature Refinement via Self-Knowledge Distillation, CVPR 2021; official code MingiJi/FRSKD)."""
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_selfkd.components.bifpn import BiFPN
from timm_selfkd.components.feature_levels import choose_levels, default_levels, model_name, parse_levels
from timm_selfkd.components.losses import float32_region, kd_kl_from_logits
from timm_selfkd.components.training_parts import TrainingPart, like_model, training_only_parameters
from timm_selfkd.methods.base import ModelWrapper, Needs, SelfKDTask
from timm_selfkd.registry import hparam, register_method

__all__ = ['FRSKDHparams', 'FRSKDModule', 'FRSKDTask', 'teacher_levels', 'attention_map', 'attention_loss',
           'frskd_loss']

_logger = logging.getLogger(__name__)

DEFAULT_LEVELS = 4  # the official code's self-teacher reads all four stages of its ResNets


def _parse_indices(text: str) -> Tuple[int, ...]:
    indices = parse_levels(text)
    if len(indices) == 1:
        raise ValueError(f'must name at least two levels (the self-teacher fuses them), got {text!r}')
    return indices


@dataclass
class FRSKDHparams:
    alpha: float = hparam(2.0, 'weight alpha of the KD from the self-teacher\'s logits to the model\'s (sec. 3.2); the '
                               'official README\'s CIFAR-100 command (its main.py\'s bare default is 1)',
                          within='[0, inf)')
    beta: float = hparam(100.0, 'weight beta of the attention-map feature distillation (sec. 3.2), summed over the '
                                'levels; the official README\'s CIFAR-100 command (its main.py\'s bare default is 0)',
                         within='[0, inf)')
    temperature: float = hparam(4.0, 'temperature of the KD term, scaled by T^2 (official code: 4)', within='(0, inf)')
    width: int = hparam(2, 'self-teacher node widths as multiples of the stage widths, d_i = w c_i (official BiFPNc: '
                           '2; Self-KD-Lib uses 1 for ResNet-50 and ImageNet ResNet-18)', within='[1, inf)')
    depth: int = hparam(2, 'depthwise-separable 3x3 units per self-teacher fusion node (official: 2; Self-KD-Lib 1 '
                           'for ResNet-50 and ImageNet ResNet-18)', within='[1, inf)')
    indices: str = hparam('', 'forward_intermediates() levels the self-teacher reads, comma-separated, at least two '
                              '(e.g. ViT blocks 2,5,8,11); default: the last four stage ends (ResNet: its four stages, '
                              'as the official code); ViT-like models: the blocks at 1/4, 1/2, 3/4 and all of the '
                              'depth', check=_parse_indices)


def teacher_levels(model: nn.Module, indices: str = '') -> List[int]:
    """The `forward_intermediates()` levels the self-teacher reads, finest first, checked against the model.

    By default the last `DEFAULT_LEVELS` (4) stage ends: the levels followed by a change of resolution and the last
    level (ResNet: layer1-layer4, as the official code; EfficientNet: the ends of its reduction-4 to -32 stages;
    Swin, ConvNeXt: their four stages). Models whose levels all share one resolution (ViT, DeiT, MLP-Mixer, ...)
    get the blocks at 1/4, 1/2, 3/4 and all of the depth, and a same-resolution BiFPN.

    Raises:
        ValueError: The model has no `forward_intermediates`/`feature_info`, fewer than two levels, or an index
            outside its levels (the message names the valid range).
    """
    levels = choose_levels(model, 'frskd', _parse_indices(indices),
                           lambda: default_levels(model, DEFAULT_LEVELS, with_last=True), with_last=True)
    if not callable(getattr(model, 'forward_head', None)):
        raise ValueError(f'frskd needs forward_head() for the model\'s logits, and model {model_name(model)} has none')
    return levels


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko and Komodakis' spatial attention with p = 2, as FRSKD's official code: the channel mean of the
    squared (B, C, H, W) map, flattened and L2-normalised over the H W positions, in float32: (B, H W)."""
    with float32_region(feature):
        return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """FRSKD's feature distillation `L_F = sum_i ||phi(T_i) - phi(F_i)||` (sec. 3.2) as the official code computes
    it (`at_loss`, for which its beta = 100 is set): `sum_i mean (phi(F_i) - phi(T_i))^2`, the mean over the batch
    and positions of the squared difference of the attention maps of each stage output `F_i` and the self-teacher's
    refined map `T_i` at its resolution; `T_i` detached (the teacher side)."""
    with float32_region(features[0]):
        return torch.stack([(attention_map(f) - attention_map(t.detach())).pow(2).mean()
                            for f, t in zip(features, teacher_features)]).sum()


def frskd_loss(
        logits: torch.Tensor,
        features: Sequence[torch.Tensor],
        teacher_features: Sequence[torch.Tensor],
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        hparams: 'FRSKDHparams',
) -> Dict[str, torch.Tensor]:
    """`L_FRSKD = L_CE(x, y; theta_c) + L_CE(x, y; theta_t) + alpha L_KD + beta L_F` (FRSKD sec. 3.2; terms as the
    official code computes them).

    - `loss_ce`: the model's hard-label term, `loss_teacher_ce`: the self-teacher classifier's (both timm's
      criterion: labels, mixup's soft targets, or BCE with --bce-loss).
    - `loss_kd = T^2 KL(softmax(z_t / T) || softmax(z_c / T))`, batch mean, the self-teacher's logits `z_t`
      detached (official `DistillKL`: the teacher side gets no gradient from it).
    - `loss_at = attention_loss(F, T)`, the refined maps detached.

    The self-teacher learns from its own CE, whose gradient also reaches the backbone through the stage outputs
    it reads (as the official code, which does not detach them).
    """
    loss_ce = cross_entropy(logits, target)
    loss_teacher_ce = cross_entropy(teacher_logits, target)
    loss_kd = kd_kl_from_logits(logits, teacher_logits, hparams.temperature)
    loss_at = attention_loss(features, teacher_features)
    loss = loss_ce + loss_teacher_ce + hparams.alpha * loss_kd + hparams.beta * loss_at
    return {'loss': loss, 'loss_ce': loss_ce, 'loss_teacher_ce': loss_teacher_ce, 'loss_kd': loss_kd,
            'loss_at': loss_at}


class FRSKDModule(ModelWrapper):
    """A timm model and its training-only self-teacher; one pass gives both.

    `forward` returns `(logits, stage outputs, refined maps, self-teacher logits)`. The self-teacher is a
    parameter of this module (trained, averaged by EMA) but not of the wrapped model, so the deployed checkpoint
    stays the plain timm model.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int], self_teacher: BiFPN):
        super().__init__(model)
        self.indices = list(indices)
        self.self_teacher = self_teacher

    def training_parts(self) -> Dict[str, TrainingPart]:
        built_for = {'levels': self.indices, 'width': self.self_teacher.width, 'depth': self.self_teacher.depth}
        return {'self_teacher': TrainingPart(self.self_teacher, built_for, set_by=('indices', 'width', 'depth'))}

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor],
                                                    torch.Tensor]:
        final, intermediates = self.model.forward_intermediates(input, indices=self.indices)
        logits = self.model.forward_head(final)
        refined, teacher_logits = self.self_teacher(intermediates)
        return logits, intermediates, refined, teacher_logits


@register_method('frskd', hparams=FRSKDHparams, paper='Ji et al., Refine Myself by Teaching Myself: Feature '
                                                     'Refinement via Self-Knowledge Distillation, CVPR 2021')
class FRSKDTask(SelfKDTask):
    """A BiFPN self-teacher over the stage outputs teaches the model its refined attention maps and its logits.

    Ji et al., sec. 3.1: the self-teacher (`components.bifpn.BiFPN`, the official BiFPNc) reads the stage outputs
    `F_i` of `forward_intermediates()` (levels from `teacher_levels`): lateral maps `L_i = Conv(F_i; d_i)`, a
    top-down path `P_i = Conv(w1 L_i + w2 Resize(P_{i+1}); d_i)`, a bottom-up path
    `T_i = Conv(w1 L_i + w2 P_i + w3 Resize(T_{i-1}); d_i)` (fast normalised fusion weights, depthwise-separable
    convolutions, `d_i = width c_i`), and its own classifier on the pooled `T_n`. Sec. 3.2, the loss
    (`frskd_loss`): `L_CE(model) + L_CE(self-teacher) + alpha L_KD + beta L_F` with
    `L_KD = T^2 KL(softmax(z_t / T) || softmax(z_c / T))` and `L_F = sum_i ||phi(T_i) - phi(F_i)||`, phi the
    L2-normalised channel mean of the squared map (attention transfer, p = 2; computed as the official code,
    `attention_loss`).

    The stage outputs enter the self-teacher through a ReLU, as in the official code (whose ResNet stage outputs are
    post-ReLU, so there it changes nothing); the attention term squares the stage outputs as they are, so the sign
    of outputs that are not post-ReLU (EfficientNet's linear bottlenecks, ViT tokens) does not matter to it.

    ViT-like models (token maps of one resolution at every block) get a same-resolution BiFPN: the fusions and
    convolutions of the paper need no resampling, and attention over token positions is the spatial attention the
    feature term matches. The self-teacher is training-only: it lives in the trainable module and the task state
    (saved, resumed, EMA-averaged), not in the deployed checkpoint; inference and validation run the plain model.

    Mixup/CutMix come from the loader: the official code mixes the batch once and trains both classifiers on the
    mixed targets, the KD and attention terms on the mixed images, which is what timm's mixed batches give here.
    With --bce-loss, both classifiers' hard-label terms become timm's BCE; the KD term stays a softmax KL.
    """

    @classmethod
    def requirements(cls, hparams: FRSKDHparams) -> Needs:
        return Needs()

    def wrap_model(self, model: nn.Module) -> FRSKDModule:
        indices = teacher_levels(model, self.hparams.indices)
        if not getattr(model, 'num_classes', 0):
            raise ValueError(f'frskd needs a model with a classifier, and {model_name(model)} has none')
        in_chs = [model.feature_info[i]['num_chs'] for i in indices]
        teacher = like_model(BiFPN(in_chs, model.num_classes, self.hparams.width, self.hparams.depth), model)
        _logger.info(f'frskd: self-teacher on forward_intermediates() levels {indices} of {model_name(model)} '
                     f'({training_only_parameters(teacher)})')
        return FRSKDModule(model, indices, teacher)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, features, refined, teacher_logits = self.trainable_module(input)
        out = frskd_loss(logits, features, refined, teacher_logits, target, self.cross_entropy, self.hparams)
        out['output'] = logits
        return out
