"""Top-1 accuracy of every registered method at its paper defaults against plain training, over several seeds,
at equal epochs and at equal images seen.

Every run is `train.py -c RECIPE --selfkd METHOD --seed S` (default recipe: the CPU demo, resnet18 at 32x32 on a
Fashion-MNIST subset). A method's epoch may read more images than plain training's (DLB repeats half of each
batch, BAKE adds same-class images), so plain training also runs for as many epochs as match each method's images
(steps x batch); the table compares each method with plain training at equal epochs and at about equal images.
`--train-label-noise P [P ...]` repeats everything with symmetric noise on the training labels (the robustness
setting of the DLB paper's fig. 2; the validation set stays clean).

Writes `NAME.md` (tables: mean and standard deviation over seeds, and every run's images, steps and time),
`NAME_runs.csv` and, with matplotlib (`pip install -e ".[bench]"`), the chart `NAME.png` and a `curves.png` of
loss terms and top-1 next to each run's `summary.csv`. Finished runs are reused when the benchmark is run again
with the same options (delete `--work-dir` to start over).

Usage:
    python benchmarks/accuracy.py                                  # every method, 3 seeds
    python benchmarks/accuracy.py --train-label-noise 0 0.2 0.4     # fig. 2 of the DLB paper, on Fashion-MNIST
    python benchmarks/accuracy.py --quick                           # a smoke run of a few minutes
    python benchmarks/accuracy.py --methods dlb,bake --epochs 8 -- --lr 0.1   # after --: more train.py flags
"""
import argparse
import csv
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from itertools import groupby
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark this checkout, installed or not
sys.path.insert(0, str(REPO / 'benchmarks'))
from compat_matrix import matrix_methods  # noqa: E402
from timm_selfkd import get_method  # noqa: E402

DEFAULT_RECIPE = REPO / 'configs' / 'demo_fashion_mnist.yaml'
QUICK_FLAGS = ['--train-subset', '128', '--val-subset', '64', '-b', '16']  # with --epochs 1 and seeds 0 1


@dataclass
class Run:
    """One training run, as read back from its summary.csv."""
    method: str
    noise: float
    seed: int
    epochs: int
    top1: float = float('nan')  # final epoch
    best: float = float('nan')
    images: float = 0.
    steps: float = 0.
    train_time: float = 0.
    wall_time: float = 0.
    error: str = ''


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--recipe', type=Path, default=DEFAULT_RECIPE, help='train.py recipe of every run')
    parser.add_argument('--methods', default='all', help='comma-separated methods, or all: every registered method and '
                        'every stack a shipped recipe uses (plain training always runs)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=None, help='epochs of every method (default: the recipe\'s)')
    parser.add_argument('--train-label-noise', type=float, nargs='+', default=[0.0], metavar='P',
                        help='fractions of wrong training labels, each in [0, 1) (default: 0)')
    parser.add_argument('--name', default=None, help='file name of the results (default: from the options)')
    parser.add_argument('--output-dir', type=Path, default=REPO / 'benchmarks' / 'results')
    parser.add_argument('--work-dir', type=Path, default=Path('output') / 'accuracy', help='the runs\' folders')
    parser.add_argument('--keep-checkpoints', action='store_true', help='keep each run\'s checkpoints')
    parser.add_argument('--quick', action='store_true', help=f'smoke run: seeds 0 1, 1 epoch, {" ".join(QUICK_FLAGS)}')
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != '--']
    names = matrix_methods() if args.methods == 'all' else [m.strip() for m in args.methods.split(',') if m.strip()]
    for name in names:
        try:
            get_method(name)
        except ValueError as e:
            parser.error(str(e))
    args.methods = ['none'] + [m for m in dict.fromkeys(names) if m != 'none']
    if any(not 0 <= p < 1 for p in args.train_label_noise):
        parser.error(f'--train-label-noise values must be in [0, 1), got {args.train_label_noise}')
    if args.quick:
        args.seeds, args.epochs, extra = [0, 1], 1, QUICK_FLAGS + extra
    if args.epochs is None:
        with open(args.recipe) as f:
            args.epochs = int(yaml.safe_load(f)['epochs'])
    if args.name is None:
        noise = '' if args.train_label_noise == [0.0] else '_noise' + '-'.join(f'{p:g}' for p in args.train_label_noise)
        args.name = f'accuracy_{args.recipe.stem}{"_quick" if args.quick else ""}{noise}'
    return args, extra


class Runner:
    """Runs train.py (a subprocess per run, output in `work_dir/NAME/`), reusing finished runs."""

    def __init__(self, args: argparse.Namespace, extra: List[str]):
        self.args = args
        self.extra = extra
        self.runs: Dict[Tuple[str, float, int, int], Run] = {}

    def run(self, method: str, noise: float, seed: int, epochs: int) -> Run:
        key = (method, noise, seed, epochs)
        if key in self.runs:
            return self.runs[key]
        name = f'{method}-noise{noise:g}-seed{seed}-epochs{epochs}'
        folder = self.args.work_dir / name
        cmd = [sys.executable, str(REPO / 'train.py'), '-c', str(self.args.recipe), '--selfkd', method,
               '--seed', str(seed), '--epochs', str(epochs), '--train-label-noise', str(noise),
               '--output', str(self.args.work_dir), '--experiment', name, '--checkpoint-hist', '1', *self.extra]
        record = folder / 'benchmark.json'
        run = Run(method, noise, seed, epochs)
        if record.exists() and json.loads(record.read_text())['cmd'] == cmd:
            run.wall_time = json.loads(record.read_text())['wall_time']
            print(f'reused   {name}', flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # unfinished or other options: train.py would append to it
            self.args.work_dir.mkdir(parents=True, exist_ok=True)
            start = time.time()
            with open(self.args.work_dir / f'{name}.log', 'w') as log:
                result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            run.wall_time = time.time() - start
            if result.returncode != 0:
                lines = (self.args.work_dir / f'{name}.log').read_text().strip().splitlines()
                run.error = lines[-1] if lines else f'exit status {result.returncode}'
                print(f'FAILED   {name}: {run.error}', flush=True)
                self.runs[key] = run
                return run
            record.write_text(json.dumps({'cmd': cmd, 'wall_time': run.wall_time}))
            if not self.args.keep_checkpoints:
                for checkpoint in glob.glob(str(folder / '*.pth.tar')):
                    os.remove(checkpoint)
        self._read_summary(run, folder)
        plot_curves(folder, name)
        print(f'finished {name}: top-1 {run.top1:.2f}, {run.images:.0f} images, {run.steps:.0f} steps, '
              f'{run.train_time:.0f} s', flush=True)
        self.runs[key] = run
        return run

    @staticmethod
    def _read_summary(run: Run, folder: Path) -> None:
        with open(folder / 'summary.csv') as f:
            rows = list(csv.DictReader(f))
        run.top1 = float(rows[-1]['eval_top1'])
        run.best = max(float(r['eval_top1']) for r in rows)
        run.images = sum(float(r['train_images']) for r in rows)
        run.steps = sum(float(r['train_steps']) for r in rows)
        run.train_time = sum(float(r['train_time']) for r in rows)


def equal_image_epochs(method_images: float, plain_images_per_epoch: float) -> int:
    """The plain-training epochs whose images come closest to a method's run."""
    return max(1, round(method_images / plain_images_per_epoch))


def benchmark(args: argparse.Namespace, runner: Runner) -> List[Tuple[float, str, List[Run], List[Run]]]:
    """Every (noise, method): its runs over the seeds, and plain training's runs at about equal images."""
    rows = []
    for noise in args.train_label_noise:
        for seed in args.seeds:
            plain = runner.run('none', noise, seed, args.epochs)
            for method in args.methods[1:]:
                run = runner.run(method, noise, seed, args.epochs)
                if not run.error and not plain.error:
                    runner.run('none', noise, seed, equal_image_epochs(run.images, plain.images / plain.epochs))
        for method in args.methods:
            runs = [runner.runs[(method, noise, seed, args.epochs)] for seed in args.seeds]
            matched = []
            for seed, run in zip(args.seeds, runs):
                plain = runner.runs[('none', noise, seed, args.epochs)]
                if not run.error and not plain.error:
                    matched.append(runner.runs[('none', noise, seed, equal_image_epochs(
                        run.images, plain.images / plain.epochs))])
            rows.append((noise, method, runs, matched))
    return rows


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN (failed runs)
    if not values:
        return float('nan'), float('nan')
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.


def _fmt(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return 'failed' if mean != mean else f'{mean:.2f} ± {sd:.2f}'


def finished(runs: Sequence[Run]) -> List[Run]:
    """The runs that ended without an error."""
    return [r for r in runs if not r.error]


def reads_more(matched: Sequence[Run], plain: Sequence[Run]) -> bool:
    """Whether plain training at equal images (`matched`) runs other epochs than at equal epochs (`plain`): the
    method reads each image more than once per epoch."""
    return bool({r.epochs for r in matched} - {r.epochs for r in plain})


def vs_plain(runs: Sequence[Run], plain: Sequence[Run]) -> Tuple[float, List[float]]:
    """A method's top-1 change over plain training: the difference of the means over the finished runs (the
    tables' figure), and each seed's own difference (the seeds where both runs finished)."""
    ok, base = finished(runs), finished(plain)
    delta = mean_sd([r.top1 for r in ok])[0] - mean_sd([r.top1 for r in base])[0]
    plain_by_seed = {r.seed: r.top1 for r in base}
    return delta, [r.top1 - plain_by_seed[r.seed] for r in ok if r.seed in plain_by_seed]


def write_markdown(path: Path, args: argparse.Namespace, extra: List[str], rows, runner: Runner) -> None:
    seeds = ', '.join(map(str, args.seeds))
    lines = ['# Accuracy: self-KD methods against plain training', '',
             f'`python benchmarks/accuracy.py {" ".join(sys.argv[1:])}`', '',
             f'Recipe `{os.path.relpath(args.recipe, REPO)}`{" + `" + " ".join(extra) + "`" if extra else ""}; '
             f'every method at its paper defaults; seeds {seeds}; top-1 of the last epoch on the (clean) validation '
             f'set, mean ± standard deviation over the seeds. Run on {time.strftime("%Y-%m-%d")}, '
             f'{os.cpu_count()} CPU cores.', '']
    for noise, group in groupby(rows, key=lambda row: row[0]):
        group = list(group)
        plain = next(runs for _, method, runs, _ in group if method == 'none')
        lines += [f'## Training label noise {noise:g}' if len(args.train_label_noise) > 1 or noise else
                  '## Clean training labels', '',
                  f'Equal epochs ({args.epochs}) and equal images (plain training for as many epochs as match the '
                  'method\'s images):', '',
                  '| method | top-1, equal epochs | vs plain | images | steps | train time (s) | '
                  'plain, equal images: epochs | top-1 | method vs plain |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for _, method, runs, matched in group:
            ok = finished(runs)
            delta = f'{vs_plain(runs, plain)[0]:+.2f}' if ok and method != 'none' else ''
            row = [method, _fmt([r.top1 for r in ok]) if ok else 'failed: ' + runs[0].error.replace('|', '/'),
                   delta, f'{mean_sd([r.images for r in ok])[0]:.0f}', f'{mean_sd([r.steps for r in ok])[0]:.0f}',
                   f'{mean_sd([r.train_time for r in ok])[0]:.0f}']
            if matched and method != 'none':
                epochs = sorted({r.epochs for r in matched})
                row += ['/'.join(map(str, epochs)), _fmt([r.top1 for r in matched]),
                        f'{vs_plain(runs, matched)[0]:+.2f}']
            else:
                row += ['', '', '']
            lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')
    lines += ['## Every run', '', '| method | label noise | seed | epochs | final top-1 | best top-1 | images | steps | '
              'train time (s) | wall time (s) |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for run in sorted(runner.runs.values(), key=lambda r: (r.noise, r.method != 'none', r.method, r.epochs, r.seed)):
        lines.append(f'| {run.method} | {run.noise:g} | {run.seed} | {run.epochs} | {run.top1:.2f} | {run.best:.2f} | '
                     f'{run.images:.0f} | {run.steps:.0f} | {run.train_time:.0f} | {run.wall_time:.0f} |'
                     if not run.error else f'| {run.method} | {run.noise:g} | {run.seed} | {run.epochs} | failed: '
                     f'{run.error.replace("|", "/")} | | | | | |')
    path.write_text('\n'.join(lines) + '\n')


def write_runs_csv(path: Path, runner: Runner) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Run)])
        writer.writeheader()
        for run in runner.runs.values():
            writer.writerow(asdict(run))


def read_runs_csv(path: Path) -> List[Run]:
    """The runs a `NAME_runs.csv` records (as `write_runs_csv` wrote them)."""
    types = {field.name: field.type for field in fields(Run)}
    with open(path, newline='') as f:
        return [Run(**{key: types[key](value) for key, value in row.items()}) for row in csv.DictReader(f)]


class RecordedRunner:
    """The runs of a finished benchmark, looked up as `Runner.run` finds them; it never trains."""

    def __init__(self, runs: Sequence[Run]):
        self.runs = {(r.method, r.noise, r.seed, r.epochs): r for r in runs}

    def run(self, method: str, noise: float, seed: int, epochs: int) -> Run:
        if (method, noise, seed, epochs) not in self.runs:
            raise ValueError(f'no recorded run of {method} at noise {noise:g}, seed {seed}, {epochs} epochs')
        return self.runs[(method, noise, seed, epochs)]


def recorded_benchmark(path: Path) -> Tuple[argparse.Namespace, list]:
    """A finished benchmark read back from its `NAME_runs.csv`: its options (noise levels, seeds, methods and
    epochs, in the order it ran them) and `benchmark`'s rows, matched at equal images as when it ran."""
    runs = read_runs_csv(path)
    if not runs or runs[0].method != 'none':
        raise ValueError(f'{path} does not start with a plain run: not a benchmark\'s runs')
    args = argparse.Namespace(train_label_noise=list(dict.fromkeys(r.noise for r in runs)),
                              seeds=list(dict.fromkeys(r.seed for r in runs)),
                              methods=list(dict.fromkeys(r.method for r in runs)), epochs=runs[0].epochs)
    return args, benchmark(args, RecordedRunner(runs))


def _pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_curves(folder: Path, title: str) -> None:
    """Loss terms and validation top-1 per epoch of one run, as `curves.png` next to its summary.csv."""
    plt = _pyplot()
    if plt is None:
        return
    from matplotlib.ticker import MaxNLocator
    with open(folder / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r['epoch']) for r in rows]
    figure, (losses, top1) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in (k for k in rows[0] if k.startswith('train_loss')):
        losses.plot(epochs, [float(r[key]) for r in rows], marker='o', label=key[len('train_'):])
    losses.set(xlabel='epoch', ylabel='training loss (epoch mean)')
    losses.legend(fontsize=8)
    top1.plot(epochs, [float(r['eval_top1']) for r in rows], marker='o', color='black')
    top1.set(xlabel='epoch', ylabel='validation top-1 (%)')
    for ax in (losses, top1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(folder / 'curves.png', dpi=80)
    plt.close(figure)


OFF_SCALE = 15.0  # points below plain training's mean: a method's mean beyond is drawn at the chart's edge


def _top1_panel(ax, methods: Sequence[str], table, noise: float) -> None:
    """One row per method: its top-1 (mean, sd bars) and plain training's at equal images where that differs from
    equal epochs, against a band of plain training's at equal epochs (mean +- sd); the top-1 axis is cut to the
    data, which the axis label says."""
    plain = mean_sd([r.top1 for r in finished(table[(noise, 'none')][0])])
    method = {m: mean_sd([r.top1 for r in finished(table[(noise, m)][0])]) for m in methods}
    matched = {m: mean_sd([r.top1 for r in table[(noise, m)][1]]) for m in methods
               if reads_more(table[(noise, m)][1], table[(noise, 'none')][0])}
    shown = [s for s in [plain, *method.values(), *matched.values()] if s[0] == s[0]]
    low = max(min(mean - sd for mean, sd in shown), plain[0] - OFF_SCALE) - 1
    high = min(100, max(mean + sd for mean, sd in shown) + 1)
    ax.axvspan(plain[0] - plain[1], plain[0] + plain[1], color='0.88', lw=0)
    ax.axvline(plain[0], color='0.4', lw=1, label='plain training, equal epochs (band: ± sd)')
    rows = range(len(methods))
    for y, m in zip(rows, methods):
        runs = table[(noise, m)][0]
        mean, sd = method[m]
        notes = [f'{sum(bool(r.error) for r in runs)} of {len(runs)} seeds failed'] if finished(runs) != runs else []
        if mean == mean and mean < low:
            notes.insert(0, f'{mean:.1f} ± {sd:.1f}: off scale')
            ax.plot(low, y, '<', color='tab:blue', ms=7, clip_on=False)
        elif mean == mean:
            ax.errorbar(mean, y, xerr=sd, fmt='o', color='tab:blue', ms=6, capsize=3,
                        label='method (mean, bars ± sd over seeds)')
        if notes:
            ax.annotate('; '.join(notes), (mean if mean >= low else low, y), xytext=(8, 0),
                        textcoords='offset points', va='center', fontsize=8)
        if m in matched:
            ax.errorbar(matched[m][0], y + 0.3, xerr=matched[m][1], fmt='D', color='black', mfc='white', ms=5,
                        capsize=3, label='plain training, equal images')
    ax.set_yticks(list(rows), methods)
    ax.set_ylim(len(methods) - 0.4, -0.6)
    ax.set_xlim(low, high)
    ax.set_xlabel(f'validation top-1 (%); the axis starts at {low:.0f}, not at 0')
    ax.set_title(f'training label noise {noise:g}' if noise else 'clean training labels', fontsize=10)
    ax.grid(True, axis='x', color='0.92')


def plot_chart(path: Path, args: argparse.Namespace, rows) -> bool:
    """Per noise level, a row per method: its top-1 (mean, sd bars) against plain training's at equal epochs and
    at equal images; with several noise levels, top-1 against the noise rate too (the DLB paper's fig. 2)."""
    plt = _pyplot()
    if plt is None:
        return False
    noises = args.train_label_noise
    methods = args.methods[1:]
    heights = [0.34 * len(methods) + 1.3] * len(noises) + [3.6] * (len(noises) > 1)
    figure, axes = plt.subplots(len(heights), 1, figsize=(8, sum(heights) + 0.6), squeeze=False,
                                gridspec_kw={'height_ratios': heights})
    axes = axes[:, 0]
    table = {(noise, method): (runs, matched) for noise, method, runs, matched in rows}
    for ax, noise in zip(axes, noises):
        _top1_panel(ax, methods, table, noise)
    if len(noises) > 1:
        ax = axes[-1]
        for method in args.methods:
            stats = [mean_sd([r.top1 for r in finished(table[(noise, method)][0])]) for noise in noises]
            ax.errorbar(noises, [s[0] for s in stats], yerr=[s[1] for s in stats], marker='o', capsize=3,
                        label='plain' if method == 'none' else method)
        ax.set(xlabel='training label noise', ylabel='validation top-1 (%)\n(axis not from 0)')
        ax.set_title(f'equal epochs ({args.epochs})', fontsize=10)
        ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5))
    seeds = f'seeds {", ".join(map(str, args.seeds))}' if len(args.seeds) > 1 else \
        f'seed {args.seeds[0]} only: no spread'
    figure.suptitle(f'Top-1 of every method and of plain training, {args.epochs} epochs, {seeds}', fontsize=10)
    legend = dict(zip(*reversed(axes[0].get_legend_handles_labels())))  # one entry per label
    figure.legend(legend.values(), legend.keys(), loc='lower center', ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.5 / (sum(heights) + 0.6), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main(argv: Optional[List[str]] = None) -> None:
    args, extra = parse_args(argv)
    runner = Runner(args, extra)
    rows = benchmark(args, runner)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    markdown = args.output_dir / f'{args.name}.md'
    write_markdown(markdown, args, extra, rows, runner)
    write_runs_csv(args.output_dir / f'{args.name}_runs.csv', runner)
    charted = plot_chart(args.output_dir / f'{args.name}.png', args, rows)
    print(markdown.read_text())
    print(f'wrote {markdown}, {args.name}_runs.csv' + (f', {args.name}.png' if charted else
                                                       ' (no chart: pip install matplotlib, or -e ".[bench]")'))


if __name__ == '__main__':
    main()
