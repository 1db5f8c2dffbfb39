"""Self-Guidance: the full network teaches its stochastic-depth sub-networks (Zheng & Peng, WACV 2022,
sec. 3.2-3.3, eq. 3-5, Alg. 1)."""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.components.stochastic_depth import (DepthUnit, prepare_depth_units,
                                                     refuse_grad_checkpointing, subnetwork_pass)
from timm_selfkd.methods.base import ModelWrapper, SelfKDTask

_logger = logging.getLogger(__name__)


@dataclass
class SelfGuidanceHparams:
    weight: float = hparam(0.25, 'trade-off lambda of the distillation term (eq. 5)', within='[0, inf)')
    temperature: float = hparam(3.0, 'softening temperature tau of the KL term (eq. 5)', within='(0, inf)')
    default_rate: float = hparam(0.5, 'drop rate of the deepest block of the linear 0 -> rate schedule added when the '
                                      'model was built without stochastic depth (stochastic-depth paper: p_L = 0.5); a '
                                      'model\'s own rates are kept', within='[0, 1)')
    per_sample: bool = hparam(False, 'drop branches per image as timm\'s DropPath does, instead of one sub-network per '
                                     'batch (Alg. 1)')
    skip_dropped: bool = hparam(True, 'do not compute the blocks dropped for the whole batch where the block\'s output '
                                      'is known without them (per-batch sampling)')
    kl_to_teacher: bool = hparam(False, 'let the KL term back-propagate into the teacher pass too (the paper does not '
                                        'say; default: the teacher is detached)')
    student_bn_stats: bool = hparam(False, 'let the student pass update BatchNorm running statistics too (default: '
                                           'only the full network, which is the deployed model, sets them)')


class SubnetworkPasses(ModelWrapper):
    """Passes of one model's weights over the same images, in one forward: each the full network (every block on)
    or a sampled sub-network (`timm_selfkd.components.stochastic_depth.subnetwork_pass`). Shared by the methods
    that train sub-networks (Self-Guidance: full + sampled; R-Drop: sampled + sampled).

    Returns the passes' logits as a tuple, all with gradient. One forward of this module per step, so DDP sees
    every parameter's gradient once.

    Args:
        model: A timm model.
        units: Its stochastic-depth blocks (`find_depth_units`/`prepare_depth_units`; may be empty for passes whose
            only randomness is dropout).
        full: Per pass, whether it runs the full network (else a sampled sub-network).
        norm_stats: Per pass, whether it updates BatchNorm running statistics.
        per_sample: Sample the sub-networks per image (timm's DropPath) instead of one per batch.
        skip_dropped: Do not compute blocks dropped for the whole batch where that is exact.
    """

    def __init__(
            self,
            model: nn.Module,
            units: List[DepthUnit],
            full: Sequence[bool],
            norm_stats: Sequence[bool],
            per_sample: bool = False,
            skip_dropped: bool = True,
    ):
        super().__init__(model)
        if len(full) != len(norm_stats):
            raise ValueError('one full/sampled choice and one norm-statistics choice per pass')
        self.units = units
        self.full = tuple(full)
        self.norm_stats = tuple(norm_stats)
        self.per_sample = per_sample
        self.skip_dropped = skip_dropped
        self.last_keeps: List[Optional[List[bool]]] = []  # per pass, the blocks the last step kept (per batch)

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs, keeps = [], []
        for full, norm_stats in zip(self.full, self.norm_stats):
            with subnetwork_pass(self.model, self.units, full=full, per_sample=self.per_sample,
                                 skip=self.skip_dropped, norm_stats=norm_stats) as keep:
                outputs.append(self.model(input))
            keeps.append(keep)
        self.last_keeps = keeps
        return tuple(outputs)


class TeacherStudentPasses(SubnetworkPasses):
    """Both passes of one Self-Guidance step: the full network (all blocks on: the teacher, eq. 4) and then a
    random sub-network of the same weights (the student, eq. 3). Returns `(teacher_logits, student_logits)`.

    Args:
        model: A timm model.
        units: Its stochastic-depth blocks.
        per_sample: timm's per-image dropping instead of one sub-network per batch.
        skip_dropped: Do not compute blocks dropped for the whole batch where that is exact.
        student_bn_stats: Let the student pass update BatchNorm running statistics.
    """

    def __init__(
            self,
            model: nn.Module,
            units: List[DepthUnit],
            per_sample: bool = False,
            skip_dropped: bool = True,
            student_bn_stats: bool = False,
    ):
        super().__init__(model, units, full=(True, False), norm_stats=(True, student_bn_stats),
                         per_sample=per_sample, skip_dropped=skip_dropped)
        self.student_bn_stats = student_bn_stats

    @property
    def last_keep(self) -> Optional[List[bool]]:
        """The blocks the last student pass kept (per-batch sampling; None per sample or before the first step)."""
        return self.last_keeps[1] if self.last_keeps else None


class SubnetworkTask(SelfKDTask):
    """Base of the methods whose trainable module runs sampled sub-networks (`SubnetworkPasses`)."""

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the evaluation model only: the training passes stay eager, since the sampled sub-network (and
        with it the graph) changes every step."""
        _logger.info(f'{self.method}: --torchcompile compiles the evaluation model; the training passes run eagerly '
                     '(their sub-network changes every step)')
        self.eval_model = torch.compile(self.get_eval_model(), backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model


def self_guidance_loss(
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        ce_teacher: torch.Tensor,
        ce_student: torch.Tensor,
        weight: float,
        temperature: float,
        kl_to_teacher: bool = False,
) -> Dict[str, torch.Tensor]:
    """Eq. 5: `ce(z_S, y) + ce(z_T, y) + lambda * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))`.

    Returns the total `loss` and the terms `loss_ce` (teacher), `loss_ce_student` and `loss_kd` (T^2 KL).
    """
    loss_kd = kd_kl_from_logits(student_logits, teacher_logits, temperature, detach_teacher=not kl_to_teacher)
    return {
        'loss': ce_student + ce_teacher + weight * loss_kd,
        'loss_ce': ce_teacher,
        'loss_ce_student': ce_student,
        'loss_kd': loss_kd,
    }


@register_method('self_guidance', hparams=SelfGuidanceHparams, paper='Zheng and Peng, Self-Guidance: Improve Deep '
                                                                    'Neural Network Generalization via Knowledge '
                                                                    'Distillation, WACV 2022')
class SelfGuidanceTask(SubnetworkTask):
    """Train the full network and a stochastic-depth sub-network of it together; the full network teaches.

    Each step runs the full network (the teacher and deployed model) and one sampled sub-network (the
    student) on the same images; both get their cross-entropy, the student also `lambda * T^2 * KL` to the
    teacher (eq. 5). Stochastic depth is the model's own (timm's DropPath layers and rate schedule); a model
    built without it gets a linear 0 -> `default_rate` schedule, inserted once (no parameters, so checkpoints
    stay plain timm checkpoints). A model with no place for stochastic depth is refused, as is timm's gradient
    checkpointing (its recomputation would run outside the pass that chose the sub-network).
    """

    def wrap_model(self, model: nn.Module) -> TeacherStudentPasses:
        hp = self.hparams
        units = prepare_depth_units(model, 'self_guidance', hp.default_rate, '--self-guidance-default-rate')
        refuse_grad_checkpointing(model, 'self_guidance')
        return TeacherStudentPasses(model, units, per_sample=hp.per_sample, skip_dropped=hp.skip_dropped,
                                    student_bn_stats=hp.student_bn_stats)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        teacher, student = self.trainable_module(input)
        out = self_guidance_loss(
            teacher, student, self.cross_entropy(teacher, target), self.cross_entropy(student, target),
            self.hparams.weight, self.hparams.temperature, kl_to_teacher=self.hparams.kl_to_teacher)
        out['output'] = teacher
        return out
