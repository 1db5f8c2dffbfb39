"""Per-step time and peak memory of self-KD methods against plain training, at the same images per step.

Every method trains the same seeded model on the same pool of synthetic batches with the same thread count.
Time: the methods' steps are interleaved round-robin (order rotated every round) to cancel the drift of a noisy
machine; the table gives each method's median step time and the median over rounds of its time divided by the
time of `none` in the same round. Memory: each method's peak of live tensor memory during one steady-state step,
counting everything it allocated (model, gradients, optimizer and task state, activations).

A method may carry hyper-parameters, `name:key=value[:key=value]` (e.g. `self_guidance:skip_dropped=false`),
to compare variants of it in one run.

Usage:
    python benchmarks/overhead.py --threads 1 --clock cpu --loop-checks --methods none,dlb,bake \
        --output benchmarks/results/overhead_cpu_resnet18_cpuclock.md
    python benchmarks/overhead.py --model swin_tiny_patch4_window7_224 --model-kwargs img_size=64 \
        --methods none,self_guidance,multi_exit --output benchmarks/results/overhead_cpu_swin_tiny.md
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
from timm.data import Mixup
import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout, installed or not
import timm_selfkd  # noqa: E402
from timm_selfkd.runtime.run_guard import RunGuard  # noqa: E402
from timm_selfkd.runtime.batch_stream import seed_everything, seed_host, step_seed  # noqa: E402

# (time ratio, memory ratio) upper bounds from the issues (None: no bound), measured on CPU with resnet18
# (self_guidance and multi_exit: also with a Swin).
# MrKD: time <= 1 + 0.4 n for its default n = 3 copies (memory: n copies of the weights, no bound). PS-KD: memory
# without its per-sample table, which is reported apart (benchmarks/memory_pskd.py measures it at ImageNet size).
TARGETS = {'dlb': (1.03, 1.02), 'bake': (1.05, 1.03), 'none+checks': (1.01, 1.01), 'self_guidance': (2.05, None),
           'multi_exit': (1.15, None), **dict.fromkeys(['lsrkd', 'lsrkd_tc', 'tfkd_reg'], (1.01, 1.01)),
           'mrkd': (1 + 0.4 * 3, None), 'mrkd_tc': (1 + 0.4 * 3, None), 'pskd': (1.02, 1.02),
           # issue 17, each from the method's design: USKD a linear head and a sort over the classes; Zipf's LS a
           # no-gradient head pass over the final map's positions; R-Drop two full passes with gradient; DKS two
           # branches re-running three of resnet18's four stages (+75% FLOPs); FRSKD a BiFPN at twice the stage
           # widths (~0.6x resnet18's multiply-adds); MixSKD twice the rows through backbone and three branches
           'uskd': (1.03, 1.02), 'zipfls': (1.05, 1.01), 'rdrop': (2.25, 1.6), 'dks': (2.1, 2.1),
           'frskd': (2.4, 2.7), 'mixskd': (5.5, 3.5)}
RUN_EPOCHS, RUN_SAMPLES = 100, 50_000  # the run every task is told about (create_task): a CIFAR-size data set
POOL_BATCHES = 4  # distinct synthetic batches cycled through by every method
CHECKED = 'none+checks'  # plain training with the loop's per-step seeding and guard (timm_selfkd.train)
MEMORY_WARMUP = 2  # steps before the memory-measured one: DLB then holds last-batch logits, SGD its momentum
MEASURED_STEP = 'overhead::measured_step'

Batch = Tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='extra timm.create_model arguments, e.g. img_size=64')
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--batch-size', type=int, default=64, help='images per step, the same for every method')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=40, help='timed steps (rounds) per method')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps per method before timing')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast around the forward pass')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch intra-op threads')
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help='step time as wall-clock time, or as CPU time of this process (CPU device; with '
                             '--threads 1 it does not count the time other programs on a shared machine take)')
    parser.add_argument('--methods', default='none,dlb,bake', help='comma-separated; `none` is always included')
    parser.add_argument('--loop-checks', action='store_true',
                        help='add a `none+checks` row: plain training plus the loop\'s per-step re-seeding, '
                             'non-finite guard and stop check (every step, as on the CPU), and time the '
                             'per-image seeding of the data loader')
    parser.add_argument('--mixup', type=float, default=0., help='mixup alpha for every method (timm batch mode)')
    parser.add_argument('--cutmix', type=float, default=0., help='CutMix alpha for every method (timm batch mode)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', type=Path, help='also write the report (with environment) to this markdown file')
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    for name in methods:
        try:
            timm_selfkd.get_method(base_method(name))
            method_hparams(name)
        except ValueError as error:  # names the closest registered method, or the bad hyper-parameter
            parser.error(str(error))
    args.model_kwargs = dict(_key_value(item) for item in args.model_kwargs)
    args.methods = ['none'] + [m for m in dict.fromkeys(methods) if m != 'none'] + \
        ([CHECKED] if args.loop_checks else [])
    if args.batch_size < 4 or args.batch_size % 2:
        parser.error('--batch-size must be even and >= 4 (DLB halves, BAKE groups)')
    if args.clock == 'cpu' and args.device != 'cpu':
        parser.error('--clock cpu measures CPU steps only')
    if args.steps < 1 or args.warmup < 1:
        parser.error('--steps and --warmup must be >= 1 (DLB reaches its steady state after one step)')
    return args


def _key_value(text: str) -> Tuple[str, object]:
    key, _, value = text.partition('=')
    return key, yaml.safe_load(value)


def base_method(spec: str) -> str:
    """The method of a row: `self_guidance` of `self_guidance:skip_dropped=false`, `none` of `none+checks`,
    `ddgsd+dlb` (a stack) of itself."""
    name = spec.split(':')[0]
    return 'none' if name == CHECKED else name


def method_hparams(spec: str) -> Dict[str, object]:
    """The hyper-parameters of a `name:key=value[:key=value]` method spec."""
    return dict(_key_value(item) for item in spec.split(':')[1:])


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
        model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
        self.steps_per_epoch = RUN_SAMPLES // args.batch_size
        # with --mixup/--cutmix, timm's batch-form Mixup: the step mixes the batch before the task (as the loop
        # or the loader's collate does), or the task mixes it itself (Needs.mixup == 'task': DLB, CS-KD, ...)
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, num_classes=args.num_classes) \
            if args.mixup or args.cutmix else None
        self.task = timm_selfkd.create_task(base_method(method), model.to(args.device).train(),
                                            num_epochs=RUN_EPOCHS, steps_per_epoch=self.steps_per_epoch,
                                            num_samples=RUN_SAMPLES, batch_size=args.batch_size, mixup=mixup,
                                            **method_hparams(method))
        self.mixing = mixup is not None
        self.mixup = mixup if self.mixing and self.task.needs.mixup == 'loader' else None
        # a method that reads sample indices (PS-KD) gets them as a hand-written loop passes them: pool batch b
        # holds dataset indices b * batch_size ... (b + 1) * batch_size - 1
        self.indices = [torch.arange(args.batch_size) + b * args.batch_size for b in range(POOL_BATCHES)] \
            if self.task.needs.sample_indices else None
        self.batches = 0
        self.optimizer = torch.optim.SGD(self.task.trainable_module.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=5e-4, nesterov=True)
        self.autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp)
        self.loss = torch.zeros(())

    def step(self, batch: Batch) -> None:
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
        out['loss'].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = out['loss'].detach()
        self.batches += 1
        return out

    def table_bytes(self) -> int:
        """Bytes of a per-sample table the method keeps (PS-KD's memory), reported apart from the peak."""
        memory = getattr(self.task, 'memory', None)
        return memory.nbytes if memory is not None else 0


class CheckedTrainer(Trainer):
    """A step of `timm_selfkd.train`'s loop: re-seed every generator, train, feed the guard, poll it."""

    def __init__(self, method: str, args: argparse.Namespace):
        super().__init__(method, args)
        self.guard = RunGuard(torch.device(args.device), distributed=False)
        self.steps = 0

    def step(self, batch: Batch) -> None:
        seed_everything(step_seed(0, 0, 0, self.steps))
        out = super().step(batch)
        self.guard.observe(self.steps, {n: v for n, v in out.items() if n.startswith('loss')})
        self.guard.poll()
        self.steps += 1


def make_trainer(method: str, args: argparse.Namespace) -> Trainer:
    return CheckedTrainer(method, args) if method == CHECKED else Trainer(method, args)


def seeding_cost(samples: int = 20000) -> float:
    """Seconds per image of the data loader's per-image seeding (`KeyedDataset`: seed_host per read)."""
    start = time.perf_counter()
    for i in range(samples):
        seed_host(i)
    return (time.perf_counter() - start) / samples


def time_methods(args: argparse.Namespace, pool: List[Batch], sync: Callable[[], None]) -> Dict[str, np.ndarray]:
    """Step times (s) per method, shape (steps,): round r runs every method once, in an order rotated by r."""
    trainers = {m: make_trainer(m, args) for m in args.methods}
    for r in range(args.warmup):
        for trainer in trainers.values():
            trainer.step(pool[r % POOL_BATCHES])
    times = {m: np.zeros(args.steps) for m in args.methods}
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    gc.collect()
    gc.disable()  # a collection inside one method's step would be charged to that method
    try:
        for r in range(args.steps):
            batch = pool[(args.warmup + r) % POOL_BATCHES]
            shift = r % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                sync()
                start = clock()
                trainers[method].step(batch)
                sync()
                times[method][r] = clock() - start
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
        method_trainer = make_trainer(method, args)
        for r in range(MEMORY_WARMUP):
            method_trainer.step(pool[r % POOL_BATCHES])
        torch.cuda.reset_peak_memory_stats()
        method_trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
        table = method_trainer.table_bytes()
        return torch.cuda.max_memory_allocated() - base - table, table
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        method_trainer = make_trainer(method, args)
        for r in range(MEMORY_WARMUP):
            method_trainer.step(pool[r % POOL_BATCHES])
        with record_function(MEASURED_STEP):
            method_trainer.step(pool[MEMORY_WARMUP % POOL_BATCHES])
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == MEASURED_STEP)
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    live = itertools.accumulate(nbytes for _, nbytes in allocations)
    peak = max(level for (when, _), level in zip(allocations, live) if window.start_ns() <= when <= window.end_ns())
    return peak - method_trainer.table_bytes(), method_trainer.table_bytes()


def new_images(method: str, batch_size: int, group: int) -> str:
    """Images per step that are new to the epoch (the rest are repeats, same-class partners or second views)."""
    per_method = {'dlb': batch_size // 2, 'bake': batch_size // group,
                  'cskd': batch_size // 2,  # anchors; their partners are a no-grad teacher pass
                  'ddgsd': batch_size // 2,  # images, each read as two views
                  'ddgsd+dlb': batch_size // 4}  # DLB's new half of B/2 images, two views each
    return str(per_method.get(base_method(method), batch_size))


def report(args: argparse.Namespace, times: Dict[str, np.ndarray], memory: Dict[str, int], group: int,
           tables: Dict[str, int]) -> str:
    """The markdown table, the costs in words and the targets."""
    base = times['none']
    lines = [
        f'Model `{args.model}`{"".join(f" {k}={v}" for k, v in args.model_kwargs.items())} '
        f'({args.num_classes} classes), {args.img_size}x{args.img_size} images, '
        f'device {args.device}{" + bf16 autocast" if args.amp else ""}, {args.threads} threads; '
        f'{args.batch_size} images per step for every method; {args.warmup} warm-up steps, '
        f'{args.steps} timed steps per method interleaved round-robin; {args.clock} clock.',
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
              f'images x {args.num_classes} classes (benchmarks/memory_pskd.py: ImageNet)'
              for m, table in tables.items() if table]
    targets = [(m, TARGETS[m.split(':')[0]]) for m in ratios if m.split(':')[0] in TARGETS]
    if targets:
        lines += ['', 'Targets (from the issues):', '']
        for method, (max_time, max_memory) in targets:
            time_ratio, memory_ratio = ratios[method]
            for what, value, limit in (('time', time_ratio, max_time), ('memory', memory_ratio, max_memory)):
                if limit is not None:
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
    if args.loop_checks:
        per_image = seeding_cost()
        share = per_image * args.batch_size / np.median(times['none'])
        text += (f'\nPer-image seeding in the data loader (`KeyedDataset`): {per_image * 1e6:.1f} us per image, '
                 f'{args.batch_size} images = {share * 100:.2f}% of a plain step (paid by the loader\'s workers, '
                 f'in parallel with training when `-j` > 0).\n')
    print(text + f'\n(benchmark took {time.perf_counter() - start:.0f} s)')
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(environment(args) + text)
        print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
