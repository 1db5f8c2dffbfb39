"""Accuracy effect of PS-KD's top-k sparse memory (`--pskd-topk`) against the dense one, on Fashion-MNIST.

Trains PS-KD with the dense memory and with top-k memories (and plain training for reference) from the demo
recipe, for several seeds, through train.py; reports final top-1, NLL, ECE and AURC (mean and spread over the
seeds) and, from the dense run's final memory, how much probability mass a top-k row would have left out (the
part top-k spreads evenly over the other classes).

Usage:
    python benchmarks/pskd_topk.py --output benchmarks/results/pskd_topk_fashion_mnist.md [extra train.py flags]
"""
import argparse
import csv
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parents[1]
METRICS = ('top1', 'nll', 'ece', 'aurc')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--recipe', default=str(HERE / 'configs' / 'demo_fashion_mnist.yaml'))
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--topk', default='1,2', help='comma-separated k to compare with the dense memory')
    parser.add_argument('--seeds', default='0,1', help='comma-separated seeds')
    parser.add_argument('--work', default='output/pskd_topk', help='folder of the runs')
    parser.add_argument('--output', type=Path, help='also write the report to this markdown file')
    args, args.extra = parser.parse_known_args(argv)
    return args


def train(args: argparse.Namespace, name: str, flags: List[str], seed: int) -> Dict[str, float]:
    """One train.py run; its last summary row's evaluation metrics."""
    experiment = f'{name}-seed{seed}'
    shutil.rmtree(os.path.join(args.work, experiment), ignore_errors=True)
    cmd = [sys.executable, str(HERE / 'train.py'), '-c', args.recipe, '--epochs', str(args.epochs), '--seed',
           str(seed), '--output', args.work, '--experiment', experiment, '--log-interval', '1000', *args.extra, *flags]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=HERE)
    with open(os.path.join(args.work, experiment, 'summary.csv')) as f:
        row = list(csv.DictReader(f))[-1]
    return {metric: float(row[f'eval_{metric}']) for metric in METRICS}


def mass_outside_topk(path: str, ks: List[int]) -> Dict[int, float]:
    """Mean and largest probability mass outside each row's k largest, in a dense memory checkpoint."""
    values = torch.load(path, map_location='cpu', weights_only=False)['task_state']['memory']['values'].float()
    values = values[values.sum(1) > 0]
    ordered = values.sort(dim=1, descending=True).values
    return {k: (float(1 - ordered[:, :k].sum(1).mean()), float((1 - ordered[:, :k].sum(1)).max())) for k in ks}


def report(args: argparse.Namespace, results: Dict[str, List[Dict[str, float]]], outside: Dict[int, tuple]) -> str:
    seeds = args.seeds.split(',')
    lines = [f'Recipe `{Path(args.recipe).name}` (Fashion-MNIST, 10 classes) with `{" ".join(args.extra)}`, '
             f'{args.epochs} epochs, seeds {", ".join(seeds)}; final epoch, mean (min-max) over seeds. ECE in %, '
             'AURC x 10^3.', '',
             '| run | ' + ' | '.join(METRICS) + ' |', '|---|' + '---:|' * len(METRICS)]
    for name, runs in results.items():
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in runs])
            cells.append(f'{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    dense = np.array([r['top1'] for r in results['pskd dense']])
    lines += ['', 'Top-1 difference to the dense memory, same seed (positive = top-k better):', '']
    for name, runs in results.items():
        if name.startswith('pskd top-'):
            diff = np.array([r['top1'] for r in runs]) - dense
            lines.append(f'- {name}: {", ".join(f"{d:+.2f}" for d in diff)} (mean {diff.mean():+.2f})')
    lines += ['', 'Probability mass a top-k row leaves out (spread evenly over the other classes instead), in the '
              'dense run\'s final memory (first seed):', '']
    lines += [f'- k = {k}: mean {mean:.4f}, largest {largest:.4f}' for k, (mean, largest) in outside.items()]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    ks = [int(k) for k in args.topk.split(',')]
    seeds = [int(s) for s in args.seeds.split(',')]
    configs = [('plain', ['--selfkd', 'none']), ('pskd dense', ['--selfkd', 'pskd'])]
    configs += [(f'pskd top-{k}', ['--selfkd', 'pskd', '--pskd-topk', str(k)]) for k in ks]
    results = {name: [train(args, name.replace(' ', '-'), flags, seed) for seed in seeds] for name, flags in configs}
    outside = mass_outside_topk(os.path.join(args.work, f'pskd-dense-seed{seeds[0]}', 'last.pth.tar'), ks)
    text = report(args, results, outside)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        header = ['# PS-KD: top-k memory vs dense', '', f'- command: `python {" ".join(sys.argv)}`',
                  f'- torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}, '
                  f'{os.cpu_count()} logical cores',
                  f'- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}', '', '']
        args.output.write_text('\n'.join(header) + text)
        print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
