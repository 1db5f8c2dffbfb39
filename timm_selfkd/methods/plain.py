"""`none`: timm's plain classification, so baselines and self-KD runs share one training loop."""
from dataclasses import dataclass
from typing import Dict

import torch

from timm_selfkd.registry import register_method
from timm_selfkd.methods.base import SelfKDTask


@dataclass
class PlainHparams:
    """No hyper-parameters: the loss is timm's criterion (cross-entropy, label smoothing, mixup targets)."""


@register_method('none', hparams=PlainHparams, paper='baseline: cross-entropy with hard (or mixup) labels')
class PlainTask(SelfKDTask):
    """Plain supervised training with timm's classification criterion."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        return {'loss': loss_ce, 'output': output, 'loss_ce': loss_ce}
