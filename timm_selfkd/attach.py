"""The one path that attaches a self-KD task to a run, shared by `train.py`, the upstream adapter and
`create_task` (hand-written loops).

It reads only the method's record (`Needs`, from `SelfKDTask.requirements`) and the hooks of `SelfKDTask`:

- `REFUSED_OPTIONS` and `check_method`: every refusal of a timm option, decided once and worded once;
- `attach`: the method's batches into a timm training loader (through a seeded, resumable `BatchStream`), and
  the run's facts into the task (`bind_run`);
- `create_task` and `batch_sampler`: the same for a loop of one's own (see the README, "Your own training loop").
"""
import argparse
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.data import FastCollateMixup, Mixup
from torch.utils.data import Dataset, IterableDataset, Sampler

from timm_selfkd.components.samplers import EpochBatchSampler
from timm_selfkd.errors import UsageError
from timm_selfkd.methods.base import RunInfo, SelfKDTask
from timm_selfkd.registry import MethodSpec, build_hparams, get_method
from timm_selfkd.runtime.batch_stream import BatchStream
from timm_selfkd.runtime.data import dataset_labels, index_sampler, read_through

__all__ = ['RefusedOption', 'REFUSED_OPTIONS', 'refused_options_set', 'mixup_active', 'create_mixup', 'check_method',
           'Attached', 'attach', 'create_task', 'batch_sampler', 'read_recipe_path', 'read_recipe']


@dataclass(frozen=True)
class RefusedOption:
    """A flag of timm's train.py that a run refuses, with the one reason it gives.

    `scope`: 'selfkd' when no self-KD run can take it (refused by our train.py and by the adapter, which runs the
    user's script), 'train.py' when only our loop lacks it (the user's own script has it).
    """
    flag: str
    nargs: Any
    reason: str
    scope: str = 'selfkd'

    @property
    def dest(self) -> str:
        return self.flag[2:].replace('-', '_')


def _options(flags, reason: str, scope: str = 'selfkd'):
    return tuple(RefusedOption(flag, nargs, reason, scope) for flag, nargs in flags)


REFUSED_OPTIONS = (
    RefusedOption('--aug-splits', 1, 'each batch would hold every image once per split, which changes the batch '
                                     'layout the methods rely on'),
    RefusedOption('--jsd-loss', 0, 'the JSD loss needs --aug-splits'),
    RefusedOption('--resplit', 0, 'it needs --aug-splits'),
    RefusedOption('--split-bn', 0, 'it needs --aug-splits'),
    RefusedOption('--use-multi-epochs-loader', 0, 'the batch stream that feeds the task replaces the loader\'s '
                                                  'sampler each epoch'),
    RefusedOption('--torchscript', 0, 'the methods may wrap the model or hook its classifier, which a scripted '
                                      'model does not allow; use --torchcompile'),
    RefusedOption('--fuser', 1, 'it selects a TorchScript fuser; use --torchcompile'),
    *_options((('--naflex-loader', 0), ('--naflex-train-seq-lens', '+'), ('--naflex-max-seq-len', 1),
               ('--naflex-patch-sizes', '+'), ('--naflex-patch-size-probs', '+'), ('--naflex-loss-scale', 1),
               ('--naflex-patchify-channels-first', 0)),
              'NaFlex batches are patch sequences of varying length from their own sampler, not the image '
              'batches the methods choose'),
    *_options((('--train-img-sizes', '+'), ('--train-batch-sizes', '+'), ('--train-size-probs', '+'),
               ('--train-size-schedule', 1), ('--train-size-schedule-spread', 1), ('--train-size-random-mix', 1),
               ('--train-batches-per-epoch', 1), ('--train-steps-per-epoch', 1), ('--variable-batch-loss-scale', 1)),
              'variable image or batch sizes change the batch layout the methods rely on'),
    *_options((('--kd-model-name', 1), ('--kd-distill-type', 1), ('--kd-loss-type', 1), ('--distill-loss-weight', 1),
               ('--task-loss-weight', 1), ('--kd-temperature', 1), ('--kd-student-feature-dim', 1),
               ('--kd-teacher-feature-dim', 1), ('--kd-token-distill-type', 1)),
              'a teacher-distillation task would replace the self-KD task (here the model is its own teacher)'),
    # what only this project's train.py lacks; the user's own script under the adapter has it
    RefusedOption('--epoch-repeats', 1, 'an epoch is one pass of the method\'s batches; set --epochs', 'train.py'),
    RefusedOption('--start-epoch', 1, 'use --resume, which continues at the saved step', 'train.py'),
    RefusedOption('--worker-seeding', 1, 'every image is seeded from its own key (seed, rank, epoch, step, '
                                         'position)', 'train.py'),
    RefusedOption('--model-dtype', 1, 'self-KD terms need float32 weights; use --amp --amp-dtype bfloat16',
                  'train.py'),
    RefusedOption('--device-modules', '+', 'only CUDA and CPU devices are supported', 'train.py'),
    RefusedOption('--model-ema-force-cpu', 0, 'deprecated in timm; the EMA stays on the training device',
                  'train.py'),
    RefusedOption('--save-images', 0, 'debugging aid of timm\'s train.py', 'train.py'),
    RefusedOption('--tta', 1, 'validation runs without test-time augmentation', 'train.py'),
    *_options((('--log-wandb', 0), ('--wandb-project', 1), ('--wandb-tags', '+'), ('--wandb-resume-id', 1)),
              'not built in; summary.csv has every metric', 'train.py'),
)


def refused_options_set(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Refuse the options of a timm script's parsed `args` that no self-KD run can take (those it has), set to
    another value than `defaults` (the script parser's own defaults by destination, e.g. timm's
    `--naflex-train-seq-lens 128 256 ...` or `--kd-temperature 4`, which do nothing on their own)."""
    defaults = defaults or {}
    for option in REFUSED_OPTIONS:
        value = getattr(args, option.dest, None)
        if option.scope == 'selfkd' and value and value != defaults.get(option.dest):
            raise UsageError(f'{option.flag} cannot be used with --selfkd {args.selfkd}: {option.reason}')


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether timm's mixup/CutMix options turn it on."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def create_mixup(args: argparse.Namespace, num_classes: int, collate: bool):
    """timm's Mixup/CutMix from its options (None when off): the collate form (`FastCollateMixup`, for the
    prefetching loader) or the batch form (`Mixup`, for the loop or for a method that mixes its batches itself)."""
    if not mixup_active(args):
        return None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
    return FastCollateMixup(**mixup_args) if collate else Mixup(**mixup_args)


def check_method(spec: MethodSpec, hparams: Any, *, batch_size: int, mixup: bool = False, aug_repeats: float = 0,
                 dataset: Optional[Dataset] = None, bce: bool = False) -> None:
    """Refuse, in one line, what the method cannot train (before any file is written).

    Args:
        spec, hparams: The method and its hyper-parameters.
        batch_size: Images (rows) per step and process.
        mixup: Whether mixup/CutMix is on.
        aug_repeats: timm's repeated-augmentation count (0: off; fractional counts as in timm).
        dataset: The training set, when already built (a streamed one has no sampler and no indices).
        bce: Whether timm's --bce-loss replaces the hard-label term.
    """
    needs = spec.task_cls.requirements(hparams)
    spec.task_cls.check_setup(hparams, batch_size=batch_size)
    if mixup and needs.mixup == 'refused':
        raise UsageError(f'--mixup/--cutmix are not supported with --selfkd {spec.name}: {needs.mixup_refusal}')
    if bce and needs.bce_refusal:
        raise UsageError(f'--bce-loss is not supported with --selfkd {spec.name}: {needs.bce_refusal}')
    if aug_repeats and needs.own_batches and not needs.batches_over_index_sampler:
        raise UsageError(f'--aug-repeats cannot combine with --selfkd {spec.name}, which chooses its own batches')
    if isinstance(dataset, IterableDataset) and not needs.streamed_data:
        raise UsageError(f'--selfkd {spec.name} chooses its batches or reads sample indices, which a streamed data '
                         'set (wds/, hfids/, tfds/) cannot give; use a map-style data set')


@dataclass
class Attached:
    """What `attach` gives the loop: the loader to iterate, the stream that chooses its batches (None for a
    streamed data set, whose loader stays timm's) and the nominal steps per epoch."""
    loader: Any
    stream: Optional[BatchStream]
    steps_per_epoch: int


def _local_world_size(world_size: int) -> int:
    return int(os.environ.get('LOCAL_WORLD_SIZE', world_size))


def attach(task: SelfKDTask, *, loader, dataset: Dataset, batch_size: int, num_epochs: int, seed: int, rank: int = 0,
           world_size: int = 1, local_rank: int = 0, aug_repeats: float = 0, mixup: Optional[Any] = None) -> Attached:
    """Make a timm training loader read the task's batches, and tell the task the run's facts.

    The method's batch sampler (`Needs.own_batches`) or plain shuffled batches are wrapped in a `BatchStream`,
    which seeds every sample and can resume mid-epoch; the loader's `DataLoader` is rebuilt around it (transforms,
    collate, workers and prefetcher stay timm's). A method with `Needs.sample_indices` reads the stream's records;
    one with `Needs.mixup == 'task'` gets the batch-form `mixup`.
    """
    needs = task.needs
    stream = None
    if not isinstance(dataset, IterableDataset):
        indices = index_sampler(dataset, seed, rank, world_size, aug_repeats)
        if needs.own_batches:
            stream = BatchStream(task.batch_sampler(index_sampler=indices, labels=dataset_labels(dataset),
                                                    batch_size=batch_size, seed=seed, rank=rank,
                                                    world_size=world_size), seed, rank)
        else:
            stream = BatchStream.shuffled(indices, batch_size, seed, rank)
        stream.record = needs.sample_indices
        loader = read_through(loader, stream)
    if len(loader) == 0:
        raise UsageError(f'the training set ({len(dataset)} images, split over {world_size} process(es)) does not '
                         f'fill one batch of {batch_size}: lower -b')
    steps = stream.steps_per_epoch if stream is not None else len(loader)
    task.bind_run(RunInfo(
        num_epochs=num_epochs, steps_per_epoch=steps, num_samples=None if stream is None else len(dataset),
        num_classes=_num_classes(task), batch_size=batch_size, world_size=world_size, rank=rank,
        local_rank=local_rank, local_world_size=_local_world_size(world_size),
        mixup=mixup if needs.mixup == 'task' else None, batch_info=stream.pop if needs.sample_indices else None))
    return Attached(loader, stream, steps)


def _num_classes(task: SelfKDTask) -> Optional[int]:
    return getattr(task.get_eval_model(), 'num_classes', None)


def create_task(
        name: str,
        model: nn.Module,
        *,
        num_epochs: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        num_samples: Optional[int] = None,
        batch_size: Optional[int] = None,
        mixup: Optional[Any] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[torch.device] = None,
        **hparams,
) -> SelfKDTask:
    """The `timm.task.TrainingTask` of method `name` around `model`, ready for a loop of one's own.

    `out = task(images, labels)` returns `loss`, `output` and the named terms; a method that reads sample
    indices (PS-KD) is called as `task(images, labels, indices=...)` with `task.set_epoch(epoch)` every epoch,
    and a method that chooses its batches (DLB, BAKE, CS-KD, DDGSD) reads them from `batch_sampler(task, ...)`.
    A fact the method needs and was not given is a ValueError naming the argument.

    Args:
        name: A registered method (`list_methods()`), a stack `LAYOUT+METHOD`, or `none`.
        model: A timm model, already on `device`.
        num_epochs, steps_per_epoch, num_samples, batch_size: Facts of the run, where the method needs them
            (`task.needs.run_facts`): epochs, batches per epoch, training-set size, images per step.
        mixup: timm's `Mixup` (batch mode) when the loop mixes its batches: a method that mixes them itself (DLB)
            takes it; the others get mixed batches with soft targets from the loop (where they train on them).
        criterion_kwargs: Arguments for timm's `create_classification_loss` (e.g. `smoothing`); soft targets are
            on by default when `mixup` is given.
        device: Device of the task's state; defaults to the model's.
        **hparams: The method's hyper-parameters (`get_method(name).hparams_cls` fields); defaults are the paper's.
    """
    spec = get_method(name)
    values = build_hparams(spec, hparams)
    needs = spec.task_cls.requirements(values)
    facts = dict(num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, num_samples=num_samples,
                 batch_size=batch_size)
    for fact, why in needs.run_facts.items():
        if facts[fact] is None:
            raise ValueError(f'create_task({name!r}) needs {fact}=... ({why})')
    if mixup is not None and needs.mixup == 'refused':
        raise ValueError(f'{name} cannot train on mixed images: {needs.mixup_refusal}')
    if (criterion_kwargs or {}).get('loss_type') == 'bce' and needs.bce_refusal:
        raise ValueError(f'{name} cannot train with a BCE criterion: {needs.bce_refusal}')
    if batch_size is not None:
        spec.task_cls.check_setup(values, batch_size=batch_size)
    if mixup is not None and needs.mixup == 'loader':
        criterion_kwargs = {'soft_targets': True, **(criterion_kwargs or {})}
    task = spec.task_cls(model, values, criterion_kwargs=criterion_kwargs,
                         device=device if device is not None else next(model.parameters()).device)
    distributed = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    task.bind_run(RunInfo(**facts, num_classes=_num_classes(task), world_size=world_size, rank=rank,
                          local_rank=int(os.environ.get('LOCAL_RANK', rank)),  # one node without torchrun's
                          local_world_size=_local_world_size(world_size),      # variables (e.g. mp.spawn)
                          mixup=mixup if needs.mixup == 'task' else None))
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
    distributed = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    indices = index_sampler(_Labels(labels), seed, rank, world_size)
    if not task.needs.own_batches:
        return EpochBatchSampler(indices, batch_size)
    task.check_setup(task.method_hparams, batch_size=batch_size)
    return task.batch_sampler(index_sampler=indices, labels=list(labels), batch_size=batch_size, seed=seed,
                              rank=rank, world_size=world_size)


class _Labels(Dataset):
    """A data set of labels only, for the index samplers (which read its length)."""

    def __init__(self, labels: Sequence[int]):
        self.targets = list(labels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.targets[index]


def read_recipe_path(argv: Sequence[str]) -> str:
    """The `-c/--config` file named on a command line ('' without one): the one pre-parser of `-c`, for train.py
    and for timm scripts under the adapter."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    return config_parser.parse_known_args(list(argv))[0].config


def read_recipe(argv: Sequence[str]) -> Dict[str, Any]:
    """The YAML recipe of `-c` on a command line, as a mapping (empty without one)."""
    path = read_recipe_path(argv)
    if not path:
        return {}
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f'cannot read recipe {path!r}: {e.strerror}') from e
    except yaml.YAMLError as e:
        raise UsageError(f'recipe {path!r} is not valid YAML: {str(e).splitlines()[0]}') from e
    if not isinstance(recipe, dict):
        raise UsageError(f'recipe {path!r} must be a mapping of option names to values')
    return recipe
