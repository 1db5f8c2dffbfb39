#!/usr/bin/env python3
"""CPU demo: train plain, DLB and BAKE on a Fashion-MNIST subset and print one comparison table.

DLB and BAKE read about twice the images per epoch of plain training (DLB repeats half of each batch, BAKE
adds a same-class image per anchor), so the table also has a plain run with twice the epochs: the first
plain row is the equal-epochs baseline, the second the equal-images (about equal compute) baseline.

    python demo.py [--recipe configs/demo_fashion_mnist.yaml] [--output output/demo] [extra train.py flags]
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def run(recipe: str, output: str, name: str, flags: list) -> dict:
    """Train one configuration through train.py; return its last summary row plus the run totals."""
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), '-c', recipe, '--output', output,
           '--experiment', name, *flags]
    print('$', ' '.join(cmd), flush=True)
    shutil.rmtree(os.path.join(output, name), ignore_errors=True)  # a re-run would append to summary.csv
    subprocess.run(cmd, check=True)
    with open(os.path.join(output, name, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return dict(
        epochs=len(rows),
        top1=float(rows[-1]['eval_top1']),
        best=max(float(r['eval_top1']) for r in rows),
        images=sum(float(r['train_images']) for r in rows),
        steps=sum(float(r['train_steps']) for r in rows),
        time=sum(float(r['train_time']) for r in rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--recipe', default=os.path.join(HERE, 'configs', 'demo_fashion_mnist.yaml'))
    parser.add_argument('--output', default='output/demo')
    args, extra = parser.parse_known_args()
    with open(args.recipe) as f:
        epochs = int(yaml.safe_load(f)['epochs'])
    runs = [
        ('none', 'plain, equal epochs', ['--selfkd', 'none']),
        ('none-2x', 'plain, equal images', ['--selfkd', 'none', '--epochs', str(2 * epochs)]),
        ('dlb', 'DLB', ['--selfkd', 'dlb']),
        ('bake', 'BAKE', ['--selfkd', 'bake']),
    ]
    results = [(label, run(args.recipe, args.output, f'demo-{name}', flags + extra)) for name, label, flags in runs]
    print('\n| run | epochs | final top-1 | best top-1 | images | steps | train time (s) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for label, r in results:
        print(f'| {label} | {r["epochs"]} | {r["top1"]:.2f} | {r["best"]:.2f} | {r["images"]:.0f} | '
              f'{r["steps"]:.0f} | {r["time"]:.0f} |')


if __name__ == '__main__':
    main()
