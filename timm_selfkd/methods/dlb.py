"""DLB: self-distillation from the last mini-batch (Shen et al., CVPR 2022, sec. 3.2, eq. 4-5, Alg. 1)."""
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..losses import kd_kl_from_logits
from ..registry import register_method
from ..samplers import LastBatchSampler
from .base import SelfKDTask, check_range, world_size

_logger = logging.getLogger(__name__)


@dataclass
class DLBHparams:
    alpha: float = field(default=1.0, metadata={'help': 'weight of the last-batch consistency loss L_LB (eq. 5)'})
    temperature: float = field(default=3.0, metadata={'help': 'softening temperature tau of L_LB (eq. 4)'})

    def __post_init__(self):
        check_range('dlb', 'alpha', self.alpha, 0.)
        check_range('dlb', 'temperature', self.temperature, 1e-6)


@register_method('dlb', hparams=DLBHparams, paper='Shen et al., Self-Distillation from the Last Mini-Batch '
                                                  'for Consistency Regularization, CVPR 2022')
class DLBTask(SelfKDTask):
    """Distil the logits each image got one step earlier, when it was in the previous batch's second half.

    With `LastBatchSampler` batches (`bind_batch_sampler` tells the task their half size), the first `n`
    images of batch t are the images whose float32 logits were kept from step t-1; the loss is
    `ce(z, y) + alpha * T^2 * KL(softmax(z_prev / T) || softmax(z[:n] / T))` (eq. 5), from one forward pass.
    The kept logits are the only state. Each rank keeps its own; `sync_task_state` gathers them so that the
    checkpoint holds every rank's, and `--resume` with the same world size and batch size keeps the KD term
    from its first step (other state is dropped with a warning: no KD term until the next batch).
    """

    mixup_conflict = ('a repeated image is mixed with a different partner than one step earlier, '
                      'so the kept logits would describe another image')

    def __init__(self, model, hparams: DLBHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.last_logits: Optional[torch.Tensor] = None
        self.new_per_step: Optional[int] = None  # batch_size // 2, from the sampler; else half of each batch
        self.gathered_logits: Optional[torch.Tensor] = None  # (world, n, K) on rank 0, by sync_task_state

    @classmethod
    def check_setup(cls, hparams, *, batch_size, mixup):
        super().check_setup(hparams, batch_size=batch_size, mixup=mixup)
        LastBatchSampler.check_batch_size(batch_size)

    @classmethod
    def batch_sampler(cls, hparams, *, index_sampler, batch_size, **_):
        return LastBatchSampler(index_sampler, batch_size)

    def bind_batch_sampler(self, batch_sampler: LastBatchSampler) -> None:
        self.new_per_step = batch_sampler.half

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        repeated = self._repeated_rows(*output.shape)
        if repeated:
            loss_kd = kd_kl_from_logits(output[:repeated], self.last_logits, self.hparams.temperature)
        else:  # the first batch of a stream is two new halves: no teacher yet
            loss_kd = output.new_zeros((), dtype=torch.float32)
        # the next batch repeats this batch's new part: all but the repeated rows, or, at the start of a stream
        # (also a resume without state, whose first batch may begin with a short carried half), the last half
        new = input.shape[0] - repeated if repeated else (self.new_per_step or input.shape[0] // 2)
        self.last_logits = output[-new:].detach().to(torch.float32, copy=True)  # not a view of the batch
        return {
            'loss': loss_ce + self.hparams.alpha * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }

    def _repeated_rows(self, batch: int, num_classes: int) -> int:
        """How many kept rows this batch starts with; 0 if none are kept or they cannot belong to it."""
        last = self.last_logits
        if last is None or last.shape[1] != num_classes or not 0 < last.shape[0] < batch:
            return 0
        return last.shape[0]

    def sync_task_state(self) -> None:
        """Gather every rank's kept logits on rank 0 (on the CPU) for its checkpoint. All ranks run the same
        steps with equally sized batches, so all have kept logits of the same shape."""
        if self.last_logits is None or world_size() == 1:
            return
        parts = [torch.empty_like(self.last_logits) for _ in range(world_size())] if dist.get_rank() == 0 else None
        dist.gather(self.last_logits, parts, dst=0)
        self.gathered_logits = torch.stack(parts).cpu() if parts is not None else None

    def get_task_state(self, module=None, ema: bool = False) -> Dict[str, Any]:
        if ema or self.last_logits is None:
            return {}
        logits = self.gathered_logits if world_size() > 1 else self.last_logits[None]
        return {} if logits is None else {'last_logits': logits.cpu(), 'new_per_step': self.new_per_step}

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if ema:
            return
        logits = (state or {}).get('last_logits')
        self.last_logits = None
        if logits is None:
            return
        if logits.ndim != 3 or logits.shape[0] != world_size() or state.get('new_per_step') != self.new_per_step:
            _logger.warning(f'DLB: the saved last-batch logits {tuple(logits.shape)} (new images per step '
                            f'{state.get("new_per_step")}) do not fit {world_size()} process(es) with '
                            f'{self.new_per_step} new images per step; the KD term restarts with the next batch')
            return
        self.last_logits = logits[dist.get_rank() if world_size() > 1 else 0].to(self.device, torch.float32)

