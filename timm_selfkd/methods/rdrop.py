"""R-Drop: two sampled sub-networks of the same images agree with each other (Liang et al., R-Drop: Regularized
Dropout for Neural Networks, NeurIPS 2021, sec. 2.1).

For an image x with label y, two forward passes through the same weights, each with its own dropout masks (and
here also its own drop-path sub-network), give the distributions P1 = P^w1(y|x) and P2 = P^w2(y|x). R-Drop
minimises, per image,

    L_NLL = -log P1(y|x) - log P2(y|x)                        (the cross-entropy of both passes)
    L_KL  = 1/2 (KL(P1 || P2) + KL(P2 || P1))                 (the symmetric KL between the passes)
    L     = L_NLL + alpha L_KL                                (both passes get the gradient of both terms)

averaged over the batch. Official code (dropreg/R-Drop, vit_src/models/modeling.py, the image-classification
experiments): `loss = ce(logits1) + ce(logits2) + alpha * (kl_div(log p1, p2).sum() + kl_div(log p2, p1).sum())`
with the CE terms averaged over the batch and the KL terms summed over batch and classes, without the 1/2, and
neither pass detached; `--alpha 0.3`.

Our choices (see `RDropHparams`):
  - alpha 0.6 with the 1/2 is the official code's 0.3 without it.
  - The KL term is averaged over the batch, as the CE terms are (the equations' per-image loss): the official
    code's sum makes the KL weight grow with the images per process and step (32 in its ViT configuration, 512
    images in 16 accumulated micro-batches: its effective alpha in our form is 0.6 x 32 = 19.2).
    `kl_reduction='sum'` reproduces the official lines exactly.
  - Sub-networks: the model's dropout and stochastic depth, sampled independently in each pass. By default per
    image (timm's own DropPath, as dropout masks are per element: the two passes are two ordinary training-mode
    forwards, as in the official code); `per_sample=False` draws one drop-path sub-network per pass for the whole
    batch (Self-Guidance's Algorithm 1, dropped blocks not computed). A model with neither dropout nor drop path
    would give two equal passes (L_KL = 0): it gets stochastic depth with a linear 0 -> `default_rate` schedule, as
    Self-Guidance adds it (`default_rate=0` refuses such a model instead).
  - BatchNorm: only the first pass updates the running statistics (one update per step, as in plain training);
    the second normalises with its batch statistics too but leaves the running ones alone
    (`second_pass_bn_stats=True`: both update them, as two plain forward calls would).
  - `output` is the first pass's logits: a training-mode (dropped-out) forward, what plain training reports.
  - Mixup/CutMix: timm mixes the batch; both passes see the same mixed images, both CE terms take the mixed soft
    targets, the KL compares the passes' predictions (it reads no label). `--bce-loss` replaces both CE terms;
    the KL stays between softmax distributions.
"""
import logging
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.components.stochastic_depth import (prepare_depth_units, refuse_grad_checkpointing,
                                                     stochastic_layers)
from timm_selfkd.methods.base import SelfKDTask
from timm_selfkd.methods.self_guidance import SubnetworkPasses, SubnetworkTask
from timm_selfkd.registry import hparam, register_method

__all__ = ['RDropHparams', 'RDropTask', 'symmetric_kl', 'rdrop_loss']

_logger = logging.getLogger(__name__)

KL_REDUCTIONS = ('mean', 'sum')


@dataclass
class RDropHparams:
    alpha: float = hparam(0.6, 'weight alpha of L_KL = (KL(P1||P2) + KL(P2||P1)) / 2 in L = CE1 + CE2 + alpha L_KL '
                               '(sec. 2.1); 0.6 is the official ViT code\'s --alpha 0.3, which it puts on the two KLs '
                               'without the 1/2 (and sums over its 32-image micro-batches: 19.2 per image, as the '
                               'recipes set it)', within='[0, inf)')
    kl_reduction: str = hparam('mean', 'L_KL over the batch: mean (per image, as the CE terms: the equations) or sum '
                                       '(the official ViT code: summed over the step\'s images while the CE terms are '
                                       'averaged, so its weight grows with the images per process)',
                               choices=KL_REDUCTIONS)
    default_rate: float = hparam(0.1, 'deepest block\'s drop rate of the linear 0 -> rate stochastic-depth schedule '
                                      'added to a model with neither dropout nor drop path (our choice: DeiT\'s and '
                                      'ConvNeXt-T\'s drop-path rate; the paper\'s ViT uses dropout 0.1); 0 refuses '
                                      'such a model; a model\'s own rates are kept', within='[0, 1)')
    per_sample: bool = hparam(True, 'drop paths per image (timm\'s DropPath; dropout is always per element); false: '
                                    'one drop-path sub-network per pass for the whole batch (Self-Guidance\'s Alg. 1)')
    skip_dropped: bool = hparam(True, 'with one sub-network per batch, do not compute the blocks it drops where the '
                                      'block\'s output is known without them')
    second_pass_bn_stats: bool = hparam(False, 'let the second pass update BatchNorm running statistics too (default: '
                                               'only the first, one update per step as in plain training)')


def symmetric_kl(first_logits: torch.Tensor, second_logits: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
    """`L_KL = 1/2 (KL(P1 || P2) + KL(P2 || P1))` of the passes' softmax distributions, in float32, with gradient
    into both; summed over classes and averaged (`'mean'`) or summed (`'sum'`) over the batch."""
    kl = 0.5 * (kd_kl_from_logits(second_logits, first_logits, 1.0, detach_teacher=False)
                + kd_kl_from_logits(first_logits, second_logits, 1.0, detach_teacher=False))
    return kl * first_logits.shape[0] if reduction == 'sum' else kl


def rdrop_loss(
        first_logits: torch.Tensor,
        second_logits: torch.Tensor,
        ce_first: torch.Tensor,
        ce_second: torch.Tensor,
        alpha: float,
        reduction: str = 'mean',
) -> Dict[str, torch.Tensor]:
    """`L = CE(z1, y) + CE(z2, y) + alpha L_KL(z1, z2)`; returns `loss` and the terms `loss_ce` (first pass),
    `loss_ce2` (second pass) and `loss_kl` (L_KL, unweighted)."""
    loss_kl = symmetric_kl(first_logits, second_logits, reduction)
    return {'loss': ce_first + ce_second + alpha * loss_kl, 'loss_ce': ce_first, 'loss_ce2': ce_second,
            'loss_kl': loss_kl}


@register_method('rdrop', hparams=RDropHparams, paper='Liang et al., R-Drop: Regularized Dropout for Neural '
                                                    'Networks, NeurIPS 2021')
class RDropTask(SubnetworkTask):
    """Two sampled sub-networks of the same weights learn the labels and agree with each other (symmetric KL).

    R-Drop, sec. 2.1; see the module docstring for the equations and our choices.

    The sub-networks come from the model's own dropout and stochastic depth (timm's `--drop`, `--drop-path` and
    the model's dropout arguments); a model with neither gets stochastic depth (`default_rate`), inserted once (no
    parameters, so checkpoints stay plain timm checkpoints). A model with no place for either is refused, as is
    timm's gradient checkpointing.
    """

    def wrap_model(self, model: nn.Module) -> SubnetworkPasses:
        hp = self.hparams
        dropout = stochastic_layers(model, drop_path=False)
        units = prepare_depth_units(model, 'rdrop', hp.default_rate, '--rdrop-default-rate',
                                    add=not dropout and hp.default_rate > 0,
                                    needs='needs dropout or stochastic depth: no layer of it samples in training mode')
        if not units and not dropout:
            raise ValueError(f'rdrop needs dropout or stochastic depth, and model {type(model).__name__} has neither '
                             '(build it with --drop/--drop-path, or let --rdrop-default-rate > 0 add stochastic depth)')
        if dropout:
            listed = ', '.join(dropout[:3]) + (', ...' if len(dropout) > 3 else '')
            _logger.info(f'rdrop: the model\'s dropout samples the sub-networks{" too" if units else ""} '
                         f'({len(dropout)} layer{"s" if len(dropout) != 1 else ""}: {listed})')
        refuse_grad_checkpointing(model, 'rdrop')
        return SubnetworkPasses(model, units, full=(False, False), norm_stats=(True, hp.second_pass_bn_stats),
                                per_sample=hp.per_sample, skip_dropped=hp.skip_dropped)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> SelfKDTask:
        """With one sub-network per batch both passes may drop the same block, whose weights then get no gradient
        on this rank: DDP must look for unused parameters (per image, every weight is used in every step)."""
        if not self.hparams.per_sample:
            ddp_kwargs.setdefault('find_unused_parameters', True)
        return super().prepare_distributed(device_ids, **ddp_kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        first, second = self.trainable_module(input)
        ce_first = self.cross_entropy(first, target)
        ce_second = self.cross_entropy(second, target)
        out = rdrop_loss(first, second, ce_first, ce_second, self.hparams.alpha, self.hparams.kl_reduction)
        out['output'] = first
        return out
