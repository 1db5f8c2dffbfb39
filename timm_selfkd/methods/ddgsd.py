"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019), without official code."""
from dataclasses import dataclass, field
from typing import Dict

import torch

from ..losses import kd_kl_from_logits, linear_mmd
from ..registry import register_method
from ..samplers import EpochBatchSampler, ViewsBatchSampler
from .base import LogitsAndFeatures, SelfKDTask, check_range

VIEWS = 2


@dataclass
class DDGSDHparams:
    weight: float = field(default=1.0, metadata={
        'help': 'weight of the symmetric KL between the two views\' predictions (unverified: no official code)'})
    temperature: float = field(default=4.0, metadata={'help': 'softening temperature T of the KL (unverified)'})
    mmd_weight: float = field(default=0.0, metadata={
        'help': 'weight of the linear-kernel MMD between the two views\' pooled features; 0 = off, as in DLB\'s '
                'comparison (the paper\'s kernel and weight are unverified)'})

    def __post_init__(self):
        check_range('ddgsd', 'weight', self.weight, 0.)
        check_range('ddgsd', 'temperature', self.temperature, 1e-6)
        check_range('ddgsd', 'mmd_weight', self.mmd_weight, 0.)


@register_method('ddgsd', hparams=DDGSDHparams, paper='Xu & Liu, Data-Distortion Guided Self-Distillation for '
                                                      'Deep Neural Networks, AAAI 2019')
class DDGSDTask(SelfKDTask):
    """Make two independently augmented views of each image agree: ce on both + symmetric KL (+ MMD).

    Batches hold every image twice in a row (`ViewsBatchSampler`; `-b` counts both views), and timm's pipeline
    augments each copy on its own. With z_a, z_b the logits of the views (rows 0::2 and 1::2), the loss is
    `ce(z, y)` averaged over both views + `w * T^2 * (KL(sm(z_b/T) || sm(z_a/T)) + KL(sm(z_a/T) || sm(z_b/T)))`,
    each KL's target detached, + `w_mmd * ||mean f_a - mean f_b||^2` on pooled features when `mmd_weight > 0`
    (features from the same forward pass, `LogitsAndFeatures`).
    """

    mixup_conflict = 'the two views would be mixed with different partners and stop being views of one image'

    def wrap_model(self, model):
        return LogitsAndFeatures(model) if self.hparams.mmd_weight > 0 else model

    @classmethod
    def check_setup(cls, hparams, *, batch_size, mixup):
        super().check_setup(hparams, batch_size=batch_size, mixup=mixup)
        ViewsBatchSampler.check_batch_size(batch_size, VIEWS)

    @classmethod
    def batch_sampler(cls, hparams, *, index_sampler, batch_size, **_):
        return ViewsBatchSampler(EpochBatchSampler(index_sampler, batch_size // VIEWS), VIEWS)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        result = self.trainable_module(input)
        output, features = result if isinstance(result, tuple) else (result, None)
        loss_ce = self.cross_entropy(output, target)
        view_a, view_b = output[0::VIEWS], output[1::VIEWS]
        temperature = self.hparams.temperature
        loss_kd = kd_kl_from_logits(view_a, view_b, temperature) + kd_kl_from_logits(view_b, view_a, temperature)
        out = {'loss': loss_ce + self.hparams.weight * loss_kd, 'output': output, 'loss_ce': loss_ce,
               'loss_kd': loss_kd}
        if features is not None:
            out['loss_mmd'] = linear_mmd(features[0::VIEWS], features[1::VIEWS])
            out['loss'] = out['loss'] + self.hparams.mmd_weight * out['loss_mmd']
        return out
