"""PS-KD: self-knowledge distillation with progressive refinement of targets (Kim et al., ICCV 2021; the PS-KD
component of Chottananurak et al., Progressive Self-Knowledge Distillation with Mutual Learning, sec. 3)."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..losses import soft_target_ce
from ..memory import SoftTargetMemory
from ..registry import register_method
from .base import RunInfo, SelfKDTask, check_range

__all__ = ['PSKDHparams', 'PSKDTask']


@dataclass
class PSKDHparams:
    alpha_t: float = field(default=0.8, metadata={'help': 'alpha_T: weight of the past prediction at the last epoch; '
                                                          'epoch e (0-based) of E uses alpha_T (e + 1) / E'})
    topk: int = field(default=0, metadata={'help': 'keep the k largest probabilities of each past prediction, the '
                                                   'rest spread evenly (0 = all K, in fp16)'})

    def __post_init__(self):
        check_range('pskd', 'alpha_t', self.alpha_t, 0., 1.)
        check_range('pskd', 'topk', self.topk, 0)


@register_method('pskd', hparams=PSKDHparams, paper='Kim et al., Self-Knowledge Distillation with Progressive '
                                                    'Refinement of Targets, ICCV 2021')
class PSKDTask(SelfKDTask):
    """Train on `(1 - a_e) y + a_e P[i]`, P[i] the softmax the model gave image i when it last trained on it.

    `a_e = alpha_T (e + 1) / E` grows linearly over the E epochs; an image never trained on yet (every image
    in epoch 0) has P[i] = its label, so epoch 0 trains on the labels. The loss is the cross-entropy with these
    soft targets (T = 1, no separate hard-label term); with `--smoothing`, `y` is the smoothed label. P is a
    `memory.SoftTargetMemory` (fp16 or top-k, one copy per node, written under DDP by the all-gather
    protocol described there), created by `bind_run` and saved in the task state; the dataset index of each
    image comes from `batch_info()`.
    """

    needs_batch_info = True
    mixup_conflict = 'a mixed image is not the sample whose past prediction its target uses'

    def __init__(self, model, hparams: PSKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.smoothing = float(getattr(self.criterion, 'smoothing', 0.))
        self.memory: Optional[SoftTargetMemory] = None

    def bind_run(self, run: RunInfo) -> None:
        super().bind_run(run)
        if run.num_samples is None:
            raise ValueError('PS-KD needs the dataset index of every training image, and a streamed data set '
                             '(wds/, hfids/, tfds/) has no known sample order; use a map-style data set')
        if self.hparams.topk > run.num_classes:
            raise ValueError(f'--pskd-topk {self.hparams.topk} is larger than the class count ({run.num_classes})')
        self.memory = SoftTargetMemory(run.num_samples, run.num_classes, self.hparams.topk, device=self.device,
                                       local_rank=run.local_rank, local_world_size=run.local_world_size)

    def alpha(self, epoch: int) -> float:
        """a_e = alpha_T (e + 1) / E, at most alpha_T (in cool-down epochs past E)."""
        return self.hparams.alpha_t * min(epoch + 1, self.run.num_epochs) / self.run.num_epochs

    def soft_targets(self, target: torch.Tensor, past: torch.Tensor, written: torch.Tensor,
                     epoch: int) -> torch.Tensor:
        """`(1 - a_e) y + a_e P`, with P = y for images never trained on; float32 (B, K)."""
        num_classes = past.shape[-1]
        label = F.one_hot(target, num_classes).float() * (1 - self.smoothing) + self.smoothing / num_classes
        past = torch.where(written[:, None], past, label)
        alpha = self.alpha(epoch)
        return (1 - alpha) * label + alpha * past

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.training:
            output = self.trainable_module(input)
            loss = self.cross_entropy(output, target)
            return {'loss': loss, 'output': output, 'loss_ce': loss}
        if self.memory is None:
            raise RuntimeError('PS-KD builds its memory in bind_run(RunInfo(...)): call it first')
        info = self.batch_info(batch_size=input.shape[0])
        self.memory.flush()
        past, written = self.memory.lookup(info.indices)
        output = self.trainable_module(input)
        loss = soft_target_ce(output, self.soft_targets(target, past, written, info.epoch))
        self.memory.update(info.indices, output.detach().float().softmax(dim=-1))
        return {'loss': loss, 'output': output, 'loss_ce': loss}

    def sync_task_state(self) -> None:
        if self.memory is not None:
            self.memory.sync()

    def get_task_state(self, module=None, ema: bool = False) -> Dict[str, Any]:
        if ema or self.memory is None:
            return {}
        return {'memory': self.memory.state_dict()}

    def check_task_state(self, state: Optional[Dict[str, Any]]) -> None:
        if state and 'memory' in state and self.memory is not None:
            self.memory.check_state(state['memory'], 'PS-KD memory')

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if ema or not state or 'memory' not in state:
            return
        if self.memory is None:
            raise RuntimeError('PS-KD builds its memory in bind_run(RunInfo(...)): call it before loading state')
        self.memory.load_state_dict(state['memory'])
