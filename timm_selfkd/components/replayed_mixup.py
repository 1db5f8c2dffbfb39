"""Mixup/CutMix that a method applies itself, block by block, and can replay on a later batch.

timm mixes a whole batch with one (lambda, box) and pairs image i with image B-1-i (`Mixup`, mode 'batch'),
or mixes in the collate function of the loader's workers. Neither can give DLB what it needs (Shen et al.,
CVPR 2022, sec. 4.3: "self-distillation on a batch of images distorted by the same CutMix operation"): the
repeated half of batch t must be mixed exactly as it was when it was the new half of batch t-1 (same partner,
box and lambda), so that the logits kept from step t-1 describe the same mixed images. `ReplayMixup` mixes a
batch as two blocks, each with timm's batch-mode parameters and pairing inside the block, keeps the last
block's parameters, and applies them again to the first block of the next batch. Mixup replays the same way.

It runs in the training process on the collated batch (after timm's prefetcher, if any), with NumPy's global
generator that the loop seeds every step, and its kept parameters are part of the owning task's state.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

__all__ = ['MixParams', 'ReplayMixup']

NO_BOX = (-1, -1, -1, -1)


@dataclass(frozen=True)
class MixParams:
    """One block's mix: lambda (already corrected for a clipped box), the CutMix box (yl, yh, xl, xh) or
    `NO_BOX` for mixup (or no mixing when lambda is 1), and the block's number of rows."""
    lam: float
    box: Tuple[int, int, int, int]
    rows: int

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.lam, *self.box, self.rows], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> 'MixParams':
        lam, *box, rows = values.tolist()
        return cls(lam, tuple(int(v) for v in box), int(rows))


class ReplayMixup:
    """timm's batch-mode Mixup/CutMix per block of a batch, the last block's mix kept for the next batch.

    Args:
        mixup: timm's `Mixup` (its alphas, probability, switch probability, CutMix min/max, lambda correction,
            label smoothing, class count and `mixup_enabled` are used; its mode must be 'batch').

    Example:
        >>> mixer = ReplayMixup(Mixup(cutmix_alpha=1.0, prob=0.5, num_classes=100))
        >>> x, y_soft = mixer(x, y, split=32, replay=True)  # rows :32 as the previous call's rows 32:
    """

    def __init__(self, mixup: Mixup):
        if mixup.mode != 'batch':
            raise ValueError(f'a replayed mix needs --mixup-mode batch (one lambda and box per block of the batch), '
                             f'got {mixup.mode!r}, which draws one per image')
        self.mixup = mixup
        self.kept: Optional[MixParams] = None

    def __call__(self, input: torch.Tensor, target: torch.Tensor, split: int, replay: bool):
        """Mix rows `[:split]` and `[split:]` of `input` in place, each with partners from its own block.

        Rows `[:split]` reuse the kept mix when `replay` is set and the kept block had `split` rows; otherwise
        both blocks get new parameters. The second block's parameters are kept for the next call.

        Returns:
            The mixed input and the mixed (soft, smoothed) targets, shape (B, num_classes).
        """
        kept = self.kept if replay and self.kept is not None and self.kept.rows == split else None
        head = kept or self.draw(input.shape, split)
        tail = self.draw(input.shape, input.shape[0] - split)
        targets = [self.apply(input[:split], target[:split], head), self.apply(input[split:], target[split:], tail)]
        self.kept = tail
        return input, torch.cat(targets)

    def draw(self, shape: torch.Size, rows: int) -> MixParams:
        """New parameters for a block of `rows` images, from timm's per-batch draw."""
        lam, use_cutmix = self.mixup._params_per_batch()
        box = NO_BOX
        if use_cutmix and lam != 1.:
            box, lam = cutmix_bbox_and_lam(shape, lam, ratio_minmax=self.mixup.cutmix_minmax,
                                           correct_lam=self.mixup.correct_lam)
        return MixParams(float(lam), tuple(int(v) for v in box), rows)

    def apply(self, block: torch.Tensor, target: torch.Tensor, mix: MixParams) -> torch.Tensor:
        """Mix `block` in place with its own flip (image i with image n-1-i); return its soft targets."""
        if mix.box != NO_BOX:
            top, bottom, left, right = mix.box
            block[:, :, top:bottom, left:right] = block.flip(0)[:, :, top:bottom, left:right]
        elif mix.lam != 1.:
            flipped = block.flip(0).mul_(1. - mix.lam)
            block.mul_(mix.lam).add_(flipped)
        return mixup_target(target, self.mixup.num_classes, mix.lam, self.mixup.label_smoothing)

    def state(self) -> Optional[torch.Tensor]:
        """The kept mix as a float64 tensor (lam, box, rows), or None."""
        return None if self.kept is None else self.kept.as_tensor()

    def load_state(self, values: Optional[torch.Tensor]) -> None:
        self.kept = None if values is None else MixParams.from_tensor(values)
