"""MrKD and MrKD-TC: memory-replay knowledge distillation from frozen copies of the model's own past
(Wang et al., Extending Label Smoothing Regularization with Self-Knowledge Distillation, sec. 3.4, eq. 13-17,
Alg. 1)."""
import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from timm.utils.model import unwrap_model

from timm_selfkd.components.losses import default_tc_gamma, kd_kl, known_label_smoothing, teacher_correction
from timm_selfkd.registry import hparam, hparam_flag, register_method
from timm_selfkd.components.weight_ring import WeightRing
from timm_selfkd.methods.base import Needs, RunInfo, SelfKDTask

__all__ = ['MrKDHparams', 'MrKDTCHparams', 'MrKDTask', 'MrKDTCTask', 'Interval']

_logger = logging.getLogger(__name__)

PAPER = 'Wang et al., Extending Label Smoothing Regularization with Self-Knowledge Distillation, 2020, sec. 3.4'


@dataclass(frozen=True)
class Interval:
    """kappa, the steps between two copy refreshes, given in steps (`2000`) or in epochs (`25e`, `2.5e`)."""
    value: float
    in_epochs: bool

    @classmethod
    def parse(cls, text: Any) -> 'Interval':
        """The interval a hyper-parameter's text gives; a ValueError completing '{method} interval ...' if none."""
        match = re.fullmatch(r'\s*(\d+(?:\.\d*)?|\.\d+)\s*(e?)\s*', str(text))
        if not match or (not match.group(2) and '.' in match.group(1)):
            raise ValueError(f'must be a whole number of steps (2000) or of epochs with an e (25e, 2.5e), got {text!r}')
        interval = cls(float(match.group(1)), bool(match.group(2)))
        if interval.value <= 0:
            raise ValueError(f'must be > 0, got {text!r}')
        return interval

    def steps(self, steps_per_epoch: Optional[int]) -> int:
        if not self.in_epochs:
            return int(self.value)
        if not steps_per_epoch:
            raise ValueError(f'mrkd interval {self.value:g}e is in epochs, which needs the steps per epoch '
                             '(RunInfo.steps_per_epoch); give it in steps instead')
        return max(1, round(self.value * steps_per_epoch))


@dataclass
class MrKDHparams:
    alpha: float = hparam(0.25, 'weight alpha of the KD term, 1 - alpha on cross-entropy (eq. 13; 0.1 on 10-class '
                                'sets)', within='[0, 1]')
    temperature: float = hparam(3.0, 'softening temperature tau (eq. 13)', within='(0, inf)')
    copies: int = hparam(3, 'n: frozen copies of the model, averaged in eq. 14 (paper presets n, kappa: 1, 25e; 3, '
                            '25e; 5, 2.5e)', within='[1, inf)')
    interval: str = hparam('25e', 'kappa: steps between copy refreshes, 2000 = steps, 25e or 2.5e = epochs',
                           check=Interval.parse)
    copy_mode: str = hparam('eval', 'mode the copies run in: eval (their saved BatchNorm statistics, no dropout) or '
                                    'train (batch statistics, dropout and drop path on; the paper does not say)',
                            choices=('eval', 'train'))
    batched: bool = hparam(False, 'forward all copies in one torch.func.vmap call instead of one call each (faster '
                                  'for small models on GPU, slower for convnets on CPU)')


@dataclass
class MrKDTCHparams(MrKDHparams):
    gamma: float = hparam(None, 'probability given to the true class in each copy\'s corrected distribution (eq. 16); '
                                'default 2.5 / K as LsrKD-TC (the paper compares the two at the same gamma, fig. 4; it '
                                'gives no MrKD-TC default): 0.025 for 100 classes, 0.25 for 10, 0.75 for 2',
                          within='[0, 1]', default_text='2.5/K')


@register_method('mrkd', hparams=MrKDHparams, paper=PAPER)
class MrKDTask(SelfKDTask):
    """Distil n frozen copies of the model taken every kappa steps along its own training trajectory.

    Loss `(1 - alpha) ce(z, y) + alpha * T^2 * (1/n) sum_i KL(softmax(z_i / T) || softmax(z / T))` (eq. 13-14),
    z_i the logits of copy theta_i (theta_1 newest). Alg. 1: at training step t (1-based), when t is a multiple of
    kappa, the copies shift (the oldest is dropped) and theta_1 := the current weights, before the step's
    forward. All copies start as the initial weights. Copies are taken at the start of a forward, after the
    previous synchronised optimizer step, and broadcast from rank 0 (BatchNorm statistics may differ between
    ranks), so they are identical on every rank. They live outside the trainable module (`snapshots.WeightRing`)
    and are saved in the task state with the step count.
    """

    @classmethod
    def requirements(cls, hparams) -> Needs:  # with mixup, the copies see the same mixed images as the student
        epochs = Interval.parse(hparams.interval).in_epochs
        return Needs(run_facts={'steps_per_epoch': f'its interval {hparams.interval} is in epochs'} if epochs else {})

    def __init__(self, model, hparams: MrKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.interval = Interval.parse(hparams.interval)
        self.interval_steps = None if self.interval.in_epochs else self.interval.steps(None)
        self.ring = WeightRing(model, hparams.copies, train_mode=hparams.copy_mode == 'train',
                               batched=hparams.batched)
        self.num_classes = getattr(model, 'num_classes', None)
        self.num_steps = 0  # training forwards so far: step t of Alg. 1 is num_steps + 1

    def bind_run(self, run: RunInfo) -> None:
        super().bind_run(run)
        self.interval_steps = self.interval.steps(run.steps_per_epoch)
        if run.num_epochs is None or run.steps_per_epoch is None:
            return
        total = run.num_epochs * run.steps_per_epoch
        name = self.method
        if self.interval_steps >= total:  # the paper's kappa = 200 epochs point: copies never refreshed
            _logger.warning(f'{name}: interval {self.hparams.interval} ({self.interval_steps} steps) is '
                            f'not shorter than the run ({total} steps): the copies stay the initial weights')
        elif self.interval_steps * self.hparams.copies > total:
            _logger.warning(f'{name}: {self.hparams.copies} copies x {self.interval_steps} steps exceed '
                            f'the run ({total} steps); the oldest copies stay the initial weights throughout')

    def _refresh_copies(self) -> None:
        model = unwrap_model(self.trainable_module)
        if not self.ring.filled:
            self.ring.fill(model)
        if (self.num_steps + 1) % self.interval_steps == 0:
            self.ring.push(model)

    def teacher_probs(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each copy's distribution at temperature T, shape (n, B, K) (`target`: for the TC variant)."""
        return (teacher_logits.float() / self.hparams.temperature).softmax(dim=-1)

    def kd_term(self, output: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """`T^2 * (1/n) sum_i KL(q_i || softmax(z / T))` (eq. 14 inside eq. 13)."""
        n = teacher_probs.shape[0]
        return kd_kl(output.repeat(n, 1), teacher_probs.flatten(0, 1), self.hparams.temperature)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.interval_steps is None:
            raise ValueError(f'{self.method} interval {self.hparams.interval} is in epochs: create the task with '
                             'steps_per_epoch=..., or give the interval in steps')
        if self.training:
            self._refresh_copies()
        elif not self.ring.filled:
            self.ring.fill(unwrap_model(self.trainable_module))
        teacher_logits = self.ring.forward_all(input)  # before the student: its activations are freed first
        output = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        loss_kd = self.kd_term(output, self.teacher_probs(teacher_logits, target))
        if self.training:
            self.num_steps += 1
        alpha = self.hparams.alpha
        return {
            'loss': (1 - alpha) * loss_ce + alpha * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }

    def get_task_state(self, module=None, ema: bool = False) -> Dict[str, Any]:
        if ema or not self.ring.filled:
            return {}
        return {'copies': self.ring.state_dict(), 'num_steps': self.num_steps, 'num_copies': self.ring.num_copies,
                'num_classes': self.num_classes}

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state or 'copies' not in state:
            return
        name = self.method
        if state['num_copies'] != self.ring.num_copies:
            raise ValueError(f'the checkpoint has {state["num_copies"]} {name} copies, this run asks '
                             f'for {self.ring.num_copies} ({hparam_flag(self.hparams.method, "copies")})')
        if state['num_classes'] != self.num_classes:
            raise ValueError(f'the checkpoint\'s {name} copies have {state["num_classes"]} classes, '
                             f'this model has {self.num_classes}')

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if ema or not state or 'copies' not in state:
            return
        self.check_task_state(state)
        self.ring.load_state_dict(state['copies'])
        self.num_steps = int(state['num_steps'])


@register_method('mrkd_tc', hparams=MrKDTCHparams, paper=PAPER + ' (TC extension, eq. 16-17)')
class MrKDTCTask(MrKDTask):
    """MrKD with Teacher Correction: each copy's true class gets gamma, the rest keep their proportions.

    Loss `(1 - alpha) ce(z, y) + alpha * T * (1/n) sum_i KL(q'_i || softmax(z / T))` (eq. 16-17): note T, not
    T^2, as in the paper's LsrKD family. Everything else is MrKD's.

    Mixup/CutMix (timm's, from the loader, `Needs(mixup='loader')` as MrKD): the copies see the mixed images, `ce`
    is timm's soft-target cross-entropy, and each copy's distribution is corrected to each of the (at most two)
    labels of the mix and the two corrections mixed lambda-weighted: `q'_i = sum_c w_c corrected(q_i, c)`, with
    `w = (t - off) / (on - off)` the mixed label's class weights (timm's label smoothing removed;
    `components.losses.mixed_label_weights`). The paper does not train with mixup: this is the natural
    extension, the same as LsrKD-TC's class teacher.
    """

    def __init__(self, model, hparams: MrKDTCHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        # timm's label smoothing, for mixed targets of 2 classes (which cannot tell it); None when not given
        self.label_smoothing = known_label_smoothing(self.criterion, kwargs.get('criterion_kwargs'))

    def teacher_probs(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gamma = self.hparams.gamma if self.hparams.gamma is not None else default_tc_gamma(teacher_logits.shape[-1])
        return teacher_correction(teacher_logits, target, gamma, self.hparams.temperature,
                                  smoothing=self.label_smoothing)

    def kd_term(self, output: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        return super().kd_term(output, teacher_probs) / self.hparams.temperature
