"""DLB: self-distillation from the last mini-batch (Shen et al., CVPR 2022, sec. 3.2, eq. 4-5, Alg. 1)."""
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.components.replayed_mixup import ReplayMixup
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.components.samplers import LastBatchSampler
from timm_selfkd.methods.base import Needs, SelfKDTask, world_size

_logger = logging.getLogger(__name__)


@dataclass
class DLBHparams:
    alpha: float = hparam(1.0, 'weight of the last-batch consistency loss L_LB (eq. 5)', within='[0, inf)')
    temperature: float = hparam(3.0, 'softening temperature tau of L_LB (eq. 4)', within='(0, inf)')


@register_method('dlb', hparams=DLBHparams, paper='Shen et al., Self-Distillation from the Last Mini-Batch '
                                                  'for Consistency Regularization, CVPR 2022')
class DLBTask(SelfKDTask):
    """Distil the logits each image got one step earlier, when it was in the previous batch's second half.

    With `LastBatchSampler` batches the first `n` images of batch t are the images whose float32 logits were
    kept from step t-1; the loss is `ce(z, y) + alpha * T^2 * KL(softmax(z_prev / T) || softmax(z[:n] / T))`
    (eq. 5), from one forward pass. With mixup/CutMix (sec. 4.3) the task mixes each batch itself
    (`ReplayMixup`): the repeated rows get exactly the mix they had one step earlier, the new rows a new one,
    so the kept logits describe the same mixed images. The kept logits (and the kept mix) are the only state.
    Each rank keeps its own; `sync_task_state` gathers them so that the checkpoint holds every rank's, and
    `--resume` with the same world size and batch size keeps the KD term from its first step (other state is
    dropped with a warning: no KD term until the next batch).
    """

    def __init__(self, model, hparams: DLBHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.last_logits: Optional[torch.Tensor] = None
        self.new_per_step: Optional[int] = None  # rows of a new half (batch_size // 2, from bind_run)
        self.mixer: Optional[ReplayMixup] = None
        self.gathered: Dict[str, torch.Tensor] = {}  # every rank's state on rank 0, by sync_task_state

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(own_batches=True, mixup='task',
                     run_facts={'batch_size': 'the rows of each step, half of which the next step repeats'})

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        LastBatchSampler.check_batch_size(batch_size)

    def batch_sampler(self, *, index_sampler, batch_size, **_):
        return LastBatchSampler(index_sampler, batch_size)

    def bind_run(self, run) -> None:
        super().bind_run(run)
        self.new_per_step = run.batch_size // 2  # in rows of the batch, whatever expands images into rows
        self.mixer = ReplayMixup(run.mixup) if run.mixup is not None else None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        repeated = self._repeated_rows(input.shape[0])
        # the next batch repeats this batch's new part: all but the repeated rows, or, at the start of a stream
        # (also a resume without state, whose first batch may begin with a short carried half), the last half
        new = input.shape[0] - repeated if repeated else (self.new_per_step or input.shape[0] // 2)
        if self.mixer is not None:
            input, target = self.mixer(input, target, split=input.shape[0] - new, replay=repeated > 0)
        output = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        if repeated and self.last_logits.shape[1] == output.shape[1]:
            loss_kd = kd_kl_from_logits(output[:repeated], self.last_logits, self.hparams.temperature)
        else:  # the first batch of a stream is two new halves: no teacher yet
            loss_kd = output.new_zeros((), dtype=torch.float32)
        self.last_logits = output[-new:].detach().to(torch.float32, copy=True)  # not a view of the batch
        return {
            'loss': loss_ce + self.hparams.alpha * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }

    def _repeated_rows(self, batch: int) -> int:
        """How many kept rows this batch starts with; 0 if none are kept or they cannot head it."""
        last = self.last_logits
        return last.shape[0] if last is not None and 0 < last.shape[0] < batch else 0

    def _local_state(self) -> Dict[str, torch.Tensor]:
        mix = self.mixer.state() if self.mixer is not None else None
        return {'last_logits': self.last_logits, **({'last_mix': mix.to(self.device)} if mix is not None else {})}

    def sync_task_state(self) -> None:
        """Gather every rank's kept logits (and mix) on rank 0 (on the CPU) for its checkpoint. All ranks run the
        same steps with equally sized batches and the same options, so their states have the same shapes."""
        if self.last_logits is None or world_size() == 1:
            return
        self.gathered = {}
        for name, tensor in self._local_state().items():
            parts = [torch.empty_like(tensor) for _ in range(world_size())] if dist.get_rank() == 0 else None
            dist.gather(tensor, parts, dst=0)
            if parts is not None:
                self.gathered[name] = torch.stack(parts).cpu()

    def get_task_state(self, module=None, ema: bool = False) -> Dict[str, Any]:
        if ema or self.last_logits is None:
            return {}
        state = self.gathered if world_size() > 1 else {k: v[None] for k, v in self._local_state().items()}
        return {**{k: v.cpu() for k, v in state.items()}, 'new_per_step': self.new_per_step} if state else {}

    def load_task_state(self, state, strict: bool = True, module=None, ema: bool = False) -> None:
        if ema:
            return
        logits = (state or {}).get('last_logits')
        self.last_logits = None
        if self.mixer is not None:
            self.mixer.load_state(None)
        if logits is None:
            return
        if logits.ndim != 3 or logits.shape[0] != world_size() or state.get('new_per_step') != self.new_per_step:
            _logger.warning(f'DLB: the saved last-batch logits {tuple(logits.shape)} (new images per step '
                            f'{state.get("new_per_step")}) do not fit {world_size()} process(es) with '
                            f'{self.new_per_step} new images per step; the KD term restarts with the next batch')
            return
        rank = dist.get_rank() if world_size() > 1 else 0
        self.last_logits = logits[rank].to(self.device, torch.float32)
        if self.mixer is not None:
            self.mixer.load_state(state['last_mix'][rank] if 'last_mix' in state else None)

