"""The training loop of `train.py`, built from timm's library: one loop for plain training and every method.

Set-up order: arguments -> method and its checks -> device/DDP -> data -> model -> loaders -> task and its
batch stream -> optimizer, AMP, scheduler, resume, EMA, compile, DDP -> output folder. Every user error is
raised before the output folder exists, and is reported as one line with exit status 2.

The loop is preemption-safe: a SIGTERM or SIGINT ends the run after the current step with a recovery
checkpoint (exit 128 + signal), `--recovery-interval N` writes one every N steps, and `--resume` of any
checkpoint continues at its next step. Each step re-seeds every generator from (seed, rank, epoch, step) and
each image's augmentation is seeded from its key (`timm_selfkd.runtime.batch_stream`), so a resumed run is the run that
would have happened. A non-finite loss stops the run (or skips the step, `--nonfinite skip`).
"""
import dataclasses
import itertools
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml
from timm.data import create_loader, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.layers import convert_sync_batchnorm, set_fast_norm
from timm.models import clean_state_dict, create_model, load_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import evaluation_sample_limit
from timm.utils import (dispatch_clip_grad, distribute_bn, init_distributed_device, random_seed,
                        setup_default_logging)

from timm_selfkd.errors import UsageError
from timm_selfkd.cli import format_methods, parse_args, recipe_values
from timm_selfkd.options import mixup_arguments, model_arguments
from timm_selfkd.runtime.checkpoint import (AMP_SCALER_KEY, CheckpointWriteError, RunSaver, check_same_run,
                                             load_error, read_checkpoint)
from timm_selfkd.runtime.data import (build_dataset, class_count, dataset_class_map, unreadable_images,
                                       with_label_noise, worker_failure, worker_failures_found_by_the_loader,
                                       workers_ignore_stop_signals)
from timm_selfkd.runtime.progress import EpochClock, StepMeter
from timm_selfkd.runtime.run_folder import FolderLock, auto_resume, refuse_new_run
from timm_selfkd.runtime.run_guard import RunGuard, Verdict
from timm_selfkd.runtime.metrics import LOWER_IS_BETTER
from timm_selfkd.runtime.batch_stream import seed_everything, step_seed
from timm_selfkd.runtime.loss_ledger import LossLedger
from timm_selfkd.runtime.trackers import RunLog
from timm_selfkd.runtime.transforms import with_cutout, with_pad_crop
from timm_selfkd.wiring import MethodWiring

_logger = logging.getLogger('train')


def _fail(message: str, status: int = 2) -> None:
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(status)


def _resolve_lr(args) -> None:
    """timm's rule: without --lr, scale --lr-base by the global batch (sqrt for adaptive optimizers)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


@dataclass
class Position:
    """Where the run is: the epoch, the steps of it done, and what the epoch has accumulated so far.

    It is saved in every checkpoint (`loop`), so a resumed run continues the epoch and its averages exactly.
    """
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    batches: int = 0  # batches trained in the whole run (the guard's step numbers)
    ledger: LossLedger = field(default_factory=LossLedger)  # the epoch's loss terms, steps counted, images
    seconds: float = 0.0
    finished: bool = False  # all steps of the epoch trained (validation and its checkpoint follow)
    skipped: int = 0  # steps whose update --nonfinite skip left out (their terms are not in `sums`)
    rank_sums: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # every rank's, by `gather`

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step, self.ledger, self.seconds = epoch, 0, LossLedger(), 0.0
        self.finished, self.skipped = False, 0

    def gather(self, distributed: bool) -> None:
        """Collect every rank's loss sums for the next checkpoint (a collective: all ranks call it before a save)."""
        names = list(self.ledger.sums)  # the same terms on every rank
        if not names:
            self.rank_sums = {}
            return
        local = torch.stack([self.ledger.sums[name] for name in names])
        if distributed:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            local = torch.stack(parts)
        rows = local.reshape(-1, len(names)).cpu()
        self.rank_sums = {name: rows[:, i] for i, name in enumerate(names)}

    def state_dict(self) -> dict:
        """The position, with each rank's loss sums (from `gather`) as (world_size,) tensors."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ('ledger', 'rank_sums')}
        state.update(sums=self.rank_sums, counted=self.ledger.steps, images=self.ledger.images)
        return state

    @classmethod
    def from_state(cls, state: dict, device: torch.device, rank: int, world_size: int) -> 'Position':
        sums, counted, images = state.pop('sums'), state.pop('counted'), state.pop('images')
        if state['finished']:  # an epoch checkpoint: the next epoch starts with nothing summed, on any world size
            return cls(**state)
        written_by = {value.shape[0] for value in sums.values()} - {world_size}
        if written_by:
            raise UsageError(f'this recovery checkpoint was written by {written_by.pop()} processes and this run has '
                             f'{world_size}: resume it with as many, or resume the last epoch checkpoint '
                             '(last.pth.tar), which resumes on any number')
        return cls(**state, ledger=LossLedger({name: value[rank].to(device) for name, value in sums.items()},
                                              counted, images))


class Stopped(Exception):
    """The run stops early: `status` is the exit status, the message the one line to print."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ConstantLR:
    """The schedule of `--sched none`: the optimizer's lr throughout (timm's factory returns None)."""

    def step(self, epoch: int, metric: Optional[float] = None) -> None:
        pass

    def step_update(self, num_updates: int, metric: Optional[float] = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _criterion_kwargs(args) -> dict:
    """timm's `create_classification_loss` arguments: cross-entropy (label smoothing) or BCE (soft targets of
    mixed batches: `MethodWiring.create_task`)."""
    kwargs = dict(smoothing=args.smoothing)
    if args.bce_loss:
        kwargs.update(loss_type='bce', bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum,
                      pos_weight=args.bce_pos_weight)
    return kwargs


def _check_sync_bn(args, device: torch.device) -> None:
    """timm's `--sync-bn`: BatchNorm statistics synchronised across processes, which needs CUDA devices; in one
    process it has nothing to synchronise and does nothing (as in timm), so a node's recipe runs on a laptop."""
    if not args.sync_bn:
        return
    if not args.distributed:
        _logger.warning('--sync-bn does nothing in a single process (it synchronises BatchNorm across processes)')
    elif device.type != 'cuda':
        raise UsageError('--sync-bn needs CUDA devices (torch.nn.SyncBatchNorm does not run on the CPU)')


def _mean_lr(optimizer) -> float:
    """The learning rate timm's train.py reports: the mean over the parameter groups (which differ under
    --layer-decay)."""
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def _init_head(model, scale: Optional[float], bias: Optional[float]) -> None:
    """timm's --head-init-scale/--head-init-bias: rescale the classifier's initial weights, set its bias."""
    classifier = model.get_classifier() if (scale is not None or bias is not None) else None
    with torch.no_grad():
        if scale is not None:
            classifier.weight.mul_(scale)
            classifier.bias.mul_(scale)
        if bias is not None:
            classifier.bias.fill_(bias)


class Setup:
    """Everything the loop needs, built (and validated) before any file is written."""

    def __init__(self, args):
        self.args = args
        # built once by parse_args; taken off `args`, which checkpoints pickle (a plain timm checkpoint's entries)
        self.wiring = MethodWiring(args.selfkd, vars(args).pop('selfkd_hparams'))
        self.log = RunLog(args)  # summary.csv, wandb, TensorBoard (a missing package is an error here)
        if args.resume and args.initial_checkpoint:
            raise UsageError('--resume and --initial-checkpoint exclude each other (resume restores the weights)')
        checkpoint = read_checkpoint(args.resume) if args.resume else None
        if checkpoint is not None:
            check_same_run(checkpoint, args, args.resume)

        if args.device.startswith('cuda') and not torch.cuda.is_available():
            _logger.warning(f'--device {args.device} requested but CUDA is not available: using the CPU')
            args.device = 'cpu'
        self.device = init_distributed_device(args)
        _check_sync_bn(args, self.device)
        if self.device.type == 'cuda':  # as timm's train.py: fastest kernels for fixed shapes, TF32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        random_seed(args.seed, args.rank)
        self.amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if args.amp else nullcontext

        if args.in_chans is None and args.input_size:
            args.in_chans = args.input_size[0]
        self.train_dataset, self.eval_dataset = self._datasets()
        self.wiring.check(batch_size=args.batch_size, dataset=self.train_dataset, bce=args.bce_loss)
        self.model = self._create_model(class_count(self.train_dataset))
        self.data_config = resolve_data_config(vars(args), model=self.model)
        self.mixing = self.wiring.mixing(mixup_arguments(args, self.model.num_classes),
                                         prefetcher=not args.no_prefetcher, off_epoch=args.mixup_off_epoch)
        self.train_loader, self.eval_loader = self._loaders()
        # the loop erases on the batch, under the step's seed (the prefetcher would draw it a step early)
        self.random_erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount,
                                            device=self.device) if args.reprob > 0 and not args.no_prefetcher \
            and not args.no_aug else None

        self.task = self.wiring.create_task(self.model, mixed=self.mixing is not None, device=self.device,
                                            criterion_kwargs=_criterion_kwargs(args))
        attached = self.wiring.attach(self.task, loader=self.train_loader, dataset=self.train_dataset,
                                      batch_size=args.batch_size, num_epochs=args.epochs, seed=args.seed,
                                      aug_repeats=args.aug_repeats, mixing=self.mixing)
        self.train_loader, self.stream = attached.loader, attached.stream
        self.unreadable = unreadable_images(self.train_loader)
        self.steps_per_epoch = attached.steps_per_epoch  # nominal: DLB's first epoch is one step shorter
        _resolve_lr(args)
        self.optimizer = create_optimizer_v2(self.task.get_trainable_module(), **optimizer_kwargs(cfg=args),
                                             **args.opt_kwargs)  # as timm's train.py: --opt-kwargs reach the optimizer
        self.grad_scaler = torch.amp.GradScaler(self.device.type) \
            if args.amp and self.amp_dtype == torch.float16 and self.device.type == 'cuda' else None
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / args.grad_accum_steps)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args), updates_per_epoch=self.updates_per_epoch)
        if self.scheduler is None:  # --sched none
            self.scheduler, self.num_epochs = ConstantLR(), args.epochs
        self.position = Position()
        if checkpoint is not None:
            self._resume(checkpoint, args.resume)
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
            if checkpoint is not None and checkpoint.get('state_dict_ema') is not None:
                self.task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict_ema']),
                                                checkpoint.get('task_state_ema'), ema=True)
        if args.torchcompile:
            self.task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
            if args.model_ema:
                self.task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.distributed:
            self.task.prepare_distributed(device_ids=[args.local_rank] if self.device.type == 'cuda' else None,
                                          broadcast_buffers=not args.no_ddp_bb)
        self.check_interval = args.check_interval or (1 if self.device.type == 'cpu' else 20)
        # fp16 loss scaling skips overflowing steps by design; otherwise one non-finite step is divergence
        patient = self.grad_scaler is not None or args.nonfinite == 'skip'
        self.guard = RunGuard(self.device, args.distributed, patience=args.nonfinite_patience if patient else 1)

    def _create_model(self, num_labels: Optional[int]):
        """timm's model; without --num-classes, as many classes as the training set has."""
        args = self.args
        if args.drop_path is not None and not 0 <= args.drop_path < 1:
            raise UsageError(f'--drop-path (the stochastic-depth rate) must be in [0, 1), got {args.drop_path}')
        if args.num_classes is None and num_labels is not None and not args.pretrained:
            args.num_classes = num_labels
        if args.fast_norm:
            set_fast_norm()
        kwargs = model_arguments(args)
        if args.pretrained_path:  # a local file as the pretrained weights; the head adapts to num_classes
            kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
        try:
            model = create_model(args.model, pretrained=args.pretrained, drop_rate=args.drop, **kwargs)
        except (RuntimeError, TypeError) as e:  # unknown model, or --model-kwargs it does not take
            raise UsageError(str(e).splitlines()[0]) from e
        _init_head(model, args.head_init_scale, args.head_init_bias)
        if num_labels is not None and num_labels > model.num_classes:
            raise UsageError(f'the data set has {num_labels} classes but the model has {model.num_classes} '
                             '(set --num-classes)')
        args.num_classes = model.num_classes
        if args.initial_checkpoint:
            try:
                load_checkpoint(model, args.initial_checkpoint)
            except FileNotFoundError as e:
                raise UsageError(f'initial checkpoint {args.initial_checkpoint!r} does not exist') from e
            except RuntimeError as e:
                raise UsageError(f'initial checkpoint {args.initial_checkpoint!r} does not fit {args.model} with '
                                 f'{model.num_classes} classes: {load_error(e)}') from e
        if args.grad_checkpointing:
            model.set_grad_checkpointing(enable=True)
        if args.sync_bn and args.distributed:
            model = convert_sync_batchnorm(model)
        model.to(self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _datasets(self):
        args = self.args
        root = args.data_dir or args.data
        common = dict(name=args.dataset, root=root, in_chans=args.in_chans or 3, download=args.dataset_download,
                      seed=args.seed, class_map=args.class_map, input_img_mode=args.input_img_mode,
                      input_key=args.input_key, target_key=args.target_key,
                      trust_remote_code=args.dataset_trust_remote_code)
        train = build_dataset(split=args.train_split, is_training=True, subset=args.train_subset,
                              num_samples=args.train_num_samples, **common)
        evaluation = build_dataset(split=args.val_split, is_training=False, subset=args.val_subset,
                                   num_samples=args.val_num_samples, train_classes=dataset_class_map(train), **common)
        if args.train_label_noise:
            train = with_label_noise(train, args.train_label_noise, args.seed)
        return train, evaluation

    def _loaders(self):
        args, cfg = self.args, self.data_config
        common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'],
                      std=cfg['std'], num_workers=args.workers, distributed=args.distributed,
                      pin_memory=args.pin_mem, device=self.device, use_prefetcher=not args.no_prefetcher)
        train_loader = create_loader(
            self.train_dataset, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
            re_prob=0. if not args.no_prefetcher else args.reprob, re_mode=args.remode, re_count=args.recount,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
            gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
            train_crop_mode=None if args.train_crop_mode == 'pad' else args.train_crop_mode,
            collate_fn=self.mixing.collate_fn if self.mixing is not None else None,
            **{**common, 'interpolation': args.train_interpolation})
        if args.train_crop_mode == 'pad':
            train_loader.dataset.transform = with_pad_crop(train_loader.dataset.transform, cfg['input_size'][-2:],
                                                           args.train_crop_padding, args.train_interpolation)
        if args.cutout and not args.no_aug:
            train_loader.dataset.transform = with_cutout(train_loader.dataset.transform, args.cutout, cfg['mean'])
        eval_loader = create_loader(self.eval_dataset, batch_size=args.validation_batch_size or args.batch_size,
                                    is_training=False, crop_pct=cfg['crop_pct'], **common)
        # stop signals sent to the process group are the main process's to act on (a streamed training set's
        # loader stays this one; `MethodWiring.attach` rebuilds the others, keeping the workers' init)
        return workers_ignore_stop_signals(train_loader), workers_ignore_stop_signals(eval_loader)

    def _resume(self, checkpoint: dict, path: str) -> None:
        """Restore weights, task state, optimizer, loss scaler, scheduler and the loop's position."""
        args = self.args
        try:
            self.task.load_checkpoint_state(clean_state_dict(checkpoint['state_dict']), checkpoint.get('task_state'))
        except RuntimeError as e:
            raise UsageError(f'checkpoint {path!r} does not fit {args.model} with {self.model.num_classes} classes: '
                             f'{load_error(e)}') from e
        if not args.no_resume_opt:
            try:
                self.optimizer.load_state_dict(checkpoint['optimizer'])
            except (ValueError, KeyError) as e:
                raise UsageError(f'the optimizer state in {path!r} does not fit --opt {args.opt}: {e}') from e
            if self.grad_scaler is not None and AMP_SCALER_KEY in checkpoint:
                self.grad_scaler.load_state_dict(checkpoint[AMP_SCALER_KEY])
        loop = checkpoint.get('loop')
        if loop is None:  # a checkpoint of timm's train.py (or an older release): the next epoch, from its start
            self.position = Position(epoch=checkpoint.get('epoch', -1) + 1)
            self.position.num_updates = self.position.epoch * self.updates_per_epoch
        else:
            self.position = Position.from_state(loop['position'], self.device, args.rank, args.world_size)
            self.scheduler.load_state_dict(loop['scheduler'])
            self.log.load_state_dict(loop.get('log', {}))  # the wandb run to continue
        saved = checkpoint.get('args')
        layout = (getattr(saved, 'world_size', args.world_size), getattr(saved, 'batch_size', args.batch_size))
        if layout != (args.world_size, args.batch_size):
            if not self.position.finished and self.position.step and layout[1] != args.batch_size:
                raise UsageError(f'this recovery checkpoint was written with -b {layout[1]} per process and this run '
                                 f'has -b {args.batch_size}: its next step is another batch; resume it with -b '
                                 f'{layout[1]}, or resume the last epoch checkpoint (last.pth.tar)')
            if args.rank == 0:
                _logger.warning(f'resuming {path}, written by {layout[0]} process(es) with -b {layout[1]}, on '
                                f'{args.world_size} with -b {args.batch_size}: the batches differ from here on, so the '
                                'run is not bit-identical to one that kept the same; per-process method state that '
                                'does not fit is dropped (see the method\'s own line)')
        if self.position.finished:  # an epoch checkpoint: the next epoch
            self.position.start_epoch(self.position.epoch + 1)
        if args.no_resume_opt or loop is None:  # the lr comes from the schedule, not the saved optimizer
            self.scheduler.step(self.position.epoch)
            self.scheduler.step_update(self.position.num_updates)
        if args.rank == 0:
            done = '; every epoch is trained, nothing is left to do' if self.position.epoch >= self.num_epochs else ''
            _logger.info(f'Resumed {path} at epoch {self.position.epoch}, step {self.position.step}{done}')

    def loop_state(self) -> dict:
        """What a checkpoint needs beyond timm's entries (see `timm_selfkd.runtime.checkpoint`)."""
        return {'position': self.position.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'log': self.log.state_dict()}


def epoch_metrics(s: Setup) -> Dict[str, float]:
    """The epoch's mean loss terms (over its counted steps and all ranks), images, steps and time."""
    p = s.position
    metrics = p.ledger.epoch_metrics(s.device, s.args.distributed)
    metrics['steps'] = p.step
    if p.skipped:
        metrics['skipped'] = p.skipped
    metrics['time'] = p.seconds
    return metrics


class Run:
    """The loop: training epochs, validation, checkpoints, and the early stops of `RunGuard`."""

    def __init__(self, s: Setup, saver: Optional[RunSaver], output_dir: Optional[str], resume_command: List[str]):
        self.s = s
        self.saver = saver
        self.output_dir = output_dir
        self.resume_command = resume_command
        self.last_checkpoint = s.args.resume or ''
        self.epoch_steps = s.steps_per_epoch  # steps of the current epoch
        self.meter = StepMeter(s.args.world_size)
        self.clock = EpochClock(s.num_epochs)

    def train_one_epoch(self) -> None:
        """Train the rest of the current epoch. Loss terms stay on the device between log intervals."""
        s, args, task, p = self.s, self.s.args, self.s.task, self.s.position
        task.train()
        if s.mixing is not None:
            s.mixing.set_epoch(p.epoch)
        if s.stream is not None:
            s.stream.start_at(p.epoch, p.step)
        elif hasattr(s.train_dataset, 'set_epoch'):  # a streamed data set shuffles per epoch itself
            s.train_dataset.set_epoch(p.epoch)
        self.epoch_steps = steps = len(s.train_loader)
        accum = args.grad_accum_steps
        start = time.time() - p.seconds
        for input, target in self.meter.batches(s.train_loader):
            unreadable = s.unreadable.rows() if s.unreadable is not None else 0
            seed_everything(step_seed(args.seed, args.rank, p.epoch, p.step))
            if args.no_prefetcher:
                input, target = input.to(s.device), target.to(s.device)
                if s.mixing is not None:
                    input, target = s.mixing.mix(input, target)
            if s.random_erasing is not None:
                input = s.random_erasing(input)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            group = p.step // accum * accum  # first batch of this update's accumulation group
            update = p.step + 1 == min(group + accum, steps)
            with task.no_sync() if args.distributed and not update else nullcontext():
                with s.autocast():
                    out = task(input, target)
                terms = {name: value for name, value in out.items() if name.startswith('loss')}
                bad = s.guard.observe(p.batches, terms)
                if args.nonfinite == 'skip' and s.guard.agree_bad(bad):
                    p.skipped += 1
                else:
                    loss = out['loss'] / (min(group + accum, steps) - group)
                    (s.grad_scaler.scale(loss) if s.grad_scaler is not None else loss).backward()
                    p.ledger.add(terms, input.shape[0] - unreadable)
            if update:
                self._optimizer_step()
                p.num_updates += 1
                task.update_ema(step=p.num_updates)
                s.scheduler.step_update(num_updates=p.num_updates)
                if args.synchronize_step and s.device.type == 'cuda':
                    torch.cuda.synchronize()
            p.step += 1
            p.batches += 1
            p.seconds = time.time() - start
            self.meter.count(input.shape[0])
            if args.rank == 0 and ((p.step - 1) % args.log_interval == 0 or p.step == steps):
                sums = p.ledger.host_sums()  # the line's one read of the device
                _logger.info(f'Train {p.epoch} [{p.step:>4d}/{steps} {100 * p.step / steps:3.0f}%]  '
                             f'{p.ledger.text(sums)}  lr {_mean_lr(s.optimizer):.3e}  {self.meter.text()}  '
                             f'{p.seconds:.1f}s')
                s.log.step(p.epoch, p.batches, p.ledger, sums)
            if not update:  # checks and checkpoints only between optimizer updates
                continue
            # the epoch's last step is followed by validation and the epoch checkpoint, which serves as recovery
            updates = -(-p.step // accum)
            recovery_due = bool(args.recovery_interval) and updates % args.recovery_interval == 0 and p.step < steps
            if recovery_due or updates % s.check_interval == 0 or p.step == steps:
                verdict = self.check()
                stop = verdict.signum and p.step < steps
                if recovery_due or stop:
                    self.save_recovery()
                if stop:
                    self.stop(verdict.signum)
        p.finished = True

    def _optimizer_step(self) -> None:
        """Clip (unscaled) gradients, step (through the fp16 loss scaler if any), clear the gradients."""
        s, args = self.s, self.s.args
        if s.grad_scaler is not None and args.clip_grad is not None:
            s.grad_scaler.unscale_(s.optimizer)
        if args.clip_grad is not None:
            dispatch_clip_grad(s.task.get_clip_parameters(exclude_head='agc' in args.clip_mode), args.clip_grad,
                               mode=args.clip_mode)
        if s.grad_scaler is not None:
            s.grad_scaler.step(s.optimizer)
            s.grad_scaler.update()
        else:
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)

    def check(self) -> Verdict:
        """Poll the guard (every rank); a divergence ends the run here, with the epoch's partial row in the
        summary."""
        verdict = self.s.guard.poll()
        if verdict.bad_step is None:
            return verdict
        p = self.s.position
        step = p.step - (p.batches - verdict.bad_step) + 1  # 1-based; a poll ends every epoch: this one
        metrics = epoch_metrics(self.s)
        if self.s.args.rank == 0:
            self.write_summary(metrics, {}, status='diverged')
        raise Stopped(1, f'error: {verdict.bad_term} is not finite at epoch {p.epoch} step {step}/{self.epoch_steps}: '
                         f'the run diverged; last good checkpoint: {self.last_checkpoint or "none"}')

    def save_recovery(self) -> None:
        """A recovery checkpoint at the current step (a collective: every rank calls it)."""
        self.s.task.sync_task_state()
        self.s.position.gather(self.s.args.distributed)
        if self.saver is not None:
            self.save(lambda: self.saver.save_recovery(self.s.position.epoch, batch_idx=self.s.position.step))
            self.last_checkpoint = self.saver.curr_recovery_file

    def save(self, write: Callable[[], Any]) -> Any:
        """Run a write into the run's folder; a failed one (full disk, no permission, a vanished folder, a lost mount)
        ends the run with one line."""
        try:
            return write()
        except OSError as e:  # CheckpointWriteError: the file, the bytes it needs, the free space
            what = str(e) if isinstance(e, CheckpointWriteError) else \
                f'cannot write {e.filename or "in " + self.output_dir}: {e.strerror or e}'
            intact = self.last_checkpoint if self.last_checkpoint and os.path.isfile(self.last_checkpoint) else 'none'
            raise Stopped(1, f'error: {what}; the previous checkpoint is intact: {intact}') from e

    def stop(self, signum: int) -> None:
        """End the run after a stop request, naming the checkpoint just written and the command to resume it."""
        p = self.s.position
        command = shlex.join(self.resume_command + ['--resume', self.last_checkpoint])
        raise Stopped(128 + signum, f'stopped by {signal.Signals(signum).name} at epoch {p.epoch} step '
                                    f'{p.step}/{self.epoch_steps}; checkpoint {self.last_checkpoint}; '
                                    f'resume with: {command}')

    @torch.no_grad()
    def validate(self, ema: bool = False) -> Dict[str, float]:
        """Top-1/top-5 and loss of the bare timm model (or its EMA) on the evaluation set."""
        s = self.s
        model = s.task.get_eval_model(ema=ema)
        model.eval()
        forward = s.task.eval_forward(ema=ema)  # the model, or what the task's evaluator needs besides its logits
        evaluator = s.task.create_evaluator(max_samples=evaluation_sample_limit(s.eval_loader))
        for input, target in s.eval_loader:
            if s.args.no_prefetcher:
                input, target = input.to(s.device), target.to(s.device)
            with s.autocast():
                output = forward(input)
            evaluator.update(output, target)
        return evaluator.compute(distributed=s.args.distributed)

    def write_summary(self, train_metrics: Dict[str, float], eval_metrics: Dict[str, float], status: str,
                      lr: Optional[float] = None) -> None:
        """The epoch's row to summary.csv and the trackers (`status`: ok, or diverged for a run the guard
        stopped)."""
        row = OrderedDict(epoch=self.s.position.epoch)
        row.update((f'train_{k}', v) for k, v in train_metrics.items())
        row.update((f'eval_{k}', v) for k, v in eval_metrics.items())
        row['lr'] = lr if lr is not None else self.s.optimizer.param_groups[0]['lr']
        row['status'] = status
        self.s.log.epoch(row)

    def run(self) -> None:
        s, args = self.s, self.s.args
        best = None
        while s.position.epoch < s.num_epochs:
            self.clock.start(s.position.seconds)
            self.train_one_epoch()
            train_metrics = epoch_metrics(s)
            if args.distributed and args.dist_bn and not args.sync_bn:  # one set of BatchNorm statistics
                for ema in (False, True) if args.model_ema else (False,):
                    distribute_bn(s.task.get_eval_model(ema=ema), args.world_size, args.dist_bn == 'reduce')
            eval_metrics = {}
            if (s.position.epoch + 1) % args.val_interval == 0 or s.position.epoch + 1 == s.num_epochs:
                eval_metrics = self.validate()
                if args.model_ema:
                    eval_metrics.update({f'ema_{k}': v for k, v in self.validate(ema=True).items()})
            metric = eval_metrics.get(args.eval_metric)
            lr = _mean_lr(s.optimizer)  # the epoch's, before the scheduler sets the next one
            s.scheduler.step(s.position.epoch + 1, metric)
            s.task.sync_task_state()
            s.position.gather(args.distributed)
            if args.rank == 0:
                if eval_metrics:
                    _logger.info(f'Eval {s.position.epoch}: ' +
                                 '  '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
                self.save(lambda: self.write_summary(train_metrics, eval_metrics, 'ok', lr=lr))
                best = self.save(lambda: self.saver.save_checkpoint(s.position.epoch, metric=metric))
                self.last_checkpoint = os.path.join(self.output_dir, 'last.pth.tar')
                _logger.info(self.clock.end(s.position.epoch, s.position.seconds))
            verdict = s.guard.poll()  # a stop request during the epoch's last step or validation
            if verdict.signum and s.position.epoch + 1 < s.num_epochs:
                self.stop(verdict.signum)
            s.position.start_epoch(s.position.epoch + 1)
        if args.rank == 0 and best is not None and best[0] is not None:
            _logger.info(f'*** Best {args.eval_metric}: {best[0]:.4f} (epoch {best[1]})')


def _named_folder(args) -> Optional[str]:
    """The run's folder when the command names it (`--output`/`--experiment`); None for a new time-stamped one."""
    return os.path.join(args.output or './output/train', args.experiment) if args.experiment else None


def _resolve_resume(args) -> None:
    """Before anything is built: `--resume auto` becomes the checkpoint it continues ('' to start the run), and a
    new run into a folder that holds a run is refused (`timm_selfkd.runtime.run_folder`)."""
    folder = _named_folder(args)
    if args.resume == 'auto':
        if folder is None:
            raise UsageError('--resume auto needs --experiment NAME: it continues the run in --output/NAME')
        args.resume = auto_resume(folder)
        if args.resume and args.initial_checkpoint:  # the same command, requeued: the weights are the checkpoint's
            args.initial_checkpoint = ''
    elif not args.resume and folder is not None:
        refuse_new_run(folder)


def _output_dir(args) -> Tuple[str, bool]:
    """The run's folder and whether this call created it: the named one, or a new time-stamped one (made with an
    exclusive mkdir, so that two runs started in the same second get two)."""
    folder = _named_folder(args)
    if folder is not None:
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        return folder, created
    parent = args.output or './output/train'
    name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'), args.selfkd,
                     str(args.input_size[-1] if args.input_size else args.img_size or 'default')])
    os.makedirs(parent, exist_ok=True)
    for suffix in itertools.count():
        path = os.path.join(parent, f'{name}-{suffix}' if suffix else name)
        try:
            os.mkdir(path)
            return path, True
        except FileExistsError:
            continue


def _prepare_output(args, recipe: dict) -> Tuple[str, FolderLock]:
    """Create the run's folder, hold it (`FolderLock`: a second run into it is refused) and write `args.yaml`; an
    unwritable place is a one-line error, and a folder this call created is removed again."""
    parent = args.output or './output/train'
    output_dir, created = None, False
    try:
        output_dir, created = _output_dir(args)
        lock = FolderLock(output_dir)
        lock.acquire()  # another run's hold on the folder: a UsageError, the folder left as it is
    except OSError as e:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise UsageError(f'cannot write the output folder under {parent!r}: {e.strerror or e}') from e
    try:
        if not args.resume:
            refuse_new_run(output_dir)  # a run that ended in it since `_resolve_resume` looked
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
    except (OSError, UsageError) as e:
        lock.release()
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        if isinstance(e, UsageError):
            raise
        raise UsageError(f'cannot write the output folder under {parent!r}: {e.strerror or e}') from e
    return output_dir, lock


def _resume_command(argv: List[str], args, output_dir: str) -> List[str]:
    """The command that continues this run in the same folder (`--resume` appended by the caller)."""
    dropped = {'--resume', '--output', '--experiment'}
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in dropped:
            skip = True
        elif not any(item.startswith(flag + '=') for flag in dropped):
            kept.append(item)
    launcher = ['python', 'train.py']
    if args.distributed:
        local = int(os.environ.get('LOCAL_WORLD_SIZE', args.world_size))
        launcher = ['torchrun', f'--nproc_per_node={local}'] + \
                   ([f'--nnodes={args.world_size // local}'] if args.world_size > local else []) + ['train.py']
    return launcher + kept + ['--output', os.path.dirname(output_dir), '--experiment', os.path.basename(output_dir)]


def _steps_announced(s: Setup) -> str:
    """The steps per epoch, and the first epoch's where they differ (DLB's first batch has no repeated half)."""
    first = len(s.train_loader)  # the stream's epoch 0
    text = f'{s.steps_per_epoch} steps per epoch'
    return text + (f' ({first} in epoch 0)' if s.position.epoch == 0 and first != s.steps_per_epoch else '')


def main(argv: Optional[list] = None) -> None:
    setup_default_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list_selfkd:
        print(format_methods())
        return
    recipe = recipe_values(args)  # as given, before Setup resolves the lr, device and class count
    output_dir, lock = None, None
    try:
        _resolve_resume(args)
        s = Setup(args)
        if args.rank == 0:
            output_dir, lock = _prepare_output(args, recipe)
        s.log.start(output_dir, config=dict(recipe_values(args), selfkd_hparams=dataclasses.asdict(s.wiring.hparams)))
    except (ValueError, FileNotFoundError) as e:  # UsageError, DatasetNotFoundError, a method's own checks
        if lock is not None:
            lock.release()
        _fail(str(e))

    try:
        saver = None
        if args.rank == 0:
            saver = RunSaver(model=s.task.get_eval_model(), optimizer=s.optimizer, args=args, task=s.task,
                             amp_scaler=s.grad_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                             decreasing=args.eval_metric in LOWER_IS_BETTER, max_history=args.checkpoint_hist,
                             loop_state=s.loop_state)
            if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
                saver.load_state_dict_from_checkpoint(args.resume)  # keep ranking the checkpoints of this folder
            _logger.info(f'{args.selfkd}: {s.wiring.hparams}; data {s.data_config}; {_steps_announced(s)}; '
                         f'output {output_dir}')
        run = Run(s, saver, output_dir, _resume_command(argv, args, output_dir) if args.rank == 0 else [])
        s.guard.install()
        with worker_failures_found_by_the_loader(), s.log:  # the trackers end with the run's status
            run.run()
    except Stopped as stop:
        if args.rank == 0:
            print(f'train.py: {stop}', file=sys.stderr, flush=True)
        sys.exit(stop.status)
    except Exception as e:  # a worker killed (OOM killer, SIGKILL) is one error line; anything else propagates
        failure = worker_failure(e)
        if failure is None:
            raise
        print(f'train.py: error: {failure}; last checkpoint: {run.last_checkpoint or "none"}', file=sys.stderr,
              flush=True)
        sys.exit(1)
    finally:
        s.guard.uninstall()
        if lock is not None:
            lock.release()
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()
