"""Every chart of the committed benchmark results, and the README's method guide, from the files the benchmarks
wrote (no number is typed in here).

- `benchmarks/results/gain_vs_cost.png`: each method's top-1 change over plain training against the training
  time of the comparison, at equal images and at equal epochs, with the seed spread (`benchmarks/evidence.py`
  says which runs and step times).
- `benchmarks/results/NAME.png` for every `NAME_runs.csv` of `benchmarks/accuracy.py`: redrawn from the runs.
- README.md between `<!-- guide -->` and `<!-- /guide -->`: the tables of "Which method?" (`benchmarks/guide.py`).

Usage:
    python benchmarks/charts.py           # every chart (needs matplotlib: pip install -e ".[bench]") and the README
    python benchmarks/charts.py --check   # exit 1 if the README's guide is not the rendering of the results
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import accuracy  # noqa: E402
import guide  # noqa: E402
from compat_matrix import splice  # noqa: E402
from evidence import RESULTS, SETTINGS, Change, Evidence, setting, step_costs  # noqa: E402

README = REPO / 'README.md'
MARKERS = ('<!-- guide -->', '<!-- /guide -->')
GAIN_VS_COST = 'gain_vs_cost.png'
PANELS = {'demo': 'demo recipe (first wave 3 seeds, second wave 2 seeds)',
          'modern': 'modern recipe: mixup, CutMix, label smoothing (2 seeds)'}
CLIP = 8.0  # points: a change beyond this is drawn at the panel's edge, its value in its label
TIME_TICKS = (0.7, 1, 1.5, 2, 3, 4, 5)


def _y_range(evidence: Sequence[Evidence]) -> tuple:
    changes = [c for e in evidence for c in (e.equal_epochs, e.equal_images) if c.per_seed]
    low = min(min(c.per_seed) for c in changes)
    high = max(max(c.per_seed) for c in changes)
    return max(low, -CLIP) - 0.6, min(high, CLIP) + 0.6


def _on_scale(delta: float, y_range) -> float:
    """Where a change is drawn: itself, or just inside the panel's edge when it lies beyond it."""
    low, high = y_range
    return delta if low < delta < high else min(max(delta, low + 0.3), high - 0.3)


def _draw_change(ax, change: Change, filled: bool, y_range) -> tuple:
    """One comparison's marker, seed range (vertical) and step-ratio quartiles (horizontal); its drawn point."""
    y = _on_scale(change.delta, y_range)
    off_scale = y != change.delta
    seeds = (min(change.per_seed), max(change.per_seed)) if change.per_seed else (y, y)
    ax.errorbar(change.time, y, xerr=[[change.time - change.time_low], [change.time_high - change.time]],
                yerr=None if off_scale else [[max(0, y - seeds[0])], [max(0, seeds[1] - y)]],
                fmt='v' if off_scale else 'o', ms=6, color='tab:blue', mfc='tab:blue' if filled else 'white',
                mew=1.3, elinewidth=0.8, ecolor='0.6', capsize=0, zorder=3)
    return change.time, y


def _error_bar_boxes(ax, evidence: Sequence[Evidence], y_range) -> list:
    """Display boxes of the error bars, for the labels to keep clear of."""
    from matplotlib.transforms import Bbox
    boxes = []
    low, high = y_range
    for e in evidence:
        for change in (e.equal_images, e.equal_epochs) if e.reads_more else (e.equal_images,):
            y = _on_scale(change.delta, y_range)
            if change.per_seed:
                (x0, y0), (x1, y1) = ax.transData.transform([(change.time, max(min(change.per_seed), low)),
                                                             (change.time, min(max(change.per_seed), high))])
                boxes.append(Bbox.from_extents(x0 - 1, y0, x1 + 1, y1))
            (x0, y0), (x1, y1) = ax.transData.transform([(change.time_low, y), (change.time_high, y)])
            boxes.append(Bbox.from_extents(x0, y0 - 1, x1, y1 + 1))
    return boxes


def _label(e: Evidence, change: Change, y: float) -> str:
    return e.method if y == change.delta else f'{e.method} ({change.delta:+.1f}, off scale)'


def gain_vs_cost_chart(path: Path, panels: Dict[str, Dict[str, Evidence]]) -> None:
    """One panel per setting: every method's top-1 change over plain training against the time of the comparison
    (log scale), at equal images (filled) and, for methods whose epoch reads more images, at equal epochs (hollow,
    joined to the other by a dotted line)."""
    plt = accuracy._pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator
    from label_placement import place_labels
    y_range = _y_range([e for evidence in panels.values() for e in evidence.values()])
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 5.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, evidence) in zip(axes[:, 0], panels.items()):
        ax.set_xscale('log')
        ax.set_xlim(min(TIME_TICKS) * 0.93, max(TIME_TICKS) * 1.1)
        ax.set_ylim(*y_range)
        ax.xaxis.set_major_locator(FixedLocator(TIME_TICKS))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(lambda value, _: f'{value:g}x')
        ax.axhline(0, color='0.3', lw=0.8, zorder=1)
        ax.axvline(1, color='0.3', lw=0.8, ls=':', zorder=1)
        ax.grid(True, color='0.92', zorder=0)
        ax.set_ylabel('top-1 change over plain training (points)')
        ax.set_title(PANELS.get(name, name), fontsize=10)
        points, labels = [], []
        for e in evidence.values():
            x, y = _draw_change(ax, e.equal_images, True, y_range)
            points.append((x, y))
            labels.append(_label(e, e.equal_images, y))
            if e.reads_more:
                x2, y2 = _draw_change(ax, e.equal_epochs, False, y_range)
                ax.plot([x, x2], [y, y2], ls=':', color='tab:blue', lw=0.8, zorder=2)
                points.append((x2, y2))
                labels.append(_label(e, e.equal_epochs, y2))
        figure.tight_layout(rect=(0, 0.07, 1, 0.96))
        place_labels(ax, points, labels, _error_bar_boxes(ax, evidence.values(), y_range), fontsize=8.5)
    axes[-1, 0].set_xlabel('training time over plain training\'s (log scale; CPU step time x steps)')
    figure.suptitle('Top-1 change over plain training against training time\nresnet18, 4 epochs on 4000 '
                    'Fashion-MNIST images, CPU: most changes lie within the seed spread', fontsize=10)
    handles = [Line2D([], [], marker='o', ls='', color='tab:blue', label='equal images (and equal epochs where '
                      'the method reads each image once per epoch)'),
               Line2D([], [], marker='o', ls=':', color='tab:blue', mfc='white',
                      label='equal epochs, for methods that read more images per epoch (twice the steps)'),
               Line2D([], [], color='0.6', label='bars: lowest to highest per-seed change; quartiles of the '
                      'step-time ratio')]
    figure.legend(handles=handles, loc='lower center', fontsize=8.5, frameon=False)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def accuracy_charts(results: Path = RESULTS) -> List[Path]:
    """`benchmarks/accuracy.py`'s chart of every `NAME_runs.csv`, redrawn from the runs as `NAME.png`."""
    written = []
    for runs in sorted(results.glob('*_runs.csv')):
        args, rows = accuracy.recorded_benchmark(runs)
        chart = runs.with_name(runs.name[:-len('_runs.csv')] + '.png')
        accuracy.plot_chart(chart, args, rows)
        written.append(chart)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='benchmarks/charts.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true', help='only check that the README\'s guide is up to date')
    parser.add_argument('--readme', type=Path, default=README)
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text()
        costs = step_costs()
        measured = {name: setting(name, costs) for name in SETTINGS}
        updated = splice(text, guide.render(measured, costs), MARKERS)
    except (OSError, ValueError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f'{parser.prog}: {args.readme}\'s guide is not the rendering of the results: run '
                  f'python benchmarks/charts.py', file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    if accuracy._pyplot() is None:
        print(f'{parser.prog}: wrote the README\'s guide; no charts: pip install matplotlib (or -e ".[bench]")')
        return 0
    gain_vs_cost_chart(RESULTS / GAIN_VS_COST, {name: measured[name] for name in PANELS})
    charts = [RESULTS / GAIN_VS_COST] + accuracy_charts()
    print(f'wrote {args.readme} (guide) and ' + ', '.join(str(c.relative_to(REPO)) for c in charts))
    return 0


if __name__ == '__main__':
    sys.exit(main())
