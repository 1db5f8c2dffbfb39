"""DKS: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019; official code sundw2014/DKS, wrn_DKS/).

Deep auxiliary branches, each a fresh copy of the model's remaining stages, norm and head
(`components.deep_branch`), sit after intermediate stages as deep exits of the multi-exit machinery
(`timm_selfkd.methods.multi_exit`); every classifier is trained on the labels and on the detached class
probabilities of every other classifier (the synergy loss, sec. 3).
"""
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

from timm_selfkd.components.deep_branch import deep_branches
from timm_selfkd.components.feature_levels import model_name, parse_levels
from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.components.training_parts import training_only_parameters
from timm_selfkd.methods.base import Needs
from timm_selfkd.methods.multi_exit import ExitsTask, MultiExitModule, exit_indices
from timm_selfkd.registry import hparam, register_method

__all__ = ['DKSHparams', 'DKSTask', 'synergy_loss', 'dks_loss']

_logger = logging.getLogger(__name__)

DEFAULT_BRANCHES = 2  # the official code: branches after the first and the second of WRN's three groups


@dataclass
class DKSHparams:
    branch_weight: float = hparam(1.0, 'weight beta of each auxiliary branch\'s cross-entropy to the labels (official '
                                       'code: 1; the model\'s own classifier\'s cross-entropy always weighs 1)',
                                  within='[0, inf)')
    synergy_weight: float = hparam(1.0, 'weight of the synergy loss, the sum of KL(P_n || P_m) over every ordered pair '
                                        'of classifiers m != n with P_n detached (official code: 1, each pair weighted '
                                        '1)', within='[0, inf)')
    temperature: float = hparam(1.0, 'softmax temperature of the synergy KL, which is scaled by T^2 (official code: 1, '
                                     'plain softmax)', within='(0, inf)')
    indices: str = hparam('', 'forward_intermediates() levels after which a deep branch (a fresh copy of the rest of '
                              'the model) starts, comma-separated; default: the ends of the two stages before the last '
                              '(ResNet: layer2 and layer3; the official WRN code: after its first and second of three '
                              'groups), ViT-like models: the blocks at 1/3 and 2/3 of the depth', check=parse_levels)


def synergy_loss(classifier_logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """DKS's synergy loss: `sum_{m != n} T^2 KL(P_n || P_m)` over every ordered pair of classifiers.

    `P_k = softmax(z_k / T)`; in each term the target side `P_n` is detached (the official code's
    `KL_divergence(o2.detach(), o)` for every `o` and every other `o2`), so every classifier learns from every
    other one, in both directions (top-down and bottom-up). Each KL is summed over classes and averaged over the
    batch, in float32 (`kd_kl_from_logits`).
    """
    if len(classifier_logits) < 2:
        raise ValueError('the synergy loss needs at least two classifiers')
    return torch.stack([kd_kl_from_logits(student, teacher, temperature)
                        for m, student in enumerate(classifier_logits)
                        for n, teacher in enumerate(classifier_logits) if m != n]).sum()


def dks_loss(
        logits: torch.Tensor,
        branch_logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        hparams: DKSHparams,
) -> Dict[str, torch.Tensor]:
    """`L = CE(z_N, y) + beta sum_i CE(z_i, y) + lambda sum_{m != n} T^2 KL(P_n || P_m)` for branches i = 1..N-1 and
    the model's own classifier N (official code: beta = lambda = T = 1).

    `target` is the labels or mixup's soft targets; `cross_entropy` is the task's criterion (float32). Logged
    terms are unweighted: `loss_ce` (the model's classifier), `loss_branch_ce` (summed over the branches),
    `loss_synergy` (summed over the N (N - 1) ordered pairs).
    """
    loss_ce = cross_entropy(logits, target)
    branch_ce = torch.stack([cross_entropy(z, target) for z in branch_logits]).sum()
    synergy = synergy_loss([*branch_logits, logits], hparams.temperature)
    loss = loss_ce + hparams.branch_weight * branch_ce + hparams.synergy_weight * synergy
    return {'loss': loss, 'loss_ce': loss_ce, 'loss_branch_ce': branch_ce, 'loss_synergy': synergy}


@register_method('dks', hparams=DKSHparams, paper='Sun et al., Deeply-supervised Knowledge Synergy, CVPR 2019')
class DKSTask(ExitsTask):
    """Deep auxiliary branches (fresh copies of the remaining stages) learn from the labels and, with the model's
    classifier, from each other's detached class probabilities in every direction (pairwise KL synergy).

    The paper's objective (sec. 3): the deeply-supervised loss `L_c(W_c) + sum_i beta_i L_a(W_a_i)` (the
    cross-entropy of the model's classifier and of every auxiliary classifier) plus the synergy loss
    `L_s = sum_{(m, n) in A} alpha_mn H(P_m, P_n)` over the set A of classifier pairs, matched densely in both
    directions, each `P_m` acting as a fixed soft label. Its numbers come from the official code
    (wrn_DKS/main.py): every CE and every KL weighs 1, plain softmax (T = 1), all N (N - 1) ordered pairs, the
    target side detached; `dks_loss`. Deliberate differences, all documented in the tests:

    - The synergy term is the code's KL, not the paper's cross-entropy H: they differ by the entropy of the
      detached target, a constant for the gradient. We compute the exact KL from log-softmax; the code smooths
      both softmaxes, `(p + 1e-8) / (1 + K 1e-8)`, before its logarithm. A class to which the teacher gives p and
      the student q adds about `p log(1 + 1e-8 / q)` more to ours, and its gradient into the student's logit is
      `q - p` here against about `-p q / (q + 1e-8)` in the code: a relative ~1e-8 / q apart, negligible while
      q >> 1e-8 (1e-6 at q = 1e-2; at q = 3.1e-7 the KL terms are 0.016 and the gradients 3% apart). Below
      q = 1e-8 the code's term saturates near `p log(p / 1e-8)` and stops pulling q up; ours does not: teacher
      (1/2, 1/2) and the student's second class at 1.4e-11 (a logit gap of 25) give KL 11.81 here, 8.52 in the
      code, and a gradient of -0.5 into that logit here, -6.9e-4 there (tests/test_dks.py).
    - Branches: a fresh, independently initialised copy of all the model's stages after the level, its norm and
      head (`components.deep_branch.DeepBranch`), after the ends of the two stages before the last by default (as
      the code's branches on WRN-28-10, after its first and second of three groups). The code's WRN branches are
      hand-built variants (the first branch's last group has half the blocks, the second branch's group twice the
      width); a copy of the model's own stages is the model-agnostic construction.

    With mixup/CutMix (the paper and code have none) every cross-entropy takes the mixed soft targets through the
    criterion, and the synergy matches the classifiers' predictions on the mixed image; with --bce-loss the
    criterion replaces every cross-entropy, and the synergy stays a softmax KL between classifiers.

    The branches are training-only: the checkpoint's `state_dict` is the plain timm model; they are saved and
    resumed as task state (EMA-averaged with `--model-ema`), and validation reports each branch's top-1 and the
    ensemble's (`MultiExitEvaluator`), as the official code logs its branches' test accuracies.
    """

    @classmethod
    def requirements(cls, hparams: DKSHparams) -> Needs:
        return Needs()  # timm's batches; mixed batches welcome; --bce-loss replaces every cross-entropy

    def wrap_model(self, model: nn.Module) -> MultiExitModule:
        indices = exit_indices(model, self.hparams.indices, method='dks', default_exits=DEFAULT_BRANCHES)
        name = model_name(model)
        if not getattr(model, 'num_classes', 0):
            raise ValueError(f'dks needs a model with a classifier, and {name} has none')
        branches = nn.ModuleList(deep_branches(model, indices, 'dks'))
        _logger.info(f'dks: deep branches after forward_intermediates() levels {indices} of {name} '
                     f'({", ".join(b.module_name for b in branches)}; {training_only_parameters(branches)})')
        return MultiExitModule(model, indices, branches)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, _, branch_logits, _ = self.trainable_module(input)
        out = dks_loss(logits, branch_logits, target, self.cross_entropy, self.hparams)
        out['output'] = logits
        return out
