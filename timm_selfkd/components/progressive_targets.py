"""PS-KD's progressive soft targets (Kim et al., ICCV 2021, sec. 3.2), one component for every method that trains on
them: `--selfkd pskd` and the PS-KD switch of `multi_exit` (Chottananurak et al., sec. 3.1, `y_soft`).

Example (inside a task's training `forward`):
    >>> info = self.batch_info(batch_size=input.shape[0])
    >>> soft = self.progressive.targets(target, info)   # (B, K) float32
    >>> input, soft = self.progressive.mix(input, soft)  # with mixup/CutMix (`RunInfo.mixup`), else as given
    >>> logits = self.trainable_module(input)
    >>> loss = soft_target_ce(logits, soft)
    >>> self.progressive.record(info, logits)
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from timm_selfkd.components.replayed_mixup import SharedMix
from timm_selfkd.components.soft_target_memory import SoftTargetMemory
from timm_selfkd.run_facts import BatchInfo, RunInfo

__all__ = ['ProgressiveTargets', 'RUN_FACTS', 'BCE_REFUSAL', 'alpha_schedule']

RUN_FACTS = {'num_epochs': 'alpha_t grows over the epochs of the run',
             'num_samples': 'its memory of past predictions has a row per training image'}  # for `Needs.run_facts`
# for `Needs.bce_refusal`: there is no hard-label term for timm's BCE to replace
BCE_REFUSAL = ("PS-KD's loss is one softmax cross-entropy on its progressive targets (1 - a_e) y + a_e P (P: past "
               'softmax predictions), with no hard-label term for BCE to replace')


def alpha_schedule(alpha_t: float, epoch: int, num_epochs: int) -> float:
    """a_e = alpha_T (e + 1) / E for the 0-based epoch e of E, at most alpha_T (in cool-down epochs past E)."""
    return alpha_t * min(epoch + 1, num_epochs) / num_epochs


class ProgressiveTargets:
    """`(1 - a_e) y + a_e P[i]`, P[i] the softmax the model gave image i when it was last trained on.

    An image never trained on yet (every image in epoch 0) has P[i] = its label, so epoch 0 trains on the
    labels; with label smoothing `y` is the smoothed label. P is a `memory.SoftTargetMemory` (fp16 or top-k,
    one copy per node, written under DDP by the all-gather protocol described there) built by `bind_run`.
    Protocol per training step, on every rank: `targets` (flushes the previous step's rows, reads this batch's)
    and `mix` before the loss, `record` after it.

    Mixup/CutMix (`RunInfo.mixup`, timm's parameters and draws in every --mixup-mode; PS-KD's paper
    reports PS-KD + CutMix, its official code, lgcnsai/PS-KD-Pytorch main.py, has no mixing, so this is the
    natural extension of that code, not a documented choice): `mix` mixes the batch as timm does, image i with
    image B-1-i under a lambda/box (one per batch, pair or image by the mode), and mixes the progressive
    targets of both images with the same lambda,
    `lam T_i + (1 - lam) T_(B-1-i)` with `T_j = (1 - a_e) y_j + a_e P[j]` (smoothed `y_j` with `--smoothing`).
    The memory stores, for row i, the softmax of the image the model trained on, i.e. of the mixed image, under
    image i's index: the official loop's `all_predictions[input_indices] = softmax(net(inputs))` with mixed
    `inputs`. Unmixed batches (past `--mixup-off-epoch`, or a draw that does not mix) store clean predictions.

    Args:
        alpha_t: alpha_T, the weight of the past prediction in the last epoch.
        topk: Probabilities kept per row (0 = all K).
        smoothing: Label smoothing of `y`.
        device: Device of the targets.
        name: The method's name in error messages (e.g. 'PS-KD').
        topk_flag: The command-line flag of `topk`, named when it is too large.
    """

    def __init__(self, alpha_t: float, topk: int, smoothing: float = 0., device: Optional[torch.device] = None, *,
                 name: str = 'PS-KD', topk_flag: str = '--pskd-topk'):
        self.alpha_t = alpha_t
        self.topk = topk
        self.smoothing = smoothing
        self.device = device
        self.name = name
        self.topk_flag = topk_flag
        self.num_epochs: Optional[int] = None
        self.memory: Optional[SoftTargetMemory] = None
        self.mixer: Optional[SharedMix] = None

    def bind_run(self, run: RunInfo) -> None:
        """Build the memory for the run's training set (collective under DDP: the table is shared per node).

        Raises:
            ValueError: A streamed data set (no sample indices), a model that does not tell its class count, or
                `topk` larger than the class count.
        """
        if run.num_samples is None:
            raise ValueError(f'{self.name} needs the dataset index of every training image, and a streamed data set '
                             '(wds/, hfids/, tfds/) has no known sample order; use a map-style data set')
        if not run.num_classes:
            raise ValueError(f'{self.name} needs the class count of the model for its memory of past predictions, '
                             'and this model does not tell it (no num_classes attribute)')
        if self.topk > run.num_classes:
            raise ValueError(f'{self.topk_flag} {self.topk} is larger than the class count ({run.num_classes})')
        self.num_epochs = run.num_epochs
        if run.mixup is not None:  # the criterion is then timm's soft-target one; the smoothing is mixup's
            self.mixer = SharedMix(run.mixup, f'{self.name}\'s mix of images and progressive targets')
            self.smoothing = float(run.mixup.label_smoothing)
        self.memory = SoftTargetMemory(run.num_samples, run.num_classes, self.topk, device=self.device,
                                       local_rank=run.local_rank, local_world_size=run.local_world_size)

    def _memory(self) -> SoftTargetMemory:
        if self.memory is None:
            raise RuntimeError(f'{self.name} builds its memory in bind_run(RunInfo(...)): call it first')
        return self.memory

    def alpha(self, epoch: int) -> float:
        """a_e of `alpha_schedule` for this run's epoch count."""
        self._memory()
        return alpha_schedule(self.alpha_t, epoch, self.num_epochs)

    def soft_targets(self, target: torch.Tensor, past: torch.Tensor, written: torch.Tensor,
                     epoch: int) -> torch.Tensor:
        """`(1 - a_e) y + a_e P`, with P = y for images never trained on; float32 (B, K)."""
        num_classes = past.shape[-1]
        label = F.one_hot(target, num_classes).float() * (1 - self.smoothing) + self.smoothing / num_classes
        past = torch.where(written[:, None], past, label)
        alpha = self.alpha(epoch)
        return (1 - alpha) * label + alpha * past

    def targets(self, target: torch.Tensor, info: BatchInfo) -> torch.Tensor:
        """The soft targets of the batch `info` describes (hard labels `target`); call once per training step."""
        memory = self._memory()
        memory.flush()
        past, written = memory.lookup(info.indices)
        return self.soft_targets(target, past, written, info.epoch)

    def mix(self, input: torch.Tensor, soft: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix the batch in place (image i with image B-1-i under a lambda/box) and its progressive targets `soft`
        with the same lambda; without mixup, both as given."""
        if self.mixer is None:
            return input, soft
        return input, self.mixer([input], [soft])[0]

    def record(self, info: BatchInfo, logits: torch.Tensor) -> None:
        """Store the batch's detached softmax as each sample's P (a collective under DDP; every step)."""
        self._memory().update(info.indices, logits.detach().float().softmax(dim=-1))

    def sync(self) -> None:
        """Before a checkpoint, on every rank: every recorded row reaches the table."""
        if self.memory is not None:
            self.memory.sync()

    def state_dict(self) -> Dict[str, Any]:
        """`{'memory': ...}` to merge into the task state ({} before `bind_run`)."""
        return {} if self.memory is None else {'memory': self.memory.state_dict()}

    def check_state(self, state: Optional[Dict[str, Any]]) -> None:
        """Raise a ValueError when the task state's memory does not fit this run."""
        if state and 'memory' in state and self.memory is not None:
            self.memory.check_state(state['memory'], f'{self.name} memory')

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Load the memory of a task state (collective under DDP); a state without one leaves the memory empty."""
        if not state or 'memory' not in state:
            return
        if self.memory is None:
            raise RuntimeError(f'{self.name} builds its memory in bind_run(RunInfo(...)): call it before loading '
                               'state')
        self.memory.load_state_dict(state['memory'])
