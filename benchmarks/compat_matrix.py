"""The compatibility matrix: every method x every training feature, as the tests measured it.

The matrix tests (`tests/test_matrix.py`, the resume test of `tests/test_preemption.py`, the CUDA cells of
`tests/test_gpu.py`) record each cell they check when pytest runs with `--matrix-json FILE`: passed (the run
trained and the feature's effect was there), refused (the one-line error and its reason) or failed. This module
renders that file into the README's table, between the markers `<!-- matrix -->` and `<!-- /matrix -->`:

    python -m pytest -q tests/test_matrix.py tests/test_gpu.py \\
        tests/test_preemption.py::test_every_method_resumes_exactly_from_recovery_and_epoch_checkpoints \\
        --matrix-json benchmarks/results/compat_matrix.json
    python benchmarks/compat_matrix.py            # writes the table into README.md
    python benchmarks/compat_matrix.py --check    # exit 1 if README.md is not the rendering of the file

Cells that need CUDA and were not recorded are shown as unmeasured.
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ['Cell', 'CELLS', 'CPU_CELLS', 'CUDA_CELLS', 'matrix_methods', 'merge_results', 'render', 'splice',
           'main']

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results', 'compat_matrix.json')
README = os.path.join(REPO, 'README.md')
BEGIN, END = '<!-- matrix -->', '<!-- /matrix -->'
OUTCOMES = ('passed', 'refused', 'failed')


@dataclass(frozen=True)
class Cell:
    """One column of the matrix.

    Attributes:
        name: Key in the results file.
        label: Column header.
        how: What the test runs (flags, launcher), for the legend.
        cuda: Measured only on CUDA devices (unmeasured elsewhere).
        flags: Option strings a refusal of this cell must name.
    """
    name: str
    label: str
    how: str
    cuda: bool = False
    flags: Tuple[str, ...] = ()


CELLS = (
    Cell('bf16', 'bf16 (CPU)', '`--amp --amp-dtype bfloat16` on the CPU', flags=('--amp',)),
    Cell('fp16', 'fp16 + scaling (CUDA)', '`--amp --amp-dtype float16` on CUDA (loss scaling)', cuda=True,
         flags=('--amp',)),
    Cell('ddp', 'DDP', '`torchrun --nproc_per_node 2`, gloo on the CPU, alone and with `--grad-accum-steps 2` (no '
                       'gradient sync between updates)', flags=('torchrun', 'process')),
    Cell('ema', 'EMA', '`--model-ema`', flags=('--model-ema',)),
    Cell('compile', 'compile', '`--torchcompile aot_eager` (dynamo\'s graph capture and AOT autograd) for every '
                               'method; inductor for one', flags=('--torchcompile',)),
    Cell('channels_last', 'channels-last', '`--channels-last`', flags=('--channels-last',)),
    Cell('grad_accum', 'grad accum', '`--grad-accum-steps 2`', flags=('--grad-accum-steps',)),
    Cell('mixup', 'mixup/cutmix', '`--mixup 0.2 --cutmix 1.0`', flags=('--mixup', '--cutmix')),
    Cell('smoothing', 'smoothing', '`--smoothing 0.1` (loss differs from `--smoothing 0`)', flags=('--smoothing',)),
    Cell('resume', 'resume', '`--resume` of a mid-epoch recovery and an epoch checkpoint, bit-identical '
                             '(tests/test_preemption.py)', flags=('--resume',)),
    Cell('sync_bn', 'sync-BN (CUDA)', '`--sync-bn` under `torchrun --nproc_per_node 2` on two GPUs (under torchrun '
                                      'on the CPU it is refused: SyncBatchNorm needs CUDA; in one process it does '
                                      'nothing, as in timm)', cuda=True,
         flags=('--sync-bn',)),
)
CPU_CELLS = tuple(cell.name for cell in CELLS if not cell.cuda)
CUDA_CELLS = tuple(cell.name for cell in CELLS if cell.cuda)


def matrix_methods(configs: str = os.path.join(REPO, 'configs')) -> List[str]:
    """The matrix's rows: every registered method, then every stack (`LAYOUT+METHOD`) a shipped recipe uses."""
    from timm_selfkd import list_methods
    stacks = set()
    for name in sorted(os.listdir(configs)) if os.path.isdir(configs) else ():
        if name.endswith(('.yaml', '.yml')):
            with open(os.path.join(configs, name)) as f:
                method = (yaml.safe_load(f) or {}).get('selfkd', 'none')
            if '+' in str(method):
                stacks.add(method)
    return list_methods() + sorted(stacks)


def environment() -> str:
    """Where a cell was measured: the device, torch and timm versions."""
    import timm
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({platform.machine()})'
    return f'{device}, torch {torch.__version__}, timm {timm.__version__}'


def merge_results(path: str, cells: Dict[Tuple[str, str], dict]) -> None:
    """Add recorded cells to the results file (a cell measured again replaces its old record)."""
    results = {}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    stamp = {'measured': datetime.date.today().isoformat(), 'on': environment()}
    for (method, cell), record in cells.items():
        results.setdefault(method, {})[cell] = {**record, **stamp}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump({m: dict(sorted(c.items())) for m, c in sorted(results.items())}, f, indent=1)
        f.write('\n')
    os.replace(path + '.tmp', path)


def render(results: Dict[str, Dict[str, dict]], methods: Sequence[str]) -> str:
    """The README section: the table (a row per method, a column per cell), its notes and its legend.

    Raises:
        ValueError: a CPU cell of a method was not recorded (the matrix tests have not run over it).
    """
    missing = [f'{m} x {c}' for m in methods for c in CPU_CELLS if c not in results.get(m, {})]
    if missing:
        raise ValueError(f'cells not recorded in the results: {", ".join(missing)}; run the matrix tests '
                         f'with --matrix-json (see python benchmarks/compat_matrix.py --help)')
    notes: List[str] = []

    def note(text: str) -> int:
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    rows = ['| method | ' + ' | '.join(cell.label for cell in CELLS) + ' |',
            '|---|' + '---|' * len(CELLS)]
    for method in methods:
        marks = []
        for cell in CELLS:
            record = results.get(method, {}).get(cell.name)
            if record is None:
                marks.append('unmeasured')
            elif record['outcome'] == 'passed':
                marks.append('yes' + (f' [{note(record["note"])}]' if record.get('note') else ''))
            elif record['outcome'] == 'refused':
                marks.append(f'refused [{note(record["reason"])}]')
            else:
                marks.append('**FAILED**' + (f' [{note(record["reason"])}]' if record.get('reason') else ''))
        rows.append(f'| `{method}` | ' + ' | '.join(marks) + ' |')
    measured = sorted({r['on'] for cells in results.values() for r in cells.values() if 'on' in r})
    dates = sorted({r['measured'] for cells in results.values() for r in cells.values() if 'measured' in r})
    lines = rows + ['']
    lines += [f'{i}. {text}' for i, text in enumerate(notes, 1)]
    lines += ['', '*yes*: trained one epoch on `test_resnet` (32 px, batch 8) with the feature on, and the test saw its '
              'effect; *refused [n]*: the combination stops before the output folder exists, with the one-line '
              'error (exit status 2) whose reason is note n; *unmeasured*: not run on this release\'s machines. '
              'Columns:', '']
    lines += [f'- {cell.label}: {cell.how}' for cell in CELLS]
    unmeasured = [cell.label for cell in CELLS if cell.cuda and
                  all(cell.name not in results.get(m, {}) for m in methods)]
    if unmeasured:
        lines += ['', f'The CUDA columns ({"; ".join(unmeasured)}) are unmeasured in this release: no GPU was '
                      'available to its checks. `tests/test_gpu.py` runs them where one is.']
    lines += ['', f'Measured on {"; ".join(measured)} ({", ".join(dates)}); generated by '
                  '`python benchmarks/compat_matrix.py` from `benchmarks/results/compat_matrix.json`.']
    return '\n'.join(lines)


def splice(text: str, section: str, markers: Tuple[str, str] = (BEGIN, END)) -> str:
    """`text` with the part between the markers (default: the matrix's) replaced by `section`."""
    begin, end = markers
    pattern = re.compile(re.escape(begin) + r'.*?' + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f'no {begin} ... {end} markers')
    return pattern.sub(lambda _: f'{begin}\n{section}\n{end}', text, count=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='benchmarks/compat_matrix.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', default=RESULTS, help='results file written by the tests (--matrix-json)')
    parser.add_argument('--readme', default=README, help='file with the matrix markers')
    parser.add_argument('--check', action='store_true', help='only check that the README is up to date')
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            results = json.load(f)
        with open(args.readme) as f:
            text = f.read()
        updated = splice(text, render(results, matrix_methods()))
    except (OSError, ValueError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f'{parser.prog}: {args.readme} is not the rendering of {args.results}', file=sys.stderr)
            return 1
        return 0
    with open(args.readme, 'w') as f:
        f.write(updated)
    return 0


if __name__ == '__main__':
    sys.exit(main())
