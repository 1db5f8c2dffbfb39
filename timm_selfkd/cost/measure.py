"""The measuring core of `python -m timm_selfkd.cost` and of `benchmarks/overhead.py`.

Every method trains a copy of the same seeded model on the same pool of synthetic batches, through the public API
a loop of one's own uses (`create_task`, `task(x, y, indices=...)`, `task.set_epoch`). Time: the methods' steps
are interleaved round-robin, the order rotated every round, so that the drift of a busy machine falls on every
method alike; on CUDA each step is bracketed by device synchronisation. Memory: each method's peak during one
steady-state step, counting all it allocated since its model was copied (model, gradients, optimizer and task
state, activations), without its per-sample state (reported apart: it grows with the data set). A method that
runs out of memory or is refused for this model is a failure with a one-line reason; the others go on.
"""
import copy
import gc
import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.data import Mixup, resolve_data_config
from timm.optim import create_optimizer_v2
from torch.profiler import ProfilerActivity, profile, record_function

import timm_selfkd
from timm_selfkd.cost.footprint import balanced_labels, per_sample_state_bytes, state_bytes, steps_per_epoch
from timm_selfkd.errors import UsageError
from timm_selfkd.registry import get_method

__all__ = ['Setting', 'MethodRun', 'Result', 'Trainer', 'POOL_BATCHES', 'build_model', 'make_pool', 'measure',
           'failure_reason']

POOL_BATCHES = 4  # distinct synthetic batches cycled through by every method
MEMORY_WARMUP = 2  # steps before the memory-measured one: DLB then holds last-batch logits, SGD its momentum
MEASURED_STEP = 'cost::measured_step'

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class Setting:
    """What every measured method shares: the model, its inputs, the step and the run the tasks are told of."""
    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None  # None: the model's default
    input_size: Optional[Tuple[int, int, int]] = None  # None: the model's default (resolved by `build_model`)
    batch_size: int = 64
    device: str = 'cpu'
    amp: bool = False
    amp_dtype: str = 'float16'
    channels_last: bool = False
    grad_checkpointing: bool = False
    torchcompile: Optional[str] = None  # a torch.compile backend
    opt: str = 'sgd'  # a timm optimizer name (lr 0.01, momentum 0.9, weight decay 5e-4)
    mixup: float = 0.  # timm's batch-form Mixup alpha for every method
    cutmix: float = 0.
    num_epochs: int = 100  # the run every task is told about
    num_samples: int = 50_000
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        """Plain training's steps per epoch (the fact told to a method that schedules by steps)."""
        return self.num_samples // self.batch_size


@dataclass
class MethodRun:
    """One row: a registered method (or stack, or `none`) with keyword hyper-parameters for `create_task`."""
    label: str
    method: str
    hparams: Dict[str, Any] = field(default_factory=dict)
    trainer: Optional[type] = None  # a Trainer subclass (default: Trainer)
    # label -> other hyper-parameters whose per-sample state is measured too (e.g. PS-KD's top-k table)
    state_variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class Result:
    """What was measured of one row; `failure` (one line) when it could not be trained."""
    run: MethodRun
    times: Optional[np.ndarray] = None  # seconds of each timed step (one per round)
    peak_bytes: Optional[int] = None  # one step's peak, without the per-sample state
    state_bytes: Optional[int] = None  # the task state (what a checkpoint keeps beyond the model), N images
    per_sample_bytes: float = 0.  # of that, bytes per training image (e.g. PS-KD's table)
    variant_per_sample_bytes: Dict[str, float] = field(default_factory=dict)  # of `run.state_variants`
    steps_per_epoch: Optional[int] = None  # of the method's batches over N images
    failure: Optional[str] = None


def failure_reason(error: BaseException) -> str:
    """One line for a method that cannot train: out of memory, refused (a ValueError of the method), or failed."""
    first = (str(error).strip().splitlines() or [''])[0]
    if isinstance(error, torch.OutOfMemoryError) or 'out of memory' in first.lower():
        return f'out of memory ({first[:160]})' if first else 'out of memory'
    if isinstance(error, ValueError):
        return f'refused: {first}'
    return f'failed: {type(error).__name__}: {first}'


def _free(device: str) -> None:
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()


def build_model(setting: Setting) -> nn.Module:
    """The seeded timm model every method copies, on the device; fills in `setting.input_size` and
    `setting.num_classes` from the model where they are unset. A model timm cannot build is a UsageError."""
    kwargs = dict(setting.model_kwargs)
    if setting.num_classes is not None:
        kwargs['num_classes'] = setting.num_classes
    if setting.input_size is not None:
        kwargs.setdefault('in_chans', setting.input_size[0])
    torch.manual_seed(setting.seed)
    try:
        model = timm.create_model(setting.model, **kwargs)
    except (RuntimeError, TypeError) as e:  # unknown model, or keyword arguments it does not take
        raise UsageError(str(e).splitlines()[0]) from e
    if setting.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(setting.device).train()
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    setting.num_classes = model.num_classes
    if setting.input_size is None:
        setting.input_size = tuple(resolve_data_config({}, model=model)['input_size'])
    return model


def bake_group() -> int:
    """Images per BAKE group (anchor + same-class images) at its defaults: the pool's runs of equal labels."""
    return get_method('bake').hparams_cls().same_class + 1


def make_pool(setting: Setting, group: int) -> List[Batch]:
    """Random images and labels in DLB order (batch i = [second half of batch i-1, new half]).

    Inside each half, labels come in runs of `group` equal classes, so BAKE's per-class groups exist.
    """
    generator = torch.Generator().manual_seed(setting.seed)
    half = setting.batch_size // 2
    shape = (half, *setting.input_size)
    images = [torch.randn(shape, generator=generator) for _ in range(POOL_BATCHES)]
    labels = [torch.randint(setting.num_classes, (-(-half // group),), generator=generator)
              .repeat_interleave(group)[:half] for _ in range(POOL_BATCHES)]
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    return [(torch.cat([images[i - 1], images[i]]).to(setting.device).contiguous(memory_format=memory_format),
             torch.cat([labels[i - 1], labels[i]]).to(setting.device)) for i in range(POOL_BATCHES)]


class Trainer:
    """One method's task and optimizer around its copy of the model; `step` runs forward, backward (through the
    fp16 loss scaler on CUDA, as train.py), the optimizer step and zero_grad."""

    def __init__(self, setting: Setting, run: MethodRun, model: nn.Module):
        device_type = torch.device(setting.device).type
        # with --mixup/--cutmix, timm's batch-form Mixup: the step mixes the batch before the task (as the loop
        # or the loader's collate does), or the task mixes it itself (Needs.mixup == 'task': DLB, CS-KD, ...)
        mixup = Mixup(mixup_alpha=setting.mixup, cutmix_alpha=setting.cutmix, num_classes=setting.num_classes) \
            if setting.mixup or setting.cutmix else None
        self.task = timm_selfkd.create_task(run.method, model, num_epochs=setting.num_epochs,
                                steps_per_epoch=setting.steps_per_epoch, num_samples=setting.num_samples,
                                batch_size=setting.batch_size, mixup=mixup, **run.hparams)
        if setting.torchcompile:
            self.task.compile(backend=setting.torchcompile)
        self.steps_per_epoch = setting.steps_per_epoch
        self.mixing = mixup is not None
        self.mixup = mixup if self.mixing and self.task.needs.mixup == 'loader' else None
        # a method that reads sample indices (PS-KD) gets them as a hand-written loop passes them: pool batch b
        # holds dataset indices b * batch_size ... (b + 1) * batch_size - 1
        self.indices = [(torch.arange(setting.batch_size) + b * setting.batch_size) % setting.num_samples
                        for b in range(POOL_BATCHES)] if self.task.needs.sample_indices else None
        self.batches = 0
        self.optimizer = create_optimizer_v2(self.task.get_trainable_module(), opt=setting.opt, lr=0.01,
                                             weight_decay=5e-4, momentum=0.9)
        amp_dtype = torch.float16 if setting.amp_dtype == 'float16' else torch.bfloat16
        self.autocast = torch.autocast(device_type, dtype=amp_dtype, enabled=setting.amp)
        self.scaler = torch.amp.GradScaler(device_type) \
            if setting.amp and amp_dtype == torch.float16 and device_type == 'cuda' else None
        self.loss = torch.zeros(())

    def step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        if self.mixing:  # timm's Mixup mixes in place: every method gets a fresh copy of the pool's batch
            batch = (batch[0].clone(), batch[1])
        if self.mixup is not None:
            batch = self.mixup(*batch)
        with self.autocast:
            if self.indices is None:
                out = self.task(*batch)
            else:
                self.task.set_epoch(self.batches // self.steps_per_epoch)
                out = self.task(*batch, indices=self.indices[self.batches % POOL_BATCHES])
        if self.scaler is not None:
            self.scaler.scale(out['loss']).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            out['loss'].backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = out['loss'].detach()
        self.batches += 1
        return out


def _sync(device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith('cuda') else (lambda: None)


def _time_round_robin(trainers: Dict[str, Trainer], pool: List[Batch], steps: int, warmup: int,
                      clock: Callable[[], float], sync: Callable[[], None], failures: Dict[str, str],
                      stop_after: Callable[[int], bool]) -> Dict[str, np.ndarray]:
    """Step times (s) per row: round r runs every row once, in an order rotated by r. A row whose step raises
    leaves (its reason in `failures`, its trainer freed); `stop_after(rounds)` may end the timing early."""
    labels = list(trainers)
    times = {label: [] for label in labels}
    gc.collect()
    gc.disable()  # a collection inside one method's step would be charged to that method
    try:
        for r in range(warmup + steps if labels else 0):
            batch = pool[r % POOL_BATCHES]
            shift = r % len(labels)
            for label in [label for label in labels[shift:] + labels[:shift] if label in trainers]:
                try:
                    sync()
                    start = clock()
                    trainers[label].step(batch)
                    sync()
                    if r >= warmup:
                        times[label].append(clock() - start)
                except Exception as error:  # noqa: BLE001 (out of memory, refused, or broken on this model)
                    failures[label] = failure_reason(error)
                if label in failures:  # outside the handler, whose traceback holds the step's tensors
                    del trainers[label]
                    _free(str(batch[0].device))
            if r >= warmup and stop_after(r + 1 - warmup):
                break
    finally:
        gc.enable()
    for label, trainer in trainers.items():
        if not torch.isfinite(trainer.loss):
            print(f'warning: {label} loss is {trainer.loss.item()} after the timed steps', file=sys.stderr)
    return {label: np.array(times[label]) for label in trainers}


def _peak_memory(setting: Setting, make: Callable[[], Trainer], pool: List[Batch]) -> int:
    """Peak bytes during one steady-state step, counting all the trainer allocated since it was made.

    CPU: the profiler's allocation/free events (`profile_memory=True`) from before the trainer is made, summed
    in time order; the peak of that running sum inside the measured step is the live-tensor peak. It is exact
    and deterministic (the same on every run), unlike peak RSS, which also moves with the allocator's caching,
    page reuse and the interpreter. Tensors that existed before (the pool, the model copied) never appear.
    CUDA: `max_memory_allocated` over the step, reset after the warm-up steps, minus what was allocated before
    the trainer was made.
    """
    _free(setting.device)
    if setting.device.startswith('cuda'):
        base = torch.cuda.memory_allocated()
        trainer = make()
        for r in range(MEMORY_WARMUP):
            trainer.step(pool[r % POOL_BATCHES])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = make()
        for r in range(MEMORY_WARMUP):
            trainer.step(pool[r % POOL_BATCHES])
        with record_function(MEASURED_STEP):
            trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == MEASURED_STEP)
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    live = itertools.accumulate(nbytes for _, nbytes in allocations)
    return max(level for (when, _), level in zip(allocations, live) if window.start_ns() <= when <= window.end_ns())


class _Survey:
    """One measurement's shared model and pool, and each row's result (a failure: its one-line reason)."""

    def __init__(self, setting: Setting, runs: List[MethodRun]):
        self.setting = setting
        self.runs = runs
        self.template = build_model(setting)
        self.rng_after_model = torch.get_rng_state()
        self.pool = make_pool(setting, bake_group())
        self.labels = balanced_labels(setting.num_classes, setting.num_samples)  # of the N images of the run
        self.results = {run.label: Result(run) for run in runs}
        self.failures: Dict[str, str] = {}

    def make(self, run: MethodRun, setting: Optional[Setting] = None) -> Trainer:
        """A trainer on a copy of the model, drawing what the method draws as if the model had just been built
        (the same draws for every method, whatever ran before it)."""
        torch.manual_seed(self.setting.seed)
        torch.set_rng_state(self.rng_after_model)
        return (run.trainer or Trainer)(setting or self.setting, run, copy.deepcopy(self.template))

    def _per_sample_bytes(self, task, run: MethodRun) -> float:
        return per_sample_state_bytes(task, lambda n: self.make(run, replace(self.setting, num_samples=n)).task)

    def prepare(self, run: MethodRun) -> Trainer:
        """The row's trainer, with its reading pattern and per-sample state (and its variants') in its result."""
        result = self.results[run.label]
        trainer = self.make(run)
        result.steps_per_epoch = steps_per_epoch(trainer.task, self.labels, self.setting.batch_size)
        result.per_sample_bytes = self._per_sample_bytes(trainer.task, run)
        for label, change in run.state_variants.items():
            try:
                result.variant_per_sample_bytes[label] = self._per_sample_bytes(
                    trainer.task, MethodRun(label, run.method, {**run.hparams, **change}))
            except ValueError:  # a variant this model cannot take (top-10 of 4 classes) is left out
                pass
        return trainer

    def trainers(self) -> Dict[str, Trainer]:
        trainers = {}
        for run in self.runs:
            try:
                trainers[run.label] = self.prepare(run)
            except Exception as error:  # noqa: BLE001 (out of memory, refused, or broken on this model)
                self.failures[run.label] = failure_reason(error)
                _free(self.setting.device)
        return trainers

    def measure_memory(self) -> None:
        """Each row's peak, from a trainer of its own (the per-sample state, host memory, taken off on the CPU)."""
        for run in self.runs:
            if run.label in self.failures:
                continue
            result = self.results[run.label]
            try:
                result.peak_bytes = _peak_memory(self.setting, lambda: self.make(run), self.pool)
                if not self.setting.device.startswith('cuda'):  # SoftTargetMemory's tables are in host memory
                    result.peak_bytes -= round(result.per_sample_bytes * self.setting.num_samples)
            except Exception as error:  # noqa: BLE001
                self.failures[run.label] = failure_reason(error)
            _free(self.setting.device)

    def outcome(self) -> List[Result]:
        for label, reason in self.failures.items():
            self.results[label].failure = reason
            self.results[label].times = None
        return [self.results[run.label] for run in self.runs]


def measure(setting: Setting, runs: List[MethodRun], steps: int, warmup: int,
            clock: Callable[[], float] = time.perf_counter, time_limit: Optional[float] = None) -> List[Result]:
    """Measure every row of `runs` (the first is the reference, normally `none`) on `setting`.

    Args:
        setting: The model, inputs and run; `build_model` fills in what the model decides.
        runs: The rows, each made into a `Trainer` (or its `trainer` subclass) on a copy of the model.
        steps, warmup: Timed and untimed rounds.
        clock: The step clock (wall time by default; e.g. `time.process_time` for the CPU time of this process).
        time_limit: Seconds the whole measurement should take about: timing stops early (after at least one
            timed round), leaving the time the memory steps are expected to take.

    Raises:
        UsageError: the model cannot be built.
    """
    started = time.perf_counter()
    if setting.device.startswith('cuda'):  # as train.py: fastest kernels for fixed shapes, TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    survey = _Survey(setting, runs)
    gc.collect()
    gc.freeze()  # what exists now is never garbage: the collections between methods then skip it (torch, timm)
    try:
        trainers = survey.trainers()
        built = time.perf_counter()
        profiled = 1 if setting.device.startswith('cuda') else 2  # the CPU profiler slows the memory steps

        def stop_after(rounds: int) -> bool:
            now = time.perf_counter()
            per_round = (now - built) / (rounds + warmup)
            memory_steps = (built - started) + profiled * (MEMORY_WARMUP + 1) * per_round
            return time_limit is not None and now - started + per_round + memory_steps > time_limit

        times = _time_round_robin(trainers, survey.pool, steps, warmup, clock, _sync(setting.device),
                                  survey.failures, stop_after)
        for label, trainer in trainers.items():
            survey.results[label].times = times[label]
            survey.results[label].state_bytes = state_bytes(trainer.task)
        trainers.clear()
        survey.measure_memory()
        return survey.outcome()
    finally:
        gc.unfreeze()
