"""The one path from a method to a run, used alike by `train.py`, the upstream adapter (a user's own timm
train.py) and `create_task` (a loop of one's own).

`MethodWiring(method, hparams)` reads only the method's record (`Needs`, from `SelfKDTask.requirements`) and
the hooks of `SelfKDTask`:

- `check(...)`: every refusal that depends on the method, each worded once whichever way the method runs;
- `mixing(...)`: where timm's mixup/CutMix runs (the prefetching loader's collate, the loop, or the task of a
  method that mixes its batches itself) and the `--mixup-off-epoch` switch;
- `create_task(model, ...)`: the task, whose criterion takes soft targets whenever batches are mixed;
- `attach(task, loader=, dataset=, ...)`: the method's batches into a timm training loader, through a seeded,
  resumable `BatchStream`, then `bind`;
- `bind(task, ...)`: the run's facts (`RunInfo`, with the processes' `World` read once) into `bind_run`.

`create_task` and `batch_sampler` are the same for a loop of one's own (README, "Your own training loop").
No command-line parsing and no recipe reading happens here (`timm_selfkd.options`, `timm_selfkd.cli`).
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import FastCollateMixup, Mixup
from torch.utils.data import Dataset, IterableDataset, Sampler

from timm_selfkd.components.samplers import EpochBatchSampler
from timm_selfkd.errors import UsageError
from timm_selfkd.methods.base import RunInfo, SelfKDTask
from timm_selfkd.registry import MethodSpec, build_hparams, check_hparams, get_method
from timm_selfkd.runtime.batch_stream import BatchStream
from timm_selfkd.runtime.data import dataset_labels, index_sampler, read_through

__all__ = ['World', 'Mixing', 'Attached', 'MethodWiring', 'create_task', 'batch_sampler']


@dataclass(frozen=True)
class World:
    """The processes of a run: their number, this one's rank, and the same on its node."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def current(cls) -> 'World':
        """The initialised process group's (one process without one); the node's from torchrun's variables, or
        one node where they are absent (e.g. `mp.spawn`)."""
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size, rank = 1, 0
        return cls(world_size, rank, int(os.environ.get('LOCAL_RANK', rank)),
                   int(os.environ.get('LOCAL_WORLD_SIZE', world_size)))


@dataclass
class Mixing:
    """timm's mixup/CutMix in a run, and where it runs: 'collate' (`FastCollateMixup`, the prefetching loader's
    collate), 'loop' (the batch-form `Mixup` on each batch), or 'task' (given to a method that mixes its batches
    itself, `Needs.mixup == 'task'`)."""
    mixer: Union[Mixup, FastCollateMixup]
    where: str
    off_epoch: int = 0

    @property
    def collate_fn(self) -> Optional[FastCollateMixup]:
        return self.mixer if self.where == 'collate' else None

    @property
    def task_mixup(self) -> Optional[Mixup]:
        return self.mixer if self.where == 'task' else None

    def mix(self, input: torch.Tensor, target: torch.Tensor):
        """The loop's mix of a batch (unchanged where the collate or the task mixes)."""
        return self.mixer(input, target) if self.where == 'loop' else (input, target)

    def set_epoch(self, epoch: int) -> None:
        """timm's `--mixup-off-epoch`: no mixing from that epoch on (0: mix every epoch)."""
        self.mixer.mixup_enabled = not (self.off_epoch and epoch >= self.off_epoch)


@dataclass
class Attached:
    """What `MethodWiring.attach` gives the loop: the loader to iterate, the stream that chooses its batches
    (None for a streamed data set, whose loader stays timm's) and the nominal steps per epoch."""
    loader: Any
    stream: Optional[BatchStream]
    steps_per_epoch: int


class MethodWiring:
    """One method (a registered name, a stack `LAYOUT+METHOD`, or its spec) with its hyper-parameters, wired into
    a run.

    Args:
        method: The method's name or spec.
        hparams: Its hyper-parameter dataclass (default: the paper's values), checked (`check_hparams`).
    """

    def __init__(self, method: Union[str, MethodSpec], hparams: Any = None):
        self.spec = get_method(method) if isinstance(method, str) else method
        self.hparams = build_hparams(self.spec, {}) if hparams is None else hparams
        check_hparams(self.hparams)  # a dataclass built by hand, too
        self.needs = self.spec.task_cls.requirements(self.hparams)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task_mixes(self) -> bool:
        """Whether the method mixes its batches itself (it gets them unmixed, with timm's batch-form `Mixup`)."""
        return self.needs.mixup == 'task'

    def check(self, *, batch_size: Optional[int] = None, dataset: Optional[Dataset] = None,
              bce: bool = False) -> None:
        """Refuse, in one line, what the method cannot train (before any file is written).

        Args:
            batch_size: Images (rows) per step and process (None: not known yet).
            dataset: The training set, when already built (a streamed one has no sampler and no indices).
            bce: Whether a BCE criterion (timm's --bce-loss) replaces the hard-label term.

        Raises:
            UsageError, or the method's own ValueError for its hyper-parameters at this batch size.
        """
        if batch_size is not None:
            self.spec.task_cls.check_setup(self.hparams, batch_size=batch_size)
        if bce and self.needs.bce_refusal:
            raise UsageError(f'{self.name} cannot train with a BCE loss (--bce-loss): {self.needs.bce_refusal}')
        if isinstance(dataset, IterableDataset) and not self.needs.streamed_data:
            raise UsageError(f'{self.name} chooses its batches or reads sample indices, which a streamed data set '
                             '(wds/, hfids/, tfds/) cannot give; use a map-style data set')

    def mixing(self, arguments: Optional[Dict[str, Any]], *, prefetcher: bool, off_epoch: int = 0
               ) -> Optional[Mixing]:
        """timm's mixup/CutMix for this method (None when `arguments`, those of timm's `Mixup`, are None): the task
        mixes where the method mixes itself, else the prefetching loader's collate, else the loop."""
        if arguments is None:
            return None
        where = 'task' if self.task_mixes else 'collate' if prefetcher else 'loop'
        return Mixing(FastCollateMixup(**arguments) if where == 'collate' else Mixup(**arguments), where, off_epoch)

    def create_task(self, model: nn.Module, *, mixed: bool = False, **task_kwargs) -> SelfKDTask:
        """The method's task around `model`; with `mixed`, the criterion timm creates takes soft targets.

        Args:
            model: A timm model, already on its device.
            mixed: Whether the run mixes its batches (anywhere: see `mixing`).
            **task_kwargs: `criterion` or `criterion_kwargs`, `device`, `dtype`, `verbose` (as timm's
                `ClassificationTask`).
        """
        if mixed and task_kwargs.get('criterion') is None:
            task_kwargs['criterion_kwargs'] = {'soft_targets': True, **(task_kwargs.get('criterion_kwargs') or {})}
        return self.spec.task_cls(model, self.hparams, **task_kwargs)

    def attach(self, task: SelfKDTask, *, loader, dataset: Dataset, batch_size: int, num_epochs: int, seed: int,
               aug_repeats: float = 0, mixing: Optional[Mixing] = None, world: Optional[World] = None) -> Attached:
        """Make a timm training loader read the task's batches, and tell the task the run's facts.

        The method's batch sampler (`Needs.own_batches`) or plain shuffled batches are wrapped in a `BatchStream`,
        which seeds every sample and can resume mid-epoch; the loader's `DataLoader` is rebuilt around it
        (transforms, collate, workers and prefetcher stay timm's). A streamed data set keeps timm's loader.
        """
        world = world or World.current()
        stream = None
        if not isinstance(dataset, IterableDataset):
            indices = index_sampler(dataset, seed, world.rank, world.world_size, aug_repeats)
            if self.needs.own_batches:
                stream = BatchStream(task.batch_sampler(index_sampler=indices, labels=dataset_labels(dataset),
                                                        batch_size=batch_size, seed=seed, rank=world.rank,
                                                        world_size=world.world_size), seed, world.rank)
            else:
                stream = BatchStream.shuffled(indices, batch_size, seed, world.rank)
            stream.record = self.needs.sample_indices
            loader = read_through(loader, stream)
        if len(loader) == 0:
            raise UsageError(f'the training set ({len(dataset)} images, split over {world.world_size} process(es)) '
                             f'does not fill one batch of {batch_size}: lower -b')
        steps = stream.steps_per_epoch if stream is not None else len(loader)
        self.bind(task, num_epochs=num_epochs, steps_per_epoch=steps,
                  num_samples=None if stream is None else len(dataset), batch_size=batch_size, mixing=mixing,
                  batch_info=stream.pop if stream is not None and self.needs.sample_indices else None, world=world)
        return Attached(loader, stream, steps)

    def bind(self, task: SelfKDTask, *, num_epochs: Optional[int], steps_per_epoch: Optional[int],
             num_samples: Optional[int], batch_size: Optional[int], mixing: Optional[Mixing] = None,
             batch_info=None, world: Optional[World] = None) -> None:
        """Give the task the run's facts (`RunInfo`) before its first step."""
        world = world or World.current()
        task.bind_run(RunInfo(
            num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, num_samples=num_samples,
            num_classes=getattr(task.get_eval_model(), 'num_classes', None), batch_size=batch_size,
            world_size=world.world_size, rank=world.rank, local_rank=world.local_rank,
            local_world_size=world.local_world_size, mixup=mixing.task_mixup if mixing is not None else None,
            batch_info=batch_info))


def create_task(
        name: str,
        model: nn.Module,
        *,
        num_epochs: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        num_samples: Optional[int] = None,
        batch_size: Optional[int] = None,
        mixup: Optional[Mixup] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        **hparams,
) -> SelfKDTask:
    """The `timm.task.TrainingTask` of method `name` around `model`, ready for a loop of one's own.

    `out = task(images, labels)` returns `loss`, `output` and the named terms; a method that reads sample
    indices (PS-KD) is called as `task(images, labels, indices=...)` with `task.set_epoch(epoch)` every epoch,
    and a method that chooses its batches (DLB, BAKE, CS-KD, DDGSD) reads them from `batch_sampler(task, ...)`.
    A fact the method needs and was not given is a ValueError naming the argument; a refusal is worded as under
    `train.py`.

    Args:
        name: A registered method (`list_methods()`), a stack `LAYOUT+METHOD`, or `none`.
        model: A timm model, already on `device`.
        num_epochs, steps_per_epoch, num_samples, batch_size: Facts of the run, where the method needs them
            (`task.needs.run_facts`): epochs, batches per epoch, training-set size, images per step.
        mixup: timm's `Mixup` (batch mode) when the loop mixes its batches: a method that mixes them itself (DLB)
            takes it (the loop then gives it unmixed batches); the others get mixed batches with soft targets.
            Either way the criterion takes soft targets.
        criterion_kwargs: Arguments for timm's `create_classification_loss` (e.g. `smoothing`, `loss_type='bce'`).
        device: Device of the task's state; defaults to the model's.
        **hparams: The method's hyper-parameters (`get_method(name).hparams_cls` fields); defaults are the paper's.
    """
    spec = get_method(name)
    wiring = MethodWiring(spec, build_hparams(spec, hparams))
    facts = dict(num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, num_samples=num_samples,
                 batch_size=batch_size)
    for fact, why in wiring.needs.run_facts.items():
        if facts[fact] is None:
            raise ValueError(f'create_task({name!r}) needs {fact}=... ({why})')
    wiring.check(batch_size=batch_size, bce=(criterion_kwargs or {}).get('loss_type') == 'bce')
    task = wiring.create_task(model, mixed=mixup is not None, criterion_kwargs=criterion_kwargs,
                              device=device if device is not None else next(model.parameters()).device)
    wiring.bind(task, **facts, mixing=Mixing(mixup, 'task') if mixup is not None and wiring.task_mixes else None)
    return task


def batch_sampler(task: SelfKDTask, labels: Sequence[int], batch_size: int, seed: int = 0) -> Sampler:
    """The batches of `task`'s method for a plain `torch.utils.data.DataLoader(dataset, batch_sampler=...)`.

    Shuffled every epoch (the sampler counts its epochs itself), split over the ranks of an initialised process
    group; the method's own sampler where it chooses its batches, otherwise full batches of `batch_size`.

    Args:
        task: From `create_task`.
        labels: The class of every training image (the data set's length is `len(labels)`).
        batch_size: Images (rows) per step and process, as given to `create_task`.
        seed: Seed of the shuffling.
    """
    world = World.current()
    indices = index_sampler(_Labels(labels), seed, world.rank, world.world_size)
    if not task.needs.own_batches:
        return EpochBatchSampler(indices, batch_size)
    task.check_setup(task.method_hparams, batch_size=batch_size)
    return task.batch_sampler(index_sampler=indices, labels=list(labels), batch_size=batch_size, seed=seed,
                              rank=world.rank, world_size=world.world_size)


class _Labels(Dataset):
    """A data set of labels only, for the index samplers (which read its length)."""

    def __init__(self, labels: Sequence[int]):
        self.targets = list(labels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.targets[index]
