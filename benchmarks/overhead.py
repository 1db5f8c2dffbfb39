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
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout, installed or not
import timm_selfkd  # noqa: E402
from timm_selfkd.cost.measure import MethodRun, Result, Setting, Trainer, measure  # noqa: E402
from timm_selfkd.cost.report import cost_rows, environment as cost_environment  # noqa: E402
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
CHECKED = 'none+checks'  # plain training with the loop's per-step seeding and guard (timm_selfkd.train)


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


def setting(args: argparse.Namespace) -> Setting:
    """The measuring core's setting: every task is told of a run of RUN_EPOCHS epochs of RUN_SAMPLES images."""
    return Setting(model=args.model, model_kwargs=args.model_kwargs, num_classes=args.num_classes,
                   input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size, device=args.device,
                   amp=args.amp, amp_dtype='bfloat16', mixup=args.mixup, cutmix=args.cutmix, num_epochs=RUN_EPOCHS,
                   num_samples=RUN_SAMPLES, seed=args.seed)


class CheckedTrainer(Trainer):
    """A step of `timm_selfkd.train`'s loop: re-seed every generator, train, feed the guard, poll it."""

    def __init__(self, setting: Setting, run: MethodRun, model: torch.nn.Module):
        super().__init__(setting, run, model)
        self.guard = RunGuard(torch.device(setting.device), distributed=False)
        self.steps = 0

    def step(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, torch.Tensor]:
        seed_everything(step_seed(0, 0, 0, self.steps))
        out = super().step(batch)
        self.guard.observe(self.steps, {n: v for n, v in out.items() if n.startswith('loss')})
        self.guard.poll()
        self.steps += 1
        return out


def method_runs(args: argparse.Namespace) -> List[MethodRun]:
    return [MethodRun(m, base_method(m), method_hparams(m), CheckedTrainer if m == CHECKED else None)
            for m in args.methods]


def seeding_cost(samples: int = 20000) -> float:
    """Seconds per image of the data loader's per-image seeding (`KeyedDataset`: seed_host per read)."""
    start = time.perf_counter()
    for i in range(samples):
        seed_host(i)
    return (time.perf_counter() - start) / samples


def report(args: argparse.Namespace, results: Dict[str, Result]) -> str:
    """The markdown table, the costs in words and the targets (the cost command's rows: `cost_rows`)."""
    rows = cost_rows(list(results.values()), setting(args), RUN_EPOCHS)
    memory = {row['method']: row['peak_memory_bytes'] for row in rows}
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
    for row in rows:
        method, (q1, q3), (r1, r3) = row['method'], row['step_ms_iqr'], row['time_ratio_iqr']
        ratios[method] = float(row['time_ratio']), row['memory_ratio']
        lines.append(f'| {method} | {args.batch_size} | {round(row["new_images_per_step"])} | {row["step_ms"]:.1f} '
                     f'| {q3 - q1:.1f} | {row["time_ratio"]:.3f}x | {r1:.3f}-{r3:.3f} | {memory[method] / 2 ** 20:.2f} '
                     f'| {row["memory_ratio"]:.4f}x |')
    lines += ['', 'Time ratio: median (and quartiles) over rounds of the method\'s step time / `none`\'s in the same '
              'round. Peak memory: live tensors (model, gradients, optimizer and task state, activations).', '']
    lines += [f'- {m.upper()}: {t:.2f}x time, {mem:.2f}x memory ({(memory[m] - memory["none"]) / 2 ** 10:+.1f} KiB '
              'peak)' for m, (t, mem) in ratios.items() if m != 'none']
    lines += [f'- {row["method"].upper()} per-sample table, not in its peak memory: '
              f'{row["per_sample_state_bytes"] * RUN_SAMPLES / 2 ** 20:.2f} MiB for {RUN_SAMPLES} images x '
              f'{args.num_classes} classes (benchmarks/memory_pskd.py: ImageNet)'
              for row in rows if row['per_sample_state_bytes']]
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


def environment(args: argparse.Namespace) -> str:
    """Command line, versions, hardware and date for the saved report."""
    env = cost_environment(args.device, ' '.join(sys.argv))
    return '\n'.join([
        f'# Self-KD overhead: {args.device}, {args.model}',
        '',
        f'- command: `python {env["command"]}`',
        f'- torch {env["torch"]}, timm {env["timm"]}, timm_selfkd {env["timm_selfkd"]}, python {env["python"]}',
        f'- CPU: {env["cpu"]}; platform {env["platform"]}',
        f'- device: {env["device"]}; torch threads: {args.threads}',
        f'- date: {env["date"]}',
        '', '',
    ])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f'torch threads: {torch.get_num_threads()}; methods: {", ".join(args.methods)}', flush=True)
    start = time.perf_counter()
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    results = {result.run.label: result
               for result in measure(setting(args), method_runs(args), args.steps, args.warmup, clock=clock)}
    failed = [f'{method}: {result.failure}' for method, result in results.items() if result.failure]
    if failed:
        sys.exit('\n'.join(failed))
    text = report(args, results)
    if args.loop_checks:
        per_image = seeding_cost()
        share = per_image * args.batch_size / np.median(results['none'].times)
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
