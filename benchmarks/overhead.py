"""Per-step time and peak memory of self-KD methods against plain training, at the same images per step.

Every method trains the same seeded model on the same pool of synthetic batches with the same thread count.
Time: the methods' steps are interleaved round-robin (order rotated every round) to cancel the drift of a noisy
machine; the table gives each method's median step time and the median over rounds of its time divided by the
time of `none` in the same round. Memory: each method's peak of live tensor memory during one steady-state step,
counting everything it allocated (model, gradients, optimizer and task state, activations).

Usage:
    python benchmarks/overhead.py --output benchmarks/results/overhead_cpu_resnet18.md
"""
import argparse
import datetime
import gc
import itertools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout, installed or not
import timm_selfkd  # noqa: E402
from timm_selfkd.methods.base import RunInfo  # noqa: E402
from timm_selfkd.stream import BatchInfo  # noqa: E402

# (time ratio, memory ratio) upper bounds from the issue, measured on CPU with resnet18.
# MrKD: time <= 1 + 0.4 n for n copies (3 by default), no memory target (it keeps n copies of the weights).
# PS-KD: memory without its per-sample table (reported separately, see memory_pskd.py).
TARGETS = {'dlb': (1.03, 1.02), 'bake': (1.05, 1.03), 'mrkd': (1 + 0.4 * 3, None), 'mrkd_tc': (1 + 0.4 * 3, None),
           'pskd': (1.02, 1.02)}
RUN_EPOCHS, RUN_SAMPLES = 100, 50_000  # the run a task is told about (bind_run): a CIFAR-size data set
POOL_BATCHES = 4  # distinct synthetic batches cycled through by every method
MEMORY_WARMUP = 2  # steps before the memory-measured one: DLB then holds last-batch logits, SGD its momentum
MEASURED_STEP = 'overhead::measured_step'

Batch = Tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--batch-size', type=int, default=64, help='images per step, the same for every method')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=40, help='timed steps (rounds) per method')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps per method before timing')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast around the forward pass')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch intra-op threads')
    parser.add_argument('--methods', default='none,dlb,bake', help='comma-separated; `none` is always included')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', type=Path, help='also write the report (with environment) to this markdown file')
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    for name in methods:
        try:
            timm_selfkd.get_method(name)
        except ValueError as error:  # names the closest registered method
            parser.error(str(error))
    args.methods = ['none'] + [m for m in dict.fromkeys(methods) if m != 'none']
    if args.batch_size < 4 or args.batch_size % 2:
        parser.error('--batch-size must be even and >= 4 (DLB halves, BAKE groups)')
    if args.steps < 1 or args.warmup < 1:
        parser.error('--steps and --warmup must be >= 1 (DLB reaches its steady state after one step)')
    return args


def make_pool(args: argparse.Namespace, group: int) -> List[Batch]:
    """Random images and labels in DLB order (batch i = [second half of batch i-1, new half]).

    Inside each half, labels come in runs of `group` equal classes, so BAKE's per-class groups exist.
    """
    generator = torch.Generator().manual_seed(args.seed)
    half = args.batch_size // 2
    images = [torch.randn(half, 3, args.img_size, args.img_size, generator=generator) for _ in range(POOL_BATCHES)]
    labels = [torch.randint(args.num_classes, (-(-half // group),), generator=generator)
              .repeat_interleave(group)[:half] for _ in range(POOL_BATCHES)]
    return [(torch.cat([images[i - 1], images[i]]).to(args.device),
             torch.cat([labels[i - 1], labels[i]]).to(args.device)) for i in range(POOL_BATCHES)]


class Trainer:
    """One method's task and optimizer; `step` runs forward, backward, SGD step and zero_grad."""

    def __init__(self, method: str, args: argparse.Namespace):
        torch.manual_seed(args.seed)  # same architecture and initial weights for every method
        model = timm.create_model(args.model, num_classes=args.num_classes).to(args.device).train()
        self.task = timm_selfkd.create_task(method, model)
        steps_per_epoch = RUN_SAMPLES // args.batch_size
        self.task.bind_run(RunInfo(num_epochs=RUN_EPOCHS, steps_per_epoch=steps_per_epoch, num_samples=RUN_SAMPLES,
                                   num_classes=args.num_classes, batch_size=args.batch_size))
        self.steps = 0  # batch info: pool batch b holds dataset indices b * batch_size ... (b + 1) * batch_size - 1
        self.task.bind_batch_info_source(lambda: BatchInfo(
            self.steps // steps_per_epoch, self.steps % steps_per_epoch,
            torch.arange(args.batch_size) + self.steps % POOL_BATCHES * args.batch_size))
        self.optimizer = torch.optim.SGD(self.task.trainable_module.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=5e-4, nesterov=True)
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp)
        self.loss = torch.zeros(())

    def step(self, batch: Batch) -> None:
        with self.autocast:
            out = self.task(*batch)
        out['loss'].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = out['loss'].detach()
        self.steps += 1

    def table_bytes(self) -> int:
        """Bytes of a per-sample table the method keeps (PS-KD's memory), reported apart from the peak."""
        memory = getattr(self.task, 'memory', None)
        return memory.nbytes if memory is not None else 0


def time_methods(args: argparse.Namespace, pool: List[Batch], sync: Callable[[], None]) -> Dict[str, np.ndarray]:
    """Step times (s) per method, shape (steps,): round r runs every method once, in an order rotated by r."""
    trainers = {m: Trainer(m, args) for m in args.methods}
    for r in range(args.warmup):
        for trainer in trainers.values():
            trainer.step(pool[r % POOL_BATCHES])
    times = {m: np.zeros(args.steps) for m in args.methods}
    gc.collect()
    gc.disable()  # a collection inside one method's step would be charged to that method
    try:
        for r in range(args.steps):
            batch = pool[(args.warmup + r) % POOL_BATCHES]
            shift = r % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                sync()
                start = time.perf_counter()
                trainers[method].step(batch)
                sync()
                times[method][r] = time.perf_counter() - start
    finally:
        gc.enable()
    for method, trainer in trainers.items():
        if not torch.isfinite(trainer.loss):
            print(f'warning: {method} loss is {trainer.loss.item()} after the timed steps', file=sys.stderr)
    return times


def peak_memory(method: str, args: argparse.Namespace, pool: List[Batch]) -> Tuple[int, int]:
    """Peak bytes of live tensors during one steady-state step, counting all the method allocated since setup
    except a per-sample table (PS-KD's memory, which grows with the data set), and that table's bytes.

    CPU: the profiler's allocation/free events (`profile_memory=True`) from before the model is built, summed
    in time order; the peak of that running sum inside the measured step is the live-tensor peak. It is exact
    and deterministic (the same on every run), unlike peak RSS, which also moves with the allocator's caching,
    page reuse and the interpreter, and would need one process per method. Tensors that existed before
    profiling (the shared input pool) never appear, so every method is charged only for what it allocates.
    CUDA: `max_memory_allocated` over the step minus what was allocated before the model was built.
    """
    gc.collect()
    if args.device == 'cuda':
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        trainer = Trainer(method, args)
        for r in range(MEMORY_WARMUP):
            trainer.step(pool[r % POOL_BATCHES])
        torch.cuda.reset_peak_memory_stats()
        trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
        return torch.cuda.max_memory_allocated() - base - trainer.table_bytes(), trainer.table_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(method, args)
        for r in range(MEMORY_WARMUP):
            trainer.step(pool[r % POOL_BATCHES])
        with record_function(MEASURED_STEP):
            trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == MEASURED_STEP)
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    live = itertools.accumulate(nbytes for _, nbytes in allocations)
    peak = max(level for (when, _), level in zip(allocations, live) if window.start_ns() <= when <= window.end_ns())
    return peak - trainer.table_bytes(), trainer.table_bytes()


def new_images(method: str, batch_size: int, group: int) -> str:
    """Images per step that are new to the epoch (the rest are repeats or same-class partners)."""
    new = {'none': batch_size, 'dlb': batch_size // 2, 'bake': batch_size // group, 'mrkd': batch_size,
           'mrkd_tc': batch_size, 'pskd': batch_size}
    return str(new.get(method, '?'))


def report(args: argparse.Namespace, times: Dict[str, np.ndarray], memory: Dict[str, int], group: int,
           tables: Dict[str, int]) -> str:
    """The markdown table, the costs in words and the targets."""
    base = times['none']
    lines = [
        f'Model `{args.model}` ({args.num_classes} classes), {args.img_size}x{args.img_size} images, '
        f'device {args.device}{" + bf16 autocast" if args.amp else ""}, {args.threads} threads; '
        f'{args.batch_size} images per step for every method; {args.warmup} warm-up steps, '
        f'{args.steps} timed steps per method interleaved round-robin.',
        '',
        '| method | images/step | new images/step | median step (ms) | IQR (ms) | time ratio | ratio IQR '
        '| peak memory (MiB) | memory ratio |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    ratios = {}
    for method in args.methods:
        step = times[method]
        q1, median, q3 = np.percentile(step, [25, 50, 75]) * 1e3
        r1, ratio, r3 = np.percentile(step / base, [25, 50, 75])
        ratios[method] = float(ratio), memory[method] / memory['none']
        lines.append(f'| {method} | {args.batch_size} | {new_images(method, args.batch_size, group)} | {median:.1f} '
                     f'| {q3 - q1:.1f} | {ratio:.3f}x | {r1:.3f}-{r3:.3f} | {memory[method] / 2 ** 20:.2f} '
                     f'| {ratios[method][1]:.4f}x |')
    lines += ['', 'Time ratio: median (and quartiles) over rounds of the method\'s step time / `none`\'s in the same '
              'round. Peak memory: live tensors (model, gradients, optimizer and task state, activations).', '']
    lines += [f'- {m.upper()}: {t:.2f}x time, {mem:.2f}x memory ({(memory[m] - memory["none"]) / 2 ** 10:+.1f} KiB '
              'peak)' for m, (t, mem) in ratios.items() if m != 'none']
    lines += [f'- {m.upper()} per-sample table, not in its peak memory: {table / 2 ** 20:.2f} MiB for {RUN_SAMPLES} '
              f'images x {args.num_classes} classes (see benchmarks/memory_pskd.py for ImageNet)'
              for m, table in tables.items() if table]
    targets = [(m, limits) for m, limits in TARGETS.items() if m in ratios]
    if targets:
        lines += ['', 'Targets (from the issue, for CPU + resnet18):', '']
        for method, (max_time, max_memory) in targets:
            time_ratio, memory_ratio = ratios[method]
            for what, value, limit in (('time', time_ratio, max_time), ('memory', memory_ratio, max_memory)):
                if limit is None:
                    continue
                verdict = 'PASS' if value <= limit else 'FAIL'
                lines.append(f'- {method.upper()} {what} {value:.3f}x <= {limit:.2f}x: {verdict}')
    return '\n'.join(lines) + '\n'


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux) and logical core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.exists():
        name = next((line.split(':', 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith('model name')), name)
    return f'{name}, {os.cpu_count()} logical cores'


def environment(args: argparse.Namespace) -> str:
    """Command line, versions, hardware and date for the saved report."""
    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
    return '\n'.join([
        f'# Self-KD overhead: {args.device}, {args.model}',
        '',
        f'- command: `python {" ".join(sys.argv)}`',
        f'- torch {torch.__version__}, timm {timm.__version__}, timm_selfkd {timm_selfkd.__version__}, '
        f'python {platform.python_version()}',
        f'- CPU: {cpu_name()}; platform {platform.platform()}',
        f'- device: {device}; torch threads: {args.threads}',
        f'- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
        '', '',
    ])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f'torch threads: {torch.get_num_threads()}; methods: {", ".join(args.methods)}', flush=True)
    group = timm_selfkd.get_method('bake').hparams_cls().same_class + 1
    pool = make_pool(args, group)
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    start = time.perf_counter()
    times = time_methods(args, pool, sync)
    measured = {method: peak_memory(method, args, pool) for method in args.methods}
    memory = {method: peak for method, (peak, _) in measured.items()}
    text = report(args, times, memory, group, {method: table for method, (_, table) in measured.items()})
    print(text + f'\n(benchmark took {time.perf_counter() - start:.0f} s)')
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(environment(args) + text)
        print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
