"""Batch samplers that decide which images share a mini-batch.

All samplers are rank-aware, deterministic for a given seed and epoch, and advance their own epoch after
each pass (a loop may also call `set_epoch`), so they work with training loops that never touch them.
"""
import math
from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ['LastBatchSampler', 'ClassGroupBatchSampler', 'EpochBatchSampler', 'ViewsBatchSampler']

GROUP_LAYOUTS = ('interleaved', 'anchors_first')


class LastBatchSampler(Sampler[List[int]]):
    """DLB batches (Shen et al., CVPR 2022, sec. 3.2): each batch repeats the previous batch's second half.

    The wrapped index sampler's order for an epoch is cut into halves of `batch_size // 2` new indices.
    Batch t is `[new half of batch t-1] + [new half of batch t]`; the very first batch of a stream is two new
    halves. The repeated half is read (and augmented) again by the loader. The stream continues across
    epochs, so every index is new exactly once per epoch and the first batch of epoch e+1 repeats the last
    new half of epoch e; when the epoch's length is not a multiple of the half, that last half is shorter.

    Rank awareness comes from the wrapped sampler (e.g. `DistributedSampler`). When the wrapped sampler has
    `set_epoch` (so an epoch's order can be replayed), a sampler created at epoch e > 0, as on `--resume`,
    rebuilds the half carried over from epoch e-1 and the stream continues exactly.

    Args:
        sampler: Any sampler of dataset indices.
        batch_size: Images per batch (even); `batch_size // 2` of them are new at each step.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int):
        self.check_batch_size(batch_size)
        if len(sampler) < batch_size:
            raise ValueError(f'DLB needs at least batch size ({batch_size}) images per process, got {len(sampler)}')
        self.sampler = sampler
        self.batch_size = batch_size
        self.half = batch_size // 2
        self.epoch = 0
        self._carry: Optional[List[int]] = None  # new half of the last batch yielded by this object

    @staticmethod
    def check_batch_size(batch_size: int) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f'DLB needs an even batch size of at least 2 (half new, half repeated), got {batch_size}')

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a jump: the kept half belongs to another epoch, replay instead
            self._carry = None
        self.epoch = epoch

    def _order(self, epoch: int) -> List[int]:
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def _carry_into(self, epoch: int) -> List[int]:
        """Indices repeated by the first batch of `epoch`: the last new half of `epoch - 1`, if replayable."""
        if self._carry is not None:
            return self._carry
        if epoch == 0 or not hasattr(self.sampler, 'set_epoch'):
            return []
        order = self._order(epoch - 1)
        return order[(len(order) - 1) // self.half * self.half:]

    def __iter__(self) -> Iterator[List[int]]:
        carry = self._carry_into(self.epoch)
        order = self._order(self.epoch)
        halves = [order[i:i + self.half] for i in range(0, len(order), self.half)]
        previous = carry if carry else halves.pop(0)
        for new in halves:
            yield previous + new
            previous = new
        self._carry = previous
        self.epoch += 1

    def __len__(self) -> int:
        num_halves = math.ceil(len(self.sampler) / self.half)
        return num_halves if self._carry_into_known() else num_halves - 1

    def _carry_into_known(self) -> bool:
        return self._carry is not None or (self.epoch > 0 and hasattr(self.sampler, 'set_epoch'))


class ClassGroupBatchSampler(Sampler[List[int]]):
    """Per-class batches: each anchor comes with M other images of its class (BAKE, Ge et al., 2021, sec. 3.3;
    CS-KD, Yun et al., CVPR 2020, sec. 3.1).

    Every epoch, each index is an anchor exactly once across all ranks (the permutation is padded by
    wrapping, like `DistributedSampler`, so all ranks get the same number of batches); or, with
    `anchor_sampler`, the anchors are that sampler's indices for this rank and epoch (the run's shuffled index
    sampler, e.g. timm's `RepeatAugSampler`, which draws each image several times). Each anchor is joined
    by `num_same_class` other images of its class, never the anchor itself, distinct whenever the class
    has enough images. A batch holds `batch_size // (M + 1)` whole groups of an anchor and its partners; the
    last batch of an epoch may hold fewer groups. The layout of a batch of G groups is
    `'interleaved'`: `[anchor_1, partners of 1, anchor_2, partners of 2, ...]` (BAKE), or
    `'anchors_first'`: `[anchor_1..anchor_G, first partner of each anchor, ..., M-th partner of each]`
    (CS-KD with M = 1: G anchors, then their G partners in the same order).
    Sampling is vectorised (no Python loop per image).

    Args:
        labels: Class index of every dataset item.
        batch_size: Images per batch, a multiple of `num_same_class + 1`.
        num_same_class: M, the same-class images added per anchor.
        seed: Base seed; anchors depend on (seed, epoch), partners on (seed, epoch, rank).
        rank: This process's rank.
        world_size: Number of processes.
        layout: `'interleaved'` or `'anchors_first'`.
        method: Name used in error messages.
        anchor_sampler: Where the anchors come from (rank-aware, with `set_epoch`); default: the permutation
            above.
    """

    def __init__(
            self,
            labels: Sequence[int],
            batch_size: int,
            num_same_class: int = 1,
            seed: int = 0,
            rank: int = 0,
            world_size: int = 1,
            layout: str = 'interleaved',
            method: str = 'BAKE',
            anchor_sampler: Optional[Sampler[int]] = None,
    ):
        self.check_batch_size(batch_size, num_same_class, method)
        if layout not in GROUP_LAYOUTS:
            raise ValueError(f'unknown layout {layout!r}; choose from {", ".join(GROUP_LAYOUTS)}')
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels)
        single = np.flatnonzero(counts == 1)
        if single.size:
            raise ValueError(f'{method} needs at least two images per class, but class {int(single[0])} has one')
        self.labels = labels
        self.counts = counts
        self.by_class = np.argsort(labels, kind='stable')
        self.class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.position = np.empty_like(labels)
        self.position[self.by_class] = np.arange(labels.size) - self.class_start[labels[self.by_class]]
        self.num_same_class = num_same_class
        self.layout = layout
        self.anchors_per_batch = batch_size // (num_same_class + 1)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.anchor_sampler = anchor_sampler
        self.num_anchors = len(anchor_sampler) if anchor_sampler is not None else math.ceil(labels.size / world_size)
        self.epoch = 0

    @staticmethod
    def check_batch_size(batch_size: int, num_same_class: int, method: str = 'BAKE') -> None:
        if num_same_class < 1:
            raise ValueError(f'{method} needs at least one same-class image per anchor, got {num_same_class}')
        group = num_same_class + 1
        if batch_size < group or batch_size % group:
            raise ValueError(f'{method} batch size {batch_size} cannot hold whole groups of one anchor and '
                             f'{num_same_class} same-class image{"s" if num_same_class > 1 else ""}; '
                             f'use a multiple of {group}')

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _anchors(self) -> np.ndarray:
        if self.anchor_sampler is not None:
            self.anchor_sampler.set_epoch(self.epoch)
            return np.fromiter(self.anchor_sampler, dtype=np.int64, count=self.num_anchors)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.labels.size)
        total = self.num_anchors * self.world_size
        order = np.resize(order, total)  # wraps around to pad, so every rank gets the same count
        return order[self.rank:total:self.world_size]

    def _partners(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """M other same-class indices per anchor, shape (A, M): offsets in the class block skip the anchor."""
        classes = self.labels[anchors]
        others = self.counts[classes] - 1
        shape = (anchors.size, self.num_same_class)
        offsets = rng.integers(0, others[:, None], size=shape)
        if self.num_same_class > 1:
            self._redraw_duplicates(offsets, others, rng)
        offsets += offsets >= self.position[anchors][:, None]
        return self.by_class[self.class_start[classes][:, None] + offsets]

    def _redraw_duplicates(self, offsets: np.ndarray, others: np.ndarray, rng: np.random.Generator) -> None:
        """Make each row's offsets distinct where the class has at least M other images (in place)."""
        for attempt in range(21):
            ordered = np.sort(offsets, axis=1)
            clash = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1) & (others >= self.num_same_class)
            if not clash.any() or attempt == 20:
                break
            offsets[clash] = rng.integers(0, others[clash, None], size=(int(clash.sum()), self.num_same_class))
        for row in np.flatnonzero(clash):  # rare: classes barely larger than M
            offsets[row] = rng.choice(others[row], self.num_same_class, replace=False)

    def __iter__(self) -> Iterator[List[int]]:
        anchors = self._anchors()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        groups = np.concatenate([anchors[:, None], self._partners(anchors, rng)], axis=1)
        self.epoch += 1
        if self.layout == 'anchors_first':
            for start in range(0, len(groups), self.anchors_per_batch):
                yield groups[start:start + self.anchors_per_batch].T.reshape(-1).tolist()
        else:
            for start in range(0, len(groups), self.anchors_per_batch):
                yield groups[start:start + self.anchors_per_batch].reshape(-1).tolist()

    def __len__(self) -> int:
        return math.ceil(self.num_anchors / self.anchors_per_batch)


class EpochBatchSampler(Sampler[List[int]]):
    """Consecutive batches of a replayable index sampler (e.g. `DistributedSampler`), last partial one dropped.

    Unlike torch's `BatchSampler` it sets the index sampler's epoch before each pass and advances its own
    epoch, so a loop that never calls `set_epoch` still gets a new order every epoch.

    Args:
        sampler: Sampler of dataset indices; rank awareness comes from it.
        batch_size: Indices per batch.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int):
        if batch_size < 1 or len(sampler) < batch_size:
            raise ValueError(f'batch size {batch_size} must be >= 1 and at most the {len(sampler)} images per process')
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[List[int]]:
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(self.epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        self.epoch += 1
        for batch in order[:len(self) * self.batch_size].reshape(-1, self.batch_size):
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class ViewsBatchSampler(Sampler[List[int]]):
    """Every index of a wrapped batch sampler's batches `views` times in a row (DDGSD, Xu & Liu, AAAI 2019).

    `[i, j, ...]` becomes `[i, i, j, j, ...]` for two views: the loader reads (and augments, with timm's own
    pipeline) each copy separately, so the copies are independent views of one image, and rows `v::views` of
    a batch are the v-th views. The order of the wrapped batches is kept, so a layout the wrapped sampler
    gives (e.g. `LastBatchSampler`'s repeated part first) holds for the expanded rows too.

    Args:
        batch_sampler: Any batch sampler; epochs are forwarded to it.
        views: Copies of each index (>= 2).
    """

    def __init__(self, batch_sampler: Sampler[List[int]], views: int = 2):
        if views < 2:
            raise ValueError(f'views must be at least 2, got {views}')
        self.batch_sampler = batch_sampler
        self.views = views

    @staticmethod
    def check_batch_size(batch_size: int, views: int, method: str = 'DDGSD') -> None:
        if batch_size < views or batch_size % views:
            raise ValueError(f'{method} batch size {batch_size} cannot hold whole sets of {views} views of an '
                             f'image; use a multiple of {views}')

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, 'set_epoch'):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batch_sampler:
            yield np.repeat(np.asarray(batch, dtype=np.int64), self.views).tolist()

    def __len__(self) -> int:
        return len(self.batch_sampler)
