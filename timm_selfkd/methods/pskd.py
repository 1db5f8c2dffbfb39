"""PS-KD: self-knowledge distillation with progressive refinement of targets (Kim et al., ICCV 2021; the PS-KD
component of Chottananurak et al., Progressive Self-Knowledge Distillation with Mutual Learning, sec. 3)."""
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from timm_selfkd.components.losses import soft_target_ce
from timm_selfkd.components.soft_target_memory import SoftTargetMemory
from timm_selfkd.components.progressive_targets import BCE_REFUSAL, RUN_FACTS, ProgressiveTargets
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.methods.base import Needs, RunInfo, SelfKDTask

__all__ = ['PSKDHparams', 'PSKDTask']


@dataclass
class PSKDHparams:
    alpha_t: float = hparam(0.8, 'alpha_T: weight of the past prediction at the last epoch; epoch e (0-based) of E '
                                 'uses alpha_T (e + 1) / E', within='[0, 1]')
    topk: int = hparam(0, 'keep the k largest probabilities of each past prediction, the rest spread evenly (0 = all '
                          'K, in fp16)', within='[0, inf)')


@register_method('pskd', hparams=PSKDHparams, paper='Kim et al., Self-Knowledge Distillation with Progressive '
                                                    'Refinement of Targets, ICCV 2021')
class PSKDTask(SelfKDTask):
    """Train on `(1 - a_e) y + a_e P[i]`, P[i] the softmax the model gave image i when it last trained on it.

    `a_e = alpha_T (e + 1) / E` grows linearly over the E epochs; an image never trained on yet (every image
    in epoch 0) has P[i] = its label, so epoch 0 trains on the labels. The loss is the cross-entropy with these
    soft targets (T = 1, no separate hard-label term); with `--smoothing`, `y` is the smoothed label. The
    targets and P (a per-sample memory built by `bind_run`, saved in the task state) are
    `components.progressive_targets.ProgressiveTargets`, shared with multi-exit's PS-KD switch; the dataset index
    of each image comes from `batch_info()`.

    Mixup/CutMix (the paper reports PS-KD + CutMix; its official code has none, so this extends that code, see
    `ProgressiveTargets`): the task mixes each batch itself (timm's parameters and draws, every --mixup-mode):
    image i with image B-1-i under a lambda/box, trained on `lam T_i + (1 - lam) T_(B-1-i)`, the
    progressive targets of both images lambda-weighted; P[i] then stores the softmax of the mixed image trained
    on in row i (what the official loop's update stores for the inputs it trained on).
    """

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(sample_indices=True, mixup='task', run_facts=RUN_FACTS, bce_refusal=BCE_REFUSAL)

    def __init__(self, model, hparams: PSKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.progressive = ProgressiveTargets(hparams.alpha_t, hparams.topk,
                                              float(getattr(self.criterion, 'smoothing', 0.)), self.device)

    @property
    def memory(self) -> Optional[SoftTargetMemory]:
        """P, the per-sample memory (None before `bind_run`)."""
        return self.progressive.memory

    def bind_run(self, run: RunInfo) -> None:
        super().bind_run(run)
        self.progressive.bind_run(run)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.training:
            output = self.trainable_module(input)
            loss = self.cross_entropy(output, target)
            return {'loss': loss, 'output': output, 'loss_ce': loss}
        info = self.batch_info(batch_size=input.shape[0])
        soft = self.progressive.targets(target, info)
        input, soft = self.progressive.mix(input, soft)
        output = self.trainable_module(input)
        loss = soft_target_ce(output, soft)
        self.progressive.record(info, output)
        return {'loss': loss, 'output': output, 'loss_ce': loss}

    def sync_task_state(self) -> None:
        self.progressive.sync()

    def get_task_state(self, module=None, ema: bool = False) -> Dict[str, Any]:
        return {} if ema else self.progressive.state_dict()

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        self.progressive.check_state(state)

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if not ema:
            self.progressive.load_state_dict(state)
