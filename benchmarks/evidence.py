"""What the committed benchmark results say about each method, read from the files the benchmarks wrote: its
step-time ratio to plain training (`benchmarks/overhead.py`'s table) and its top-1 change over plain training at
equal epochs and at equal images, per seed (`benchmarks/accuracy.py`'s runs, matched as that benchmark matches
them). The charts (`benchmarks/charts.py`) and the README's method guide (`benchmarks/guide.py`) draw on it.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
from accuracy import finished, mean_sd, reads_more, recorded_benchmark, vs_plain  # noqa: E402

RESULTS = REPO / 'benchmarks' / 'results'
# The step costs: CPU clock, one thread, resnet18 at 64x64, batch 64; a method is taken from the first file with it.
COST_FILES = ('overhead_cpu_resnet18_cpuclock.md', 'overhead_cpu_resnet18_second_wave.md')
# The accuracy runs of each setting (resnet18 on a 4000-image Fashion-MNIST subset, 4 epochs); a method is taken
# from the first file with it, against that file's own plain runs.
SETTINGS = {
    'demo': ('accuracy_demo_fashion_mnist_runs.csv', 'accuracy_demo_fashion_mnist_second_wave_runs.csv'),
    'modern': ('accuracy_modern_fashion_mnist_resnet18_runs.csv',),
    'noise0.4': ('accuracy_demo_fashion_mnist_noise0.4_runs.csv',),
}


def read_markdown_table(path: Path, first_column: str) -> Dict[str, Dict[str, str]]:
    """The rows of the first markdown table in `path` whose first column is `first_column`, each a dict by column
    name, keyed by that column's cell."""
    rows: Dict[str, Dict[str, str]] = {}
    header: List[str] = []
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')] if line.startswith('|') else []
        if not header:
            header = cells if cells[:1] == [first_column] else []
        elif not cells:
            break
        elif not set(''.join(cells)) <= set('-:'):  # the alignment row
            rows[cells[0]] = dict(zip(header, cells))
    if not header:
        raise ValueError(f'{path} has no table with a first column "{first_column}"')
    return rows


@dataclass
class StepCost:
    """A method's step time over plain training's at the same images per step: median and quartiles over rounds."""
    ratio: float
    low: float
    high: float


def read_step_costs(path: Path) -> Dict[str, StepCost]:
    """The time ratios of an overhead benchmark's table, by method (its variants `name:key=value` included)."""
    costs = {}
    for method, row in read_markdown_table(path, 'method').items():
        low, high = (float(q) for q in row['ratio IQR'].split('-'))
        costs[method] = StepCost(float(row['time ratio'].rstrip('x')), low, high)
    return costs


@dataclass
class Change:
    """A method's top-1 change over plain training in one comparison (equal epochs or equal images): the
    difference of the means, each seed's difference, and the training time of the method's run over the plain
    run's (step-time ratio x steps over the plain run's steps), with the step ratio's quartiles."""
    delta: float
    per_seed: List[float]
    time: float
    time_low: float
    time_high: float


@dataclass
class Evidence:
    """One method in one setting."""
    method: str
    cost: StepCost
    equal_epochs: Change
    equal_images: Change
    reads_more: bool  # an epoch trains on more images than plain training's: the two comparisons differ
    seeds: int


def step_costs(files: Sequence[Path] = tuple(RESULTS / name for name in COST_FILES)) -> Dict[str, StepCost]:
    """Every method's step cost, from the first of `files` that has it."""
    costs: Dict[str, StepCost] = {}
    for path in files:
        for method, cost in read_step_costs(path).items():
            costs.setdefault(method, cost)
    return costs


def setting(name: str, costs: Dict[str, StepCost]) -> Dict[str, Evidence]:
    """The evidence of one of SETTINGS, from the committed results."""
    return measured([RESULTS / file for file in SETTINGS[name]], costs)


def _change(runs, plain, cost: StepCost) -> Change:
    delta, per_seed = vs_plain(runs, plain)
    steps = mean_sd([r.steps for r in finished(runs)])[0] / mean_sd([r.steps for r in finished(plain)])[0]
    return Change(delta, per_seed, cost.ratio * steps, cost.low * steps, cost.high * steps)


def measured(files: Sequence[Path], costs: Dict[str, StepCost]) -> Dict[str, Evidence]:
    """Every method of the accuracy runs in `files` (in their order; a method from the first file with it),
    against the plain runs of its own file, with its step cost."""
    evidence: Dict[str, Evidence] = {}
    for path in files:
        args, rows = recorded_benchmark(path)
        if len(args.train_label_noise) != 1:
            raise ValueError(f'{path.name}: one label-noise level per file, not {args.train_label_noise}')
        plain = next(runs for _, method, runs, _ in rows if method == 'none')
        for _, method, runs, matched in rows:
            if method == 'none' or method in evidence:
                continue
            if method not in costs:
                raise ValueError(f'{method} has accuracy runs in {path.name} but no step time')
            evidence[method] = Evidence(method, costs[method], _change(runs, plain, costs[method]),
                                        _change(runs, matched, costs[method]),
                                        reads_more(matched, plain), len(args.seeds))
    return evidence
