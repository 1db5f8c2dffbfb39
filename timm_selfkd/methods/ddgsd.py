"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019), without official code."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from timm_selfkd.components.losses import kd_kl_from_logits, linear_mmd
from timm_selfkd.components.replayed_mixup import SharedMix
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.components.samplers import EpochBatchSampler, ViewsBatchSampler
from timm_selfkd.methods.base import LogitsAndFeatures, Needs, SelfKDTask
from timm_selfkd.methods.layout import BatchLayout

VIEWS = 2


@dataclass
class DDGSDHparams:
    weight: float = hparam(1.0, 'weight of the symmetric KL between the two views\' predictions (unverified: no '
                                'official code)', within='[0, inf)')
    temperature: float = hparam(4.0, 'softening temperature T of the KL (unverified)', within='(0, inf)')
    mmd_weight: float = hparam(0.0, 'weight of the linear-kernel MMD between the two views\' pooled features; 0 = off, '
                                    'as in DLB\'s comparison (the paper\'s kernel and weight are unverified)',
                               within='[0, inf)')


class ViewsLayout(BatchLayout):
    """DDGSD's batch layout: every image as `VIEWS` consecutive rows (views), made to agree (the class
    docstring of `DDGSDTask` gives the terms and the mixing)."""

    rows_per_image = VIEWS

    def check_stack(self, hparams: DDGSDHparams) -> None:
        """Refuse what a stack cannot do: the other method's forward gives logits only, no pooled features."""
        if hparams.mmd_weight > 0:
            raise ValueError('ddgsd mmd_weight must be 0 when DDGSD is stacked on another method (that method\'s '
                             'forward gives no pooled features; DLB\'s comparison also drops the MMD)')

    def wrap_batch_sampler(self, hparams: DDGSDHparams, batch_sampler) -> ViewsBatchSampler:
        """Every image of `batch_sampler`'s batches as two consecutive rows (views)."""
        return ViewsBatchSampler(batch_sampler, VIEWS)

    def terms(self, hparams: DDGSDHparams, output: torch.Tensor, features: Optional[torch.Tensor] = None):
        """The view terms of a batch of view pairs: (their weighted sum, {'kd': ..., 'mmd': ...})."""
        view_a, view_b = output[0::VIEWS], output[1::VIEWS]
        temperature = hparams.temperature
        terms = {'kd': kd_kl_from_logits(view_a, view_b, temperature) + kd_kl_from_logits(view_b, view_a, temperature)}
        total = hparams.weight * terms['kd']
        if features is not None:
            terms['mmd'] = linear_mmd(features[0::VIEWS], features[1::VIEWS])
            total = total + hparams.mmd_weight * terms['mmd']
        return total, terms

    def mixer(self, mixup) -> 'ViewsMix':
        return ViewsMix(mixup)


class ViewsMix:
    """Mixes a batch of view pairs in place, each view block (rows v::VIEWS) with one shared mix (`shared`) of
    timm's batch-form `mixup`; returns the rows' mixed targets (B, K)."""

    def __init__(self, mixup):
        self.shared = SharedMix(mixup, 'DDGSD\'s mix of view pairs')

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = self.shared([input[v::VIEWS] for v in range(VIEWS)], [target[v::VIEWS] for v in range(VIEWS)])
        out = soft[0].new_empty((input.shape[0], soft[0].shape[1]))
        for v in range(VIEWS):
            out[v::VIEWS] = soft[v]
        return out


@register_method('ddgsd', hparams=DDGSDHparams, paper='Xu & Liu, Data-Distortion Guided Self-Distillation for '
                                                      'Deep Neural Networks, AAAI 2019')
class DDGSDTask(SelfKDTask):
    """Make two independently augmented views of each image agree: ce on both + symmetric KL (+ MMD).

    Batches hold every image twice in a row (`ViewsBatchSampler`; `-b` counts both views), and timm's pipeline
    augments each copy on its own. With z_a, z_b the logits of the views (rows 0::2 and 1::2), the loss is
    `ce(z, y)` averaged over both views + `w * T^2 * (KL(sm(z_b/T) || sm(z_a/T)) + KL(sm(z_a/T) || sm(z_b/T)))`,
    each KL's target detached, + `w_mmd * ||mean f_a - mean f_b||^2` on pooled features when `mmd_weight > 0`
    (features from the same forward pass, `LogitsAndFeatures`).

    Mixup/CutMix (no source says, the paper has none; the natural extension, issue 15): the task mixes each batch
    itself (`ViewsLayout.mixer`, timm's parameters and draws) so that the two views of an image stay two views of one
    mixed image: with n images, the first views (rows 0::2) are mixed image i with image n-1-i, and the second
    views (rows 1::2) with the same partner image and the same lambda/box; both rows of image i get the target
    `lam y_i + (1 - lam) y_(n-1-i)` (smoothed), and the view terms compare the two views of that mixed image.
    `--mixup-mode batch`: one lambda/box for all images; 'pair'/'elem': one per image pair / image, both views
    getting it. Stacked on DLB, DLB's replayed mix does the mixing (`methods/stack.py`; batch mode only).

    DDGSD is also a batch layout that stacks on another method (`--selfkd ddgsd+dlb`, `methods/stack.py`): it
    expands that method's batches into views and adds its view terms to that method's loss (`ViewsLayout`, the
    hooks of `methods/layout.py`).
    """

    layout = ViewsLayout()

    def __init__(self, model, hparams: DDGSDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.mix: Optional[ViewsMix] = None

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(own_batches=True, mixup='task')

    def bind_run(self, run) -> None:
        super().bind_run(run)
        self.mix = self.layout.mixer(run.mixup) if run.mixup is not None else None

    def wrap_model(self, model):
        return LogitsAndFeatures(model) if self.hparams.mmd_weight > 0 else model

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        ViewsBatchSampler.check_batch_size(batch_size, VIEWS)

    def batch_sampler(self, *, index_sampler, batch_size, **_):
        return self.layout.wrap_batch_sampler(self.hparams, EpochBatchSampler(index_sampler, batch_size // VIEWS))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.mix is not None and self.training:
            target = self.mix(input, target)
        result = self.trainable_module(input)
        output, features = result if isinstance(result, tuple) else (result, None)
        loss_ce = self.cross_entropy(output, target)
        extra, terms = self.layout.terms(self.hparams, output, features)
        return {'loss': loss_ce + extra, 'output': output, 'loss_ce': loss_ce,
                **{f'loss_{name}': value for name, value in terms.items()}}
