"""The training batch stream: which samples each step reads, with what randomness, and what the task learns of it.

Every training loader (ours and the upstream adapter's) reads its batches from a `BatchStream`, which wraps a
method's batch sampler (or a plain shuffled `BatchSampler`) and adds three things:

- Position: `start_at(epoch, step)` replays an epoch's sample order from any step, for exact mid-epoch resume.
- Randomness: each yielded item is a `SampleKey(index, seed)`; `KeyedDataset` seeds Python's, NumPy's and
  torch's generators from the key before reading the sample, so an image's augmentation depends on (seed,
  rank, epoch, step, position) and not on which worker loaded it. A collate that draws random numbers (timm's
  mixup/cutmix collate) runs right after the batch's last sample, so it is seeded by the batch as well.
- Metadata: when recording, each batch's `BatchInfo` (epoch, step, dataset indices) goes into a FIFO in the
  main process, where the sampler runs; the loader yields batches in sampler order, so the task pops one
  record per training step and gets the indices of exactly the images it is given. A streamed data set with
  its own sample keys could fill the same FIFO from its keys instead.
"""
import random
from collections import deque
from typing import Deque, Iterator, List, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from timm_selfkd.run_facts import BatchInfo

__all__ = ['SampleKey', 'BatchStream', 'KeyedDataset', 'seed_host', 'seed_everything', 'step_seed']

_STEP_STREAM = 1  # extra entropy word that keeps step seeds apart from the per-sample seeds of the same step


class SampleKey(NamedTuple):
    """One item of a batch: the dataset index and the seed of its augmentation."""
    index: int
    seed: int


def seed_host(seed: int) -> None:
    """Seed the generators a data transform draws from: Python's `random`, NumPy's legacy global generator and
    torch's CPU generator (about 5 us; `torch.manual_seed` also seeds every accelerator, about 100 us)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's legacy global generator and torch's (every device) from one integer."""
    seed_host(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of training step (`epoch`, `step`) on `rank`: what the model's own randomness (dropout, drop
    path, batch-level augmentation) draws from at that step, whatever happened before it."""
    return int(np.random.default_rng([seed, rank, epoch, step, _STEP_STREAM]).integers(2 ** 62))


def _set_epoch(sampler, epoch: int) -> None:
    """Tell a sampler, or the index sampler inside a `BatchSampler`, which epoch starts."""
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    elif hasattr(sampler, 'sampler'):
        _set_epoch(sampler.sampler, epoch)


class BatchStream(Sampler[List[SampleKey]]):
    """A batch sampler that yields `SampleKey` batches, can start an epoch at any step and records `BatchInfo`.

    Args:
        batch_sampler: A method's batch sampler, or `BatchSampler(index_sampler, batch_size, drop_last=True)`;
            deterministic for a given epoch (`set_epoch`, on it or on its `.sampler`).
        seed: Base seed of the run.
        rank: This process's rank (ranks draw different augmentations).
        record: Keep each yielded batch's `BatchInfo` for `pop()` (only tasks that read it need this).

    Example:
        >>> stream = BatchStream(BatchSampler(DistributedSampler(ds, 1, 0, seed=42), 64, True), seed=42)
        >>> loader = DataLoader(KeyedDataset(ds), batch_sampler=stream)
    """

    def __init__(self, batch_sampler: Sampler[List[int]], seed: int, rank: int = 0, record: bool = False):
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank = rank
        self.record = record
        self.epoch = 0
        self.start_step = 0
        self._records: Deque[BatchInfo] = deque()

    @classmethod
    def shuffled(cls, index_sampler: Sampler[int], batch_size: int, seed: int, rank: int = 0) -> 'BatchStream':
        """Plain training's batches: the index sampler's order cut into full batches (timm drops the last partial)."""
        return cls(BatchSampler(index_sampler, batch_size, drop_last=True), seed, rank)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its first step (loops call this at every epoch; a resume then calls `start_at`)."""
        self.epoch = epoch
        self.start_step = 0

    def start_at(self, epoch: int, step: int) -> None:
        """Make the next pass yield `epoch`'s batches from batch number `step` on, in the epoch's own order."""
        self.epoch = epoch
        self.start_step = step

    def __iter__(self) -> Iterator[List[SampleKey]]:
        epoch, start = self.epoch, self.start_step
        _set_epoch(self.batch_sampler, epoch)
        for step, batch in enumerate(self.batch_sampler):
            if step < start:  # indices only: replaying skipped batches reads no image
                continue
            seeds = np.random.default_rng([self.seed, self.rank, epoch, step]).integers(2 ** 62, size=len(batch))
            if self.record:
                self._records.append(BatchInfo(epoch, step, torch.as_tensor(batch, dtype=torch.int64)))
            yield [SampleKey(int(i), int(s)) for i, s in zip(batch, seeds)]
        self.epoch, self.start_step = epoch + 1, 0

    def __len__(self) -> int:
        """Batches in the whole current epoch (a pass started at step k yields `len - k`)."""
        _set_epoch(self.batch_sampler, self.epoch)
        return len(self.batch_sampler)

    @property
    def steps_per_epoch(self) -> int:
        """Batches in an epoch after the first, the run's nominal epoch length (for schedules). They differ
        only for samplers whose first epoch is special, e.g. DLB's, whose first batch has no repeated half."""
        _set_epoch(self.batch_sampler, 1)
        steps = len(self.batch_sampler)
        _set_epoch(self.batch_sampler, self.epoch)
        return steps

    def pop(self) -> BatchInfo:
        """The `BatchInfo` of the oldest batch not yet trained on (call once per training step)."""
        if not self._records:
            raise RuntimeError('no batch information recorded: the task asked for more batches than the loader gave')
        return self._records.popleft()


class KeyedDataset(Dataset):
    """A map-style data set read with `SampleKey`s: seeds the host generators from the key, then reads the sample.

    The wrapped data set's transform (set by timm's `create_loader`) runs under that seed, in whichever worker.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        seed_host(key.seed)
        return self.dataset[key.index]

