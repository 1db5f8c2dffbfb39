"""The training loop of `train.py`, built from timm's library: one loop for plain training and every method.

Set-up order: arguments -> method and its checks -> device/DDP -> data -> model -> loaders -> task ->
optimizer, AMP, resume, EMA, compile, DDP -> scheduler -> output folder. Every user error is raised before the output folder
exists, and is reported as one line with exit status 2.
"""
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from typing import Dict, Optional

import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup, FastCollateMixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint, evaluation_sample_limit
from timm.utils import (CheckpointSaver, NativeScaler, dispatch_clip_grad, get_outdir, init_distributed_device,
                        random_seed, setup_default_logging, update_summary)

from .args import UsageError, format_methods, method_hparams, parse_args, recipe_values
from .data import build_dataset, class_count, dataset_labels, index_sampler, replace_batch_sampler, set_loader_epoch
from .registry import get_method

_logger = logging.getLogger('train')


def _fail(message: str) -> None:
    print(f'train.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def _resolve_lr(args) -> None:
    """timm's rule: without --lr, scale --lr-base by the global batch (sqrt for adaptive optimizers)."""
    if args.lr is not None:
        return
    global_batch = args.batch_size * args.world_size
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _mixup(args, num_classes: int):
    """timm's Mixup/CutMix (collate or batch form), or None when off."""
    if not _mixup_active(args):
        return None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
    return FastCollateMixup(**mixup_args) if not args.no_prefetcher else Mixup(**mixup_args)


class Setup:
    """Everything the loop needs, built (and validated) before any file is written."""

    def __init__(self, args):
        self.args = args
        self.spec = get_method(args.selfkd)
        self.hparams = method_hparams(args)
        self.spec.task_cls.check_setup(self.hparams, batch_size=args.batch_size, mixup=_mixup_active(args))

        if args.device.startswith('cuda') and not torch.cuda.is_available():
            _logger.warning(f'--device {args.device} requested but CUDA is not available: using the CPU')
            args.device = 'cpu'
        self.device = init_distributed_device(args)
        if args.sync_bn and self.device.type != 'cuda':
            raise UsageError('--sync-bn needs CUDA devices (torch.nn.SyncBatchNorm does not run on the CPU)')
        random_seed(args.seed, args.rank)
        self.amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if args.amp else nullcontext

        if args.in_chans is None and args.input_size:
            args.in_chans = args.input_size[0]
        self.train_dataset, self.eval_dataset = self._datasets()
        self.model = self._create_model(class_count(self.train_dataset))
        self.data_config = resolve_data_config(vars(args), model=self.model)
        self.mixup = _mixup(args, self.model.num_classes)
        self.train_loader, self.eval_loader = self._loaders()

        self.task = self.spec.task_cls(
            self.model, self.hparams, device=self.device,
            criterion_kwargs=dict(smoothing=args.smoothing, soft_targets=self.mixup is not None))
        if self.batch_sampler is not None:
            self.task.bind_batch_sampler(self.batch_sampler)
        _resolve_lr(args)
        self.optimizer = create_optimizer_v2(self.task.get_trainable_module(), **optimizer_kwargs(cfg=args))
        self.loss_scaler = NativeScaler(device=self.device.type) \
            if args.amp and self.amp_dtype == torch.float16 and self.device.type == 'cuda' else None
        self.start_epoch = 0
        if args.resume:
            if not os.path.isfile(args.resume):
                raise UsageError(f'checkpoint to resume {args.resume!r} does not exist')
            resumed = resume_task_checkpoint(self.task, args.resume, None if args.no_resume_opt else self.optimizer,
                                             self.loss_scaler, log_info=args.rank == 0)
            self.start_epoch = resumed or 0
        if args.model_ema:
            self.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
            if args.resume:
                load_task_ema_checkpoint(self.task, args.resume)
        if args.torchcompile:
            self.task.compile(backend=args.torchcompile)
            if args.model_ema:
                self.task.compile_ema(backend=args.torchcompile)
        if args.distributed:
            self.task.prepare_distributed(device_ids=[args.local_rank] if self.device.type == 'cuda' else None)

        set_loader_epoch(self.train_loader, self.start_epoch)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args), updates_per_epoch=len(self.train_loader))
        if self.start_epoch > 0 and args.sched_on_updates:
            self.scheduler.step_update(self.start_epoch * len(self.train_loader))
        elif self.start_epoch > 0:
            self.scheduler.step(self.start_epoch)

    def _create_model(self, num_labels: Optional[int]):
        """timm's model; without --num-classes, as many classes as the training set has."""
        args = self.args
        if args.num_classes is None and num_labels is not None and not args.pretrained:
            args.num_classes = num_labels
        kwargs = dict(args.model_kwargs)
        for key, value in (('num_classes', args.num_classes), ('in_chans', args.in_chans),
                           ('drop_path_rate', args.drop_path)):
            if value is not None:
                kwargs[key] = value
        try:
            model = create_model(args.model, pretrained=args.pretrained, drop_rate=args.drop, **kwargs)
        except (RuntimeError, TypeError) as e:  # unknown model, or --model-kwargs it does not take
            raise UsageError(str(e).splitlines()[0]) from e
        if num_labels is not None and num_labels > model.num_classes:
            raise UsageError(f'the data set has {num_labels} classes but the model has {model.num_classes} '
                             '(set --num-classes)')
        args.num_classes = model.num_classes
        if args.sync_bn and args.distributed:
            model = convert_sync_batchnorm(model)
        return model.to(self.device)

    def _datasets(self):
        args = self.args
        root = args.data_dir or args.data
        common = dict(name=args.dataset, root=root, in_chans=args.in_chans or 3, download=args.dataset_download, seed=args.seed)
        train = build_dataset(split=args.train_split, is_training=True, subset=args.train_subset, **common)
        evaluation = build_dataset(split=args.val_split, is_training=False, subset=args.val_subset, **common)
        return train, evaluation

    def _loaders(self):
        args, cfg = self.args, self.data_config
        common = dict(input_size=cfg['input_size'], interpolation=cfg['interpolation'], mean=cfg['mean'],
                      std=cfg['std'], num_workers=args.workers, distributed=args.distributed,
                      pin_memory=args.pin_mem, device=self.device, use_prefetcher=not args.no_prefetcher)
        train_loader = create_loader(
            self.train_dataset, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            train_crop_mode=None, collate_fn=self.mixup if isinstance(self.mixup, FastCollateMixup) else None,
            **{**common, 'interpolation': args.train_interpolation})
        self.batch_sampler = self.spec.task_cls.batch_sampler(
            self.hparams, index_sampler=index_sampler(self.train_dataset, args.seed, args.rank,
                                                             args.world_size),
            labels=dataset_labels(self.train_dataset), batch_size=args.batch_size, seed=args.seed,
            rank=args.rank, world_size=args.world_size)
        if self.batch_sampler is not None:
            train_loader = replace_batch_sampler(train_loader, self.batch_sampler)
        eval_loader = create_loader(self.eval_dataset, batch_size=args.validation_batch_size or args.batch_size,
                                    is_training=False, crop_pct=cfg['crop_pct'], **common)
        return train_loader, eval_loader


def _reduce_mean(values: Dict[str, torch.Tensor], distributed: bool) -> Dict[str, float]:
    """Average each accumulated device tensor over the ranks and read it on the host (one sync)."""
    names = list(values)
    stacked = torch.stack([values[n].float() for n in names])
    if distributed:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return OrderedDict(zip(names, stacked.tolist()))


def train_one_epoch(epoch: int, s: Setup, num_updates: int):
    """One pass over the training loader; returns (metrics, num_updates). Loss terms stay on the device
    between log intervals, so the loop never waits for the device."""
    args, task = s.args, s.task
    task.train()
    if s.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if hasattr(s.train_loader, 'mixup_enabled'):
            s.train_loader.mixup_enabled = False
        else:
            s.mixup.mixup_enabled = False
    sums: Dict[str, torch.Tensor] = {}
    images = 0
    steps = len(s.train_loader)
    start = time.time()
    for step, (input, target) in enumerate(s.train_loader):
        if args.no_prefetcher:
            input, target = input.to(s.device), target.to(s.device)
            if s.mixup is not None:
                input, target = s.mixup(input, target)
        with s.autocast():
            out = task(input, target)
        loss = out['loss']
        s.optimizer.zero_grad(set_to_none=True)
        if s.loss_scaler is not None:
            s.loss_scaler(loss, s.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                          parameters=task.get_clip_parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(task.get_clip_parameters(), args.clip_grad, mode=args.clip_mode)
            s.optimizer.step()
        num_updates += 1
        task.update_ema(step=num_updates)
        s.scheduler.step_update(num_updates=num_updates)
        for name, value in out.items():
            if name.startswith('loss'):
                sums[name] = sums.get(name, 0) + value.detach().float()
        images += input.shape[0]
        if args.rank == 0 and (step % args.log_interval == 0 or step == steps - 1):
            terms = '  '.join(f'{n} {float(v) / (step + 1):.4f}' for n, v in sums.items())
            _logger.info(f'Train {epoch} [{step + 1:>4d}/{steps}]  {terms}  '
                         f'lr {s.optimizer.param_groups[0]["lr"]:.3e}  {(time.time() - start):.1f}s')
    metrics = _reduce_mean({n: v / steps for n, v in sums.items()}, args.distributed)
    totals = _reduce_mean({'images': torch.tensor(float(images), device=s.device)}, args.distributed)
    metrics['images'] = totals['images'] * args.world_size
    metrics['steps'] = steps
    metrics['time'] = time.time() - start
    return metrics, num_updates


@torch.no_grad()
def validate(s: Setup, ema: bool = False) -> Dict[str, float]:
    """Top-1/top-5 and loss of the bare timm model (or its EMA) on the evaluation set."""
    model = s.task.get_eval_model(ema=ema)
    model.eval()
    evaluator = s.task.create_evaluator(max_samples=evaluation_sample_limit(s.eval_loader))
    for input, target in s.eval_loader:
        if s.args.no_prefetcher:
            input, target = input.to(s.device), target.to(s.device)
        with s.autocast():
            output = model(input)
        evaluator.update(output, target)
    return evaluator.compute(distributed=s.args.distributed)


def _output_dir(args) -> str:
    name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model.replace('/', '_'),
                                        args.selfkd, str(args.input_size[-1] if args.input_size else
                                                         args.img_size or 'default')])
    return get_outdir(args.output or './output/train', name, inc=not args.experiment)


def main(argv: Optional[list] = None) -> None:
    setup_default_logging()
    args = parse_args(argv)
    if args.list_selfkd:
        print(format_methods())
        return
    recipe = recipe_values(args)  # as given, before Setup resolves the lr, device and class count
    try:
        s = Setup(args)
    except (ValueError, FileNotFoundError) as e:  # UsageError, DatasetNotFoundError, a method's own checks
        _fail(str(e))

    saver, output_dir = None, None
    if args.rank == 0:
        output_dir = _output_dir(args)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
        saver = CheckpointSaver(model=s.task.get_eval_model(), optimizer=s.optimizer, args=args, task=s.task,
                                amp_scaler=s.loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
        _logger.info(f'{args.selfkd}: {s.hparams}; data {s.data_config}; '
                     f'{len(s.train_loader)} steps per epoch; output {output_dir}')

    num_updates = s.start_epoch * len(s.train_loader)
    best = None
    for epoch in range(s.start_epoch, s.num_epochs):
        set_loader_epoch(s.train_loader, epoch)
        train_metrics, num_updates = train_one_epoch(epoch, s, num_updates)
        eval_metrics = validate(s)
        if args.model_ema:
            eval_metrics.update({f'ema_{k}': v for k, v in validate(s, ema=True).items()})
        s.task.sync_task_state()
        if args.rank == 0:
            lrs = [group['lr'] for group in s.optimizer.param_groups]
            _logger.info(f'Eval {epoch}: ' + '  '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                           lr=sum(lrs) / len(lrs))
            best = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
        s.scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    if args.rank == 0 and best is not None and best[0] is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best[0]:.4f} (epoch {best[1]})')
    if args.distributed:
        dist.destroy_process_group()
