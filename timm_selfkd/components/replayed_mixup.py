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

`SharedMix` is the other use of the same parts: one draw of timm's parameters applied alike to several equally
sized blocks of a batch ("mix this block with these parameters, and that block with the same ones"), each block
pairing row i with its own row n-1-i. In timm's 'batch' mode one lambda/box serves the block (`MixParams`); in
'pair' and 'elem' modes each row (each pair of rows i, n-1-i) has its own (`RowMix`), drawn as timm draws them,
and row i of every block gets row i's. CS-KD mixes its partners as its anchors, DDGSD the second views of its
images as the first views, and PS-KD mixes its progressive (soft) targets with the images' mix.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

__all__ = ['MixParams', 'RowMix', 'ReplayMixup', 'SharedMix', 'draw_mix', 'draw_row_mix', 'mix_block', 'mix_target']

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


@dataclass(frozen=True)
class RowMix:
    """A per-row mix (timm's 'pair' and 'elem' modes): row i is mixed with row n-1-i under `lams[i]` (already
    corrected for a clipped box) and `boxes[i]` (`NO_BOX` for mixup, or no mixing when its lambda is 1)."""
    lams: Tuple[float, ...]
    boxes: Tuple[Tuple[int, int, int, int], ...]

    @property
    def rows(self) -> int:
        return len(self.lams)


def _cut(mixup: Mixup, shape: torch.Size, lam: float, cut: bool) -> Tuple[Tuple[int, int, int, int], float]:
    if cut and lam != 1.:
        box, lam = cutmix_bbox_and_lam(shape, lam, ratio_minmax=mixup.cutmix_minmax, correct_lam=mixup.correct_lam)
        return tuple(int(v) for v in box), float(lam)
    return NO_BOX, float(lam)


def draw_row_mix(mixup: Mixup, shape: torch.Size) -> RowMix:
    """New per-row parameters for a block of `shape` (N, C, H, W) in timm's 'elem' mode (one lambda, and box, per
    row) or 'pair' mode (one per pair of rows i, N-1-i, both rows getting it; a middle row is left unmixed), in
    the order timm draws them (NumPy's global generator)."""
    rows = shape[0]
    if mixup.mode == 'elem':
        lams, cuts = mixup._params_per_elem(rows)
        mixes = [_cut(mixup, shape, float(lam), bool(cut)) for lam, cut in zip(lams, cuts)]
    else:
        lams, cuts = mixup._params_per_elem(rows // 2)
        half = [_cut(mixup, shape, float(lam), bool(cut)) for lam, cut in zip(lams, cuts)]
        mixes = half + [(NO_BOX, 1.)] * (rows % 2) + half[::-1]
    return RowMix(tuple(lam for _, lam in mixes), tuple(box for box, _ in mixes))


def _check_batch_mode(mixup: Mixup, what: str) -> None:
    if mixup.mode != 'batch':
        raise ValueError(f'{what} needs --mixup-mode batch (one lambda and box per block of the batch), '
                         f'got {mixup.mode!r}, which draws one per image')


def draw_mix(mixup: Mixup, shape: torch.Size, rows: int) -> MixParams:
    """New parameters for a block of `rows` images of `shape` (N, C, H, W), from timm's per-batch draw (NumPy's
    global generator; lambda 1 and no box when mixing is off, e.g. past --mixup-off-epoch)."""
    lam, use_cutmix = mixup._params_per_batch()
    box = NO_BOX
    if use_cutmix and lam != 1.:
        box, lam = cutmix_bbox_and_lam(shape, lam, ratio_minmax=mixup.cutmix_minmax, correct_lam=mixup.correct_lam)
    return MixParams(float(lam), tuple(int(v) for v in box), rows)


def mix_block(block: torch.Tensor, mix: Union[MixParams, RowMix]) -> torch.Tensor:
    """Mix `block` (N, C, H, W; a view of a batch is written through) in place with its own flip: image i with
    image n-1-i, CutMix box or mixup lambda as in timm's batch mode (`MixParams`) or per row (`RowMix`)."""
    if isinstance(mix, RowMix):
        if all(lam == 1. for lam in mix.lams):
            return block
        partner = block.flip(0)  # a copy: every row mixes with its partner's original pixels
        original = block.clone()
        for i, (lam, box) in enumerate(zip(mix.lams, mix.boxes)):
            if box != NO_BOX:
                top, bottom, left, right = box
                block[i, :, top:bottom, left:right] = partner[i, :, top:bottom, left:right]
            elif lam != 1.:
                block[i] = original[i] * lam + partner[i] * (1. - lam)
        return block
    if mix.box != NO_BOX:
        top, bottom, left, right = mix.box
        block[:, :, top:bottom, left:right] = block.flip(0)[:, :, top:bottom, left:right]
    elif mix.lam != 1.:
        flipped = block.flip(0).mul_(1. - mix.lam)
        block.mul_(mix.lam).add_(flipped)
    return block


def mix_target(target: torch.Tensor, mixup: Mixup, mix: Union[MixParams, RowMix]) -> torch.Tensor:
    """The targets of a block mixed by `mix_block`: hard labels (N,) become timm's smoothed mixup targets
    (N, K); soft targets (N, K) are mixed as given, `lam t_i + (1 - lam) t_(n-1-i)`, in float32 (`lam` per row
    for a `RowMix`)."""
    lam = torch.tensor(mix.lams, dtype=torch.float32, device=target.device)[:, None] \
        if isinstance(mix, RowMix) else mix.lam
    if target.is_floating_point():
        target = target.float()
        return target if isinstance(lam, float) and lam == 1. else target * lam + target.flip(0) * (1. - lam)
    return mixup_target(target, mixup.num_classes, lam, mixup.label_smoothing)


class SharedMix:
    """timm's Mixup/CutMix drawn once per call and applied alike to several blocks of a batch.

    Every block pairs its row i with its row n-1-i, and row i of every block gets the same lambda and box (in
    'batch' mode one for all rows, in 'pair'/'elem' mode row i's own), so blocks whose rows correspond (CS-KD's
    anchors and their partners, DDGSD's first and second views) stay corresponding after the mix.

    Args:
        mixup: timm's `Mixup` (alphas, probability, switch probability, CutMix min/max, lambda correction, label
            smoothing, class count, mode and `mixup_enabled`).
        what: Who mixes (kept for messages).

    Example:
        >>> mixer = SharedMix(Mixup(cutmix_alpha=1.0, num_classes=100))
        >>> soft_a, soft_p = mixer([x[:n], x[n:]], [y[:n], y[n:]])  # x mixed in place, block by block
    """

    def __init__(self, mixup: Mixup, what: str = 'a shared mix'):
        if mixup.mode not in ('batch', 'pair', 'elem'):
            raise ValueError(f'{what}: unknown --mixup-mode {mixup.mode!r}')
        self.mixup = mixup
        self.what = what
        self.last: Optional[Union[MixParams, RowMix]] = None

    def draw(self, shape: torch.Size) -> Union[MixParams, RowMix]:
        """One mix for blocks of `shape` (N, C, H, W), in the mode of `mixup`."""
        if self.mixup.mode == 'batch':
            return draw_mix(self.mixup, shape, shape[0])
        return draw_row_mix(self.mixup, shape)

    def __call__(self, blocks: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Mix each of `blocks` (equal shapes; views are written through) in place with one new mix; return each
        block's mixed targets (`mix_target`: hard labels or soft targets)."""
        shapes = {tuple(block.shape) for block in blocks}
        if len(shapes) != 1:
            raise ValueError(f'a shared mix needs blocks of one shape, got {sorted(shapes)}')
        mix = self.last = self.draw(blocks[0].shape)
        for block in blocks:
            mix_block(block, mix)
        return [mix_target(target, self.mixup, mix) for target in targets]


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
        _check_batch_mode(mixup, 'a replayed mix')
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
        return draw_mix(self.mixup, shape, rows)

    def apply(self, block: torch.Tensor, target: torch.Tensor, mix: MixParams) -> torch.Tensor:
        """Mix `block` in place with its own flip (image i with image n-1-i); return its soft targets."""
        mix_block(block, mix)
        return mix_target(target, self.mixup, mix)

    def state(self) -> Optional[torch.Tensor]:
        """The kept mix as a float64 tensor (lam, box, rows), or None."""
        return None if self.kept is None else self.kept.as_tensor()

    def load_state(self, values: Optional[torch.Tensor]) -> None:
        self.kept = None if values is None else MixParams.from_tensor(values)
