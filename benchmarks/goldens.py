"""Fixed-seed goldens of every self-KD method, so a refactor can prove it keeps the numbers (issue 16, item 5).

Each method (every name of `timm_selfkd.list_methods()`, the stack `ddgsd+dlb` and the VARIANTS) trains resnet18 for one epoch
(PS-KD two, see PINS) on the CPU, seed 0, with this checkout's `train.py`, on a tiny seeded image folder (6 classes
x 8 train and x 4 validation images, 32x32) written to a temporary directory. A golden is the run's last
summary.csv row (as written) and a sha256 of its final weights (`last.pth.tar`'s `state_dict`) and of its
`task_state`. `check` reruns the methods and compares: one line per method, exit status 1 if any differs.
Timing columns are not compared.

Record the goldens before a refactor, check them after it (runs take seconds each, two at a time):
    python benchmarks/goldens.py record --out benchmarks/results/goldens_cpu.json [--methods dlb,bake]
    python benchmarks/goldens.py check --against benchmarks/results/goldens_cpu.json [--methods dlb] \
        [--pin mrkd:--mrkd-interval=3]
`--pin METHOD:FLAGS` appends flags to one method's command line (to see that a check catches a change).
The subprocesses import `timm_selfkd` from the checkout this script lives in and run with one thread.
"""
import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose train.py and timm_selfkd are run
sys.path.insert(0, str(ROOT))
import timm_selfkd  # noqa: E402

STACKS = ['ddgsd+dlb']
# Method-specific flags (appended to COMMON; the last of a repeated flag wins): a true-class probability other than
# the default, MrKD's weight ring refreshed inside the epoch (6 steps), PS-KD's alpha_T named and a second epoch
# (epoch 0 trains on the labels alone, as no image has a past prediction yet: one epoch would equal `none`).
PINS: Dict[str, List[str]] = {
    'lsrkd_tc': ['--lsrkd-tc-gamma', '0.25'],
    'mrkd': ['--mrkd-interval', '2'],
    'mrkd_tc': ['--mrkd-tc-gamma', '0.25', '--mrkd-tc-interval', '2'],
    'pskd': ['--pskd-alpha-t', '0.8', '--epochs', '2'],
}
# Further entries: a name -> (the method, its flags). Re-recorded on purpose after the redesign: multi_exit (the
# BYOT hint summed over the batch, as BYOT's code; its DMFL-only run has no hint and did not change), bake and cskd
# (their anchors drawn from the run's index sampler, which --aug-repeats replaces by timm's RepeatAugSampler).
# mixskd re-recorded on purpose (issue 24): its own mixup pairs image i with a random permutation's partner, as the
# official mixup_data's torch.randperm, instead of image n-1-i.
# The whole file re-recorded on 2026-12-06 on this release's check machine (torch 2.14.1, timm 1.0.31, 2-core Intel
# Xeon): the file recorded before did not reproduce there even at unchanged code (every entry differed, float
# kernels of another CPU or build); recorded from main after issue 24's refactor, which kept every entry of a
# baseline recorded there from the commit before it (660c5ab) bit for bit, mixskd excepted (above). Goldens are
# numbers of one machine: record a baseline on yours before a refactor, check after.
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    'multi_exit/dmfl_only': ('multi_exit', ['--no-multi-exit-byot']),
    'multi_exit/pskd_dmfl': ('multi_exit', ['--multi-exit-pskd', '--no-multi-exit-byot', '--epochs', '2']),
}
COMMON = ['--model', 'resnet18', '--img-size', '32', '-b', '8', '--epochs', '1', '--lr', '0.05', '--sched', 'none',
          '--warmup-epochs', '0', '--workers', '0', '--seed', '0', '--device', 'cpu']
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 8, 4


def is_timing(column: str) -> bool:
    """Columns that measure time (summary.csv's `train_time`) change from run to run and are not compared."""
    return 'time' in column or 'seconds' in column


def write_image_folder(root: Path, per_class: int, seed: int) -> None:
    """Class k's images are noisy versions of one colour."""
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        folder = root / f'class_{label}'
        folder.mkdir(parents=True)
        colour = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29 + 90) % 256])
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f'{i}.png')


def digest(value: Any, h: 'hashlib._Hash') -> None:
    """Feed tensors' bytes (dicts in sorted key order, keys included) and other values' repr into `h`."""
    if isinstance(value, torch.Tensor):
        h.update(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        for item in value:
            digest(item, h)
    else:
        h.update(repr(value).encode())


def sha256(value: Any) -> Optional[str]:
    if value is None:
        return None
    h = hashlib.sha256()
    digest(value, h)
    return h.hexdigest()


def run_method(entry: str, data: Path, out: Path, extra: List[str]) -> Dict[str, Any]:
    """Train a method (or a variant of one) for one epoch; its summary row and the hashes of its last checkpoint."""
    method, flags = VARIANTS.get(entry, (entry, []))
    experiment = entry.replace('/', '-')
    cmd = [sys.executable, 'train.py', '--data-dir', str(data), *COMMON, '--output', str(out), '--experiment',
           experiment, '--selfkd', method, *PINS.get(method, []), *flags, *extra]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {'error': f'exit {proc.returncode}: ' + ' | '.join(tail)}
    with open(out / experiment / 'summary.csv', newline='') as f:
        summary = list(csv.DictReader(f))[-1]
    checkpoint = torch.load(out / experiment / 'last.pth.tar', map_location='cpu', weights_only=False)
    return {'summary': summary, 'weights_sha256': sha256(checkpoint['state_dict']),
            'task_state_sha256': sha256(checkpoint.get('task_state'))}


def run_all(methods: List[str], pins: Dict[str, List[str]]) -> Dict[str, Dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix='goldens-') as tmp:
        data = Path(tmp) / 'data'
        write_image_folder(data / 'train', TRAIN_PER_CLASS, seed=0)
        write_image_folder(data / 'validation', VAL_PER_CLASS, seed=1)
        with ThreadPoolExecutor(2) as pool:
            futures = {m: pool.submit(run_method, m, data, Path(tmp) / 'out', pins.get(m, [])) for m in methods}
            return {m: future.result() for m, future in futures.items()}


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    if 'error' in new:
        return [f'run failed: {new["error"]}']
    found = []
    for column in sorted(set(old['summary']) | set(new['summary'])):
        before, after = old['summary'].get(column), new['summary'].get(column)
        if not is_timing(column) and before != after:
            found.append(f'{column} {before} -> {after}')
    found += [f'{key} differs' for key in ('weights_sha256', 'task_state_sha256') if old.get(key) != new.get(key)]
    return found


def parse_pins(pins: List[str]) -> Dict[str, List[str]]:
    parsed: Dict[str, List[str]] = {}
    for pin in pins:
        method, _, flags = pin.partition(':')
        parsed.setdefault(method, []).extend(shlex.split(flags))
    return parsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    record = sub.add_parser('record', help='run the methods and write their goldens')
    record.add_argument('--out', required=True, type=Path, help='JSON file (entries of other methods are kept)')
    check = sub.add_parser('check', help='rerun the methods and compare them with recorded goldens')
    check.add_argument('--against', required=True, type=Path)
    check.add_argument('--pin', action='append', default=[], metavar='METHOD:FLAGS',
                       help='extra flags of one method, e.g. mrkd:--mrkd-interval=3 (repeatable)')
    for p in (record, check):
        p.add_argument('--methods', default='', help='comma-separated (default: all; for check, all recorded)')
    args = parser.parse_args()
    chosen = [m for m in args.methods.split(',') if m]
    start = time.time()
    print(f'timm_selfkd from {Path(timm_selfkd.__file__).parent}, train.py of {ROOT}', file=sys.stderr)
    if args.command == 'record':
        results = run_all(chosen or timm_selfkd.list_methods() + STACKS + list(VARIANTS), {})
        goldens = json.loads(args.out.read_text()) if args.out.exists() else {}
        goldens.update({m: r for m, r in results.items() if 'error' not in r})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(goldens, indent=1, sort_keys=True) + '\n')
        for method, result in results.items():
            print(f'{method}: {result.get("error", "recorded")}')
        print(f'{len(results)} methods in {time.time() - start:.0f} s -> {args.out}')
        return int(any('error' in r for r in results.values()))
    goldens = json.loads(args.against.read_text())
    methods = chosen or list(goldens)
    missing = [m for m in methods if m not in goldens]
    if missing:
        parser.error(f'no goldens for {", ".join(missing)} in {args.against}')
    pins = parse_pins(args.pin)
    if set(pins) - set(methods):
        parser.error(f'--pin of a method not checked: {", ".join(sorted(set(pins) - set(methods)))}')
    results = run_all(methods, pins)
    failed = False
    for method in methods:
        found = differences(goldens[method], results[method])
        failed |= bool(found)
        print(f'{method}: ' + ('; '.join(found) if found else 'same'))
    print(f'{len(methods)} methods in {time.time() - start:.0f} s: {"DIFFERENT" if failed else "all same"}')
    return int(failed)


if __name__ == '__main__':
    sys.exit(main())
