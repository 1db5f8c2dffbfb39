"""Self-Guidance: the full network teaches its stochastic-depth sub-networks (Zheng & Peng, WACV 2022,
sec. 3.2-3.3, eq. 3-5, Alg. 1)."""
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.registry import register_method
from timm_selfkd.components.stochastic_depth import (DepthUnit, add_stochastic_depth, check_rates, find_depth_units,
                                                     frozen_norm_stats, full_network, grad_checkpointing_modules,
                                                     sampled_subnetwork)
from timm_selfkd.methods.base import ModelWrapper, SelfKDTask, check_range

_logger = logging.getLogger(__name__)


@dataclass
class SelfGuidanceHparams:
    weight: float = field(default=0.25, metadata={'help': 'trade-off lambda of the distillation term (eq. 5)'})
    temperature: float = field(default=3.0, metadata={'help': 'softening temperature tau of the KL term (eq. 5)'})
    default_rate: float = field(default=0.5, metadata={
        'help': 'drop rate of the deepest block of the linear 0 -> rate schedule added when the model was built '
                'without stochastic depth (stochastic-depth paper: p_L = 0.5); a model\'s own rates are kept'})
    per_sample: bool = field(default=False, metadata={
        'help': 'drop branches per image as timm\'s DropPath does, instead of one sub-network per batch (Alg. 1)'})
    skip_dropped: bool = field(default=True, metadata={
        'help': 'do not compute the blocks dropped for the whole batch where the block\'s output is known '
                'without them (per-batch sampling)'})
    kl_to_teacher: bool = field(default=False, metadata={
        'help': 'let the KL term back-propagate into the teacher pass too (the paper does not say; default: '
                'the teacher is detached)'})
    student_bn_stats: bool = field(default=False, metadata={
        'help': 'let the student pass update BatchNorm running statistics too (default: only the full network, '
                'which is the deployed model, sets them)'})

    def __post_init__(self):
        check_range('self_guidance', 'weight', self.weight, 0.)
        check_range('self_guidance', 'temperature', self.temperature, 1e-6)
        try:
            check_rates(self.default_rate)
        except ValueError as e:
            raise ValueError(f'self_guidance default_rate: {e}') from None


class TeacherStudentPasses(ModelWrapper):
    """Both passes of one Self-Guidance step in one forward: the full network (all blocks on: the teacher,
    eq. 4) and then a random sub-network of the same weights (the student, eq. 3).

    Returns `(teacher_logits, student_logits)`, both with gradient. One forward of this module per step, so
    DDP sees every parameter's gradient once.

    Args:
        model: A timm model.
        units: Its stochastic-depth blocks (`timm_selfkd.components.stochastic_depth.find_depth_units`).
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
        super().__init__(model)
        self.units = units
        self.per_sample = per_sample
        self.skip_dropped = skip_dropped
        self.student_bn_stats = student_bn_stats
        self.last_keep: Optional[List[bool]] = None  # the blocks the last student pass kept (per-batch sampling)

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with full_network(self.units):
            teacher = self.model(input)
        norm_stats = nullcontext() if self.student_bn_stats else frozen_norm_stats(self.model)
        with sampled_subnetwork(self.units, per_sample=self.per_sample, skip=self.skip_dropped) as keep, norm_stats:
            student = self.model(input)
        self.last_keep = keep
        return teacher, student


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
class SelfGuidanceTask(SelfKDTask):
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
        units = find_depth_units(model)
        try:
            check_rates(*(dp.drop_prob for unit in units for dp in unit.drop_paths))
        except ValueError as e:
            raise ValueError(f'self_guidance: the model\'s {e}') from None
        if not units:
            units = add_stochastic_depth(model, hp.default_rate)
            if not units:
                raise ValueError(f'self_guidance needs stochastic depth, and model {type(model).__name__} has no '
                                 'DropPath layers or places for them (timm\'s drop_path_rate)')
            _logger.info(f'self_guidance: the model was built without stochastic depth; added DropPath to '
                         f'{len(units)} blocks, drop rates rising linearly from 0 to {hp.default_rate} '
                         '(--self-guidance-default-rate)')
        else:
            _logger.info(f'self_guidance: the model\'s own stochastic depth, {len(units)} blocks with drop rates '
                         f'{units[0].rate:.3f} to {units[-1].rate:.3f}')
        checkpointed = grad_checkpointing_modules(model)
        if checkpointed:
            raise ValueError(f'self_guidance cannot run with gradient checkpointing (on in {checkpointed[0]}): '
                             'its recomputation would not see the sampled sub-network')
        return TeacherStudentPasses(model, units, per_sample=hp.per_sample, skip_dropped=hp.skip_dropped,
                                    student_bn_stats=hp.student_bn_stats)

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the evaluation model only: the training passes stay eager, since the sampled sub-network (and
        with it the graph) changes every step."""
        _logger.info('self_guidance: --torchcompile compiles the evaluation model; the training passes run eagerly '
                     '(their sub-network changes every step)')
        self.eval_model = torch.compile(self.get_eval_model(), backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        teacher, student = self.trainable_module(input)
        out = self_guidance_loss(
            teacher, student, self.cross_entropy(teacher, target), self.cross_entropy(student, target),
            self.hparams.weight, self.hparams.temperature, kl_to_teacher=self.hparams.kl_to_teacher)
        out['output'] = teacher
        return out
