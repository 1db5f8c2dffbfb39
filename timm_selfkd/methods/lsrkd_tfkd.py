"""Hand-made class teachers: LsrKD and LsrKD-TC (Wang et al., sec. 3.2-3.3, eq. 9-12) and Tf-KD_reg (Yuan et al.).

One task, `LabelTeacherTask`, computes `(1 - alpha) ce(z, y) + alpha * s * KL(q_y || softmax(z / T))` for a
teacher `q_y` that puts `t` on the label and `(1 - t) / (K - 1)` on every other class. It is registered three
times; each preset's hyper-parameter dataclass says what `t`, the student temperature `T` and the KL scale `s`
are for K classes:

- `lsrkd`: uniform teacher (`t = 1/K`), `s = T` (eq. 10). Plain LSR (eq. 6: `T = 1`, no T factor) is timm's
  `--smoothing`, which every method's cross-entropy already takes.
- `lsrkd_tc`: Teacher Correction, `t = gamma` (eq. 11-12), `s = T`.
- `tfkd_reg`: Tf-KD_reg's virtual teacher as in its official code: `gamma` (0.99) on the label, softened by
  `softmax(q / T)` with a high T; the student at T = 1; the KL averaged over classes and scaled by a multiplier.

The teacher's two probabilities depend only on the class count: they are computed once per K, and the KL is
evaluated from them without building an (N, K) target (`timm_selfkd.components.losses.class_teacher_kl`).

With timm's mixup/CutMix (`Needs(mixup='loader')`: mixed images, soft targets `t` from `mixup_target`) the
teacher of a mixed image is built from its mixed label, lambda-weighted: `q = sum_c w_c q_c = other + (true -
other) w`, `w = (t - off) / (on - off)` the label's class weights with timm's label smoothing removed (lam on one
class, 1 - lam on the other; `components.losses.mixed_label_weights`). Neither paper trains with mixup: this is
the natural extension, and the uniform teacher of `lsrkd` is unchanged by it.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from timm_selfkd.components.losses import (class_teacher_kl, corrected_teacher, default_tc_gamma,
                                           known_label_smoothing)
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.methods.base import Needs, SelfKDTask

__all__ = ['LsrKDHparams', 'LsrKDTCHparams', 'TfKDRegHparams', 'LabelTeacherTask']

_LSRKD_PAPER = ('Wang et al., Extending Label Smoothing Regularization with Self-Knowledge Distillation, 2020')


class ClassTeacher:
    """What a preset of `LabelTeacherTask` defines: its teacher, student temperature and KL scale for K classes."""

    def teacher(self, num_classes: int) -> Tuple[float, float]:
        """(probability of the labelled class, probability of each other class); ValueError if unusable."""
        raise NotImplementedError

    def student_temperature(self) -> float:
        raise NotImplementedError

    def kl_scale(self, num_classes: int) -> float:
        raise NotImplementedError

    def corrected(self, num_classes: int) -> Tuple[float, float]:
        """Eq. 11 with this preset's gamma (`default_tc_gamma(K)` when None); a ValueError unless gamma > 1/K
        (1/K is the uniform teacher)."""
        gamma = self.gamma if self.gamma is not None else default_tc_gamma(num_classes)
        if gamma <= 1 / num_classes:
            raise ValueError(f'{self.method} gamma must be > 1/K = {1 / num_classes:.4g} for {num_classes} '
                             f'classes (1/K is the uniform teacher), got {gamma}')
        return corrected_teacher(num_classes, gamma)


@dataclass
class LsrKDHparams(ClassTeacher):
    alpha: float = hparam(0.1, 'weight alpha: (1 - alpha) ce + alpha * T * KL(teacher || softmax(z / T)) (eq. 10, 12; '
                               'sec. 4.3: 0.1)', within='[0, 1]')
    temperature: float = hparam(3.0, 'temperature tau of the student softmax and of the KL factor (eq. 10, 12; sec. '
                                     '4.3: 3)', within='(0, inf)')

    def teacher(self, num_classes: int) -> Tuple[float, float]:
        return corrected_teacher(num_classes, 1 / num_classes)

    def student_temperature(self) -> float:
        return self.temperature

    def kl_scale(self, num_classes: int) -> float:
        return self.temperature  # the paper's T, not Hinton's T^2 (end of sec. 3.2)


@dataclass
class LsrKDTCHparams(LsrKDHparams):
    gamma: float = hparam(None, 'teacher probability of the true class (eq. 11), in (1/K, 1); default 2.5 / K, the '
                                'paper\'s rule (0.025 for 100 classes, 0.25 for 10; 0.75 for 2)',
                          within='(0, 1)', default_text='2.5/K')

    def teacher(self, num_classes: int) -> Tuple[float, float]:
        return self.corrected(num_classes)


@dataclass
class TfKDRegHparams(ClassTeacher):
    alpha: float = hparam(0.1, 'weight alpha: (1 - alpha) ce + alpha * KL term (official code: 0.1 for ResNet-18 on '
                               'CIFAR-100)', within='[0, 1]')
    temperature: float = hparam(20.0, 'temperature T that softens the virtual teacher, softmax(q / T) as in the '
                                      'official code (20 for ResNet-18 on CIFAR-100, 40 for MobileNetV2/GoogLeNet); '
                                      'the student stays at T = 1', within='(0, inf)')
    gamma: float = hparam(0.99, 'virtual teacher probability of the true class before softening (the paper\'s 0.99)',
                          within='(0, 1)')
    multiplier: float = hparam(100.0, 'the official code averages the KL over classes and multiplies by this, i.e. KL '
                                      'x multiplier / K per image (100 for ResNet-18 on CIFAR-100, model-dependent; '
                                      'unverified for other settings)', within='[0, inf)')

    def teacher(self, num_classes: int) -> Tuple[float, float]:
        true_prob, other_prob = self.corrected(num_classes)
        # softmax(q / T) of a vector with two distinct values, in closed form
        other_weight = (num_classes - 1) * math.exp((other_prob - true_prob) / self.temperature)
        softened = 1 / (1 + other_weight)
        return softened, (1 - softened) / (num_classes - 1)

    def student_temperature(self) -> float:
        return 1.0

    def kl_scale(self, num_classes: int) -> float:
        return self.multiplier / num_classes


_SUMMARY = 'KD from a hand-made class teacher: '


@register_method('lsrkd', hparams=LsrKDHparams, paper=_LSRKD_PAPER + ', sec. 3.2, eq. 10',
                 summary=_SUMMARY + 'LSR extended to a temperature, (1 - alpha) ce + alpha T KL(u || sm(z/T)); '
                                    'plain LSR is timm\'s --smoothing')
@register_method('lsrkd_tc', hparams=LsrKDTCHparams, paper=_LSRKD_PAPER + ', sec. 3.3, eq. 11-12',
                 summary=_SUMMARY + 'LsrKD with Teacher Correction, gamma on the true class')
@register_method('tfkd_reg', hparams=TfKDRegHparams,
                 paper='Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization, CVPR 2020 '
                       '(Tf-KD_reg, official code\'s loss)',
                 summary=_SUMMARY + 'Tf-KD_reg\'s virtual teacher, 0.99 on the true class softened at a high T')
class LabelTeacherTask(SelfKDTask):
    """Distil a hand-made class teacher: `(1 - alpha) ce(z, y) + alpha * s * KL(q_y || softmax(z / T))`.

    The preset's dataclass (`LsrKDHparams`, `LsrKDTCHparams`, `TfKDRegHparams`) gives the teacher `q_y`, the
    student temperature T and the KL scale s for the model's class count; they are computed once (when the
    model tells its `num_classes`, else at the first step) and the KL needs no per-step target tensor.
    `loss_kd` is `s * KL`; `loss_ce` is timm's criterion (so `--smoothing` adds LSR on top: the recipes use 0).

    Mixup/CutMix (timm's, from the loader): `ce` is timm's soft-target cross-entropy on the mixed targets `t`, and
    the teacher of each mixed image is `sum_c w_c q_c = other + (true - other) w`, with `w = (t - off) / (on -
    off)` the mixed label's class weights (lam, 1 - lam; `off = s / K`, `on = 1 - s + off` for timm's label
    smoothing s, read from each row's minimum, or with 2 classes the `smoothing` the task was built with); the KL
    is to that per-row teacher. Neither paper says what to do with a mixed image: this is the natural extension
    (the lambda-weighted mixture of the two labels' teachers). Class labels take the closed form above, unchanged.
    """

    def __init__(self, model, hparams: ClassTeacher, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.num_classes: Optional[int] = None
        self.teacher_probs: Tuple[float, float] = (0., 0.)
        self.scale = 0.
        # timm's label smoothing, for mixed targets of 2 classes (which cannot tell it); None when not given
        self.label_smoothing = known_label_smoothing(self.criterion, kwargs.get('criterion_kwargs'))
        if isinstance(getattr(model, 'num_classes', None), int):
            self.set_num_classes(model.num_classes)

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(mixup='loader')  # a mixed image's teacher is its labels' teachers, lambda-weighted

    def bind_run(self, run) -> None:
        super().bind_run(run)
        if run.num_classes and run.num_classes != self.num_classes:
            self.set_num_classes(run.num_classes)

    def set_num_classes(self, num_classes: int) -> None:
        """Build the teacher for K classes (a ValueError if the preset's gamma does not fit K)."""
        self.teacher_probs = self.hparams.teacher(num_classes)
        self.scale = self.hparams.kl_scale(num_classes)
        self.num_classes = num_classes

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        if output.shape[-1] != self.num_classes:  # a model that did not tell its class count
            self.set_num_classes(output.shape[-1])
        loss_ce = self.cross_entropy(output, target)
        loss_kd = self.scale * class_teacher_kl(output, target, *self.teacher_probs,
                                                self.hparams.student_temperature(), smoothing=self.label_smoothing)
        alpha = self.hparams.alpha
        return {
            'loss': (1 - alpha) * loss_ce + alpha * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }
