"""CS-KD: class-wise self-knowledge distillation (Yun et al., Regularizing Class-wise Predictions via
Self-knowledge Distillation, CVPR 2020, sec. 3.1, eq. 1-3)."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.components.replayed_mixup import SharedMix
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.components.samplers import ClassGroupBatchSampler
from timm_selfkd.methods.base import Needs, SelfKDTask


@dataclass
class CSKDHparams:
    weight: float = hparam(1.0, 'weight lambda_cls of the class-wise KD term (eq. 3; 1, 3 on some fine-grained sets)',
                           within='[0, inf)')
    temperature: float = hparam(4.0, 'softening temperature T (eq. 2)', within='(0, inf)')


@register_method('cskd', hparams=CSKDHparams, paper='Yun et al., Regularizing Class-wise Predictions via '
                                                    'Self-knowledge Distillation, CVPR 2020')
class CSKDTask(SelfKDTask):
    """Distil the prediction for another image of the same class: B anchors learn from B same-class partners.

    Batches are `[B anchors, their B partners in the same order]` (`ClassGroupBatchSampler`, layout
    `anchors_first`; `-b` counts both, so it must be even). As in the official code, the anchors get
    `ce(z_a, y) + lambda * T^2 * KL(softmax(z_p / T) || softmax(z_a / T))` and the partners are only the
    teacher: their forward runs without gradient, after the anchors' (BatchNorm sees each half on its own),
    and they get no cross-entropy. Partners are never the anchor itself (the official sampler may draw it).

    Mixup/CutMix (no source says; the natural extension, issue 15): the task mixes each batch itself
    (`SharedMix`, timm's parameters and draws). The per-class batch is formed first; then anchor i is mixed with
    anchor n-1-i (n = B/2) under a lambda/box, and partner i with partner n-1-i under the SAME lambda/box. So the
    teacher of the mixed anchor `lam x_i + (1 - lam) x_(n-1-i)` is the prediction for `lam p_i + (1 - lam)
    p_(n-1-i)`, the same mix of their same-class partners; the cross-entropy is on the anchors' mixed (smoothed)
    targets `lam y_i + (1 - lam) y_(n-1-i)`. `--mixup-mode batch`: one lambda/box for all anchors; 'pair' and
    'elem': one per anchor pair / anchor, drawn as timm does for the B/2 anchors, and partner i gets anchor i's.
    Past `--mixup-off-epoch` (or when a draw does not mix) lambda is 1 and the batch is unmixed.
    """

    def __init__(self, model, hparams: CSKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.mixer: Optional[SharedMix] = None

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(own_batches=True, mixup='task', row_aligned_output=False)  # logits of the anchors only

    def bind_run(self, run) -> None:
        super().bind_run(run)
        self.mixer = SharedMix(run.mixup, 'CS-KD\'s mix of anchors and partners') if run.mixup is not None else None

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        ClassGroupBatchSampler.check_batch_size(batch_size, 1, 'CS-KD')

    def batch_sampler(self, *, index_sampler, labels, batch_size, seed, rank, world_size):
        if labels is None:
            raise ValueError('CS-KD needs the class label of every training image to draw same-class partners, '
                             'and this dataset does not expose them')
        return ClassGroupBatchSampler(labels, batch_size, 1, seed=seed, rank=rank, world_size=world_size,
                                      layout='anchors_first', method='CS-KD', anchor_sampler=index_sampler)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        anchors = input.shape[0] // 2
        if self.mixer is not None and self.training:  # each block flipped in itself, one lambda/box for both
            target = self.mixer([input[:anchors], input[anchors:]], [target[:anchors]])[0]
        output = self.trainable_module(input[:anchors])
        with torch.no_grad():
            partner_output = self.trainable_module(input[anchors:])
        loss_ce = self.cross_entropy(output, target[:anchors])
        loss_kd = kd_kl_from_logits(output, partner_output, self.hparams.temperature)
        return {
            'loss': loss_ce + self.hparams.weight * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }
