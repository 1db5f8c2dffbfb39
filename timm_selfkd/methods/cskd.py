"""CS-KD: class-wise self-knowledge distillation (Yun et al., Regularizing Class-wise Predictions via
Self-knowledge Distillation, CVPR 2020, sec. 3.1, eq. 1-3)."""
from dataclasses import dataclass, field
from typing import Dict

import torch

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.registry import register_method
from timm_selfkd.components.samplers import ClassGroupBatchSampler
from timm_selfkd.methods.base import Needs, SelfKDTask, check_range, refuse_mixup


@dataclass
class CSKDHparams:
    weight: float = field(default=1.0, metadata={
        'help': 'weight lambda_cls of the class-wise KD term (eq. 3; 1, 3 on some fine-grained sets)'})
    temperature: float = field(default=4.0, metadata={'help': 'softening temperature T (eq. 2)'})

    def __post_init__(self):
        check_range('cskd', 'weight', self.weight, 0.)
        check_range('cskd', 'temperature', self.temperature, 1e-6)


@register_method('cskd', hparams=CSKDHparams, paper='Yun et al., Regularizing Class-wise Predictions via '
                                                    'Self-knowledge Distillation, CVPR 2020')
class CSKDTask(SelfKDTask):
    """Distil the prediction for another image of the same class: B anchors learn from B same-class partners.

    Batches are `[B anchors, their B partners in the same order]` (`ClassGroupBatchSampler`, layout
    `anchors_first`; `-b` counts both, so it must be even). As in the official code, the anchors get
    `ce(z_a, y) + lambda * T^2 * KL(softmax(z_p / T) || softmax(z_a / T))` and the partners are only the
    teacher: their forward runs without gradient, after the anchors' (BatchNorm sees each half on its own),
    and they get no cross-entropy. Partners are never the anchor itself (the official sampler may draw it).
    """

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return refuse_mixup('a mixed image has no single class to draw a same-class partner from', own_batches=True,
                            row_aligned_output=False)  # logits of the anchors only

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        ClassGroupBatchSampler.check_batch_size(batch_size, 1, 'CS-KD')

    def batch_sampler(self, *, labels, batch_size, seed, rank, world_size, **_):
        if labels is None:
            raise ValueError('CS-KD needs the class label of every training image to draw same-class partners, '
                             'and this dataset does not expose them')
        return ClassGroupBatchSampler(labels, batch_size, 1, seed=seed, rank=rank, world_size=world_size,
                                      layout='anchors_first', method='CS-KD')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        anchors = input.shape[0] // 2
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
