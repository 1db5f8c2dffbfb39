"""GPU evidence in one command, for anyone lent one GPU: 9 minutes, three phases, each with its time limit.

1. `tests/test_gpu.py` (fp16 loss scaling for every method, the fp16 guard);
2. the cost command (`python -m timm_selfkd.cost`) for resnet50, efficientnet_b0, convnext_tiny and Swin-T at
   224x224 with AMP fp16 and bf16, every method and the stack ddgsd+dlb;
3. plain training vs BAKE on Swin-T with the BAKE recipe (configs/bake_imagenet_swin_t.yaml) for a few hundred
   steps: the BAKE paper's "+1.5% time".

It writes every output under benchmarks/results/gpu_<device>_<date>/ (evidence.json lists the phases, what each
took and what was skipped) and the README table between `<!-- gpu-evidence -->` and `<!-- /gpu-evidence -->`.
A phase that would overrun the budget is cut short (the cost runs time fewer steps) or skipped, and says so.

Usage:
    python benchmarks/gpu_evidence.py                      # one CUDA GPU, about 9 minutes
    python benchmarks/gpu_evidence.py --render benchmarks/results/gpu_<device>_<date>   # the README table again
    python benchmarks/gpu_evidence.py --quick              # CPU smoke run of every phase (tiny model), for CI
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not
from compat_matrix import splice  # noqa: E402  (benchmarks/ is this script's folder)
from timm_selfkd.cost import command as cost  # noqa: E402
from timm_selfkd.cost.measure import failure_reason  # noqa: E402

README = REPO / 'README.md'
BEGIN, END = '<!-- gpu-evidence -->', '<!-- /gpu-evidence -->'
MODELS = {'resnet50': 'ResNet-50', 'efficientnet_b0': 'EfficientNet-B0', 'convnext_tiny': 'ConvNeXt-T',
          'swin_tiny_patch4_window7_224': 'Swin-T'}
DTYPES = {'float16': 'fp16', 'bfloat16': 'bf16'}
BAKE_RECIPE = 'configs/bake_imagenet_swin_t.yaml'  # in the repository, wherever the script runs from
IMAGENET = ['--num-classes', '1000', '--dataset-size', '1281167']
MIN_SECONDS = 20  # a phase with less time left than this is skipped


@dataclass
class Phase:
    """One step of the plan: a name, its output file, its planned seconds, and what it runs."""
    name: str
    file: str
    seconds: float
    argv: List[str] = field(default_factory=list)  # the cost command's (pytest's for the tests)


def plan(quick: bool) -> List[Phase]:
    """The phases in order, with their time limits: 140 s of tests, 8 x 33 s of cost runs, 110 s of BAKE (514 s of
    the 540 s budget; the rest for starting and writing)."""
    if quick:  # every phase on a tiny model on the CPU, in seconds (bf16: the CPU's fp16 kernels are slow)
        tiny = ['--model', 'test_resnet', '--input-size', '3', '32', '32', '-b', '8', '--num-classes', '4',
                '--dataset-size', '64', '--steps', '1', '--warmup', '1', '--device', 'cpu', '--amp-dtype', 'bfloat16']
        return [Phase('tests', 'tests.txt', 120, ['tests/test_gpu.py']),
                Phase('cost test_resnet bf16', 'cost_test_resnet_bf16.json', 60,
                      [*tiny, '--amp', '--selfkd', 'dlb,bake']),
                Phase('bake', 'bake_swin_t.json', 60, ['-c', str(REPO / BAKE_RECIPE), *tiny, '--steps', '2'])]
    cost_runs = [Phase(f'cost {model} {DTYPES[dtype]}', f'cost_{model}_{DTYPES[dtype]}.json', 33,
                       ['--model', model, '--input-size', '3', '224', '224', '-b', '64', '--amp', '--amp-dtype', dtype,
                        '--selfkd', 'all', '--steps', '6', '--warmup', '2', '--epochs', '100', '--device', 'cuda',
                        *IMAGENET]) for model in MODELS for dtype in DTYPES]
    return [Phase('tests', 'tests.txt', 140, ['tests/test_gpu.py']), *cost_runs,
            Phase('bake', 'bake_swin_t.json', 110, ['-c', str(REPO / BAKE_RECIPE), '--selfkd', 'bake', '--steps',
                                                    '300', '--warmup', '20', '--device', 'cuda', *IMAGENET])]


def run_tests(phase: Phase, limit: float, folder: Path) -> str:
    """pytest on the GPU tests; its output in the phase's file; the summary line (or why there is none)."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *phase.argv]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
        output, status = result.stdout + result.stderr, None
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
        status = f'stopped at its {limit:.0f} s limit'
    (folder / phase.file).write_text(output)
    summary = [line.strip('= ') for line in output.splitlines() if re.search(r'\d+ (passed|failed|skipped)', line)]
    return status or (summary[-1] if summary else 'no pytest summary line (see the file)')


def run_cost(phase: Phase, limit: float, folder: Path) -> str:
    """The cost command in this process, its record in the phase's file; 'ok' or its error status."""
    try:
        cost.main([*phase.argv, '--time-limit', f'{limit:.0f}', '--json', str(folder / phase.file)])
    except SystemExit as e:  # plain training could not run (the reason is on stderr)
        return f'failed with status {e.code}'
    except Exception as e:  # noqa: BLE001 (the next phases still run)
        return failure_reason(e)
    return 'ok'


def run(quick: bool, budget: float, folder: Path) -> Dict:
    """Every phase within `budget` seconds; the manifest of what ran, what it took and what was skipped."""
    start = time.perf_counter()
    phases = plan(quick)
    manifest = {'device': torch.cuda.get_device_name() if not quick else 'cpu (--quick)',
                'date': f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
                'torch': torch.__version__, 'budget_s': budget, 'phases': []}
    for i, phase in enumerate(phases):
        left = budget - (time.perf_counter() - start)
        reserved = sum(min(following.seconds, MIN_SECONDS) for following in phases[i + 1:])
        limit = min(phase.seconds, left - reserved)
        began = time.perf_counter()
        if limit < min(phase.seconds, MIN_SECONDS):
            status = f'skipped: {left:.0f} s left of the {budget:.0f} s budget'
        else:
            print(f'== {phase.name} (limit {limit:.0f} s)', flush=True)
            status = (run_tests if phase.name == 'tests' else run_cost)(phase, limit, folder)
        record = {'name': phase.name, 'file': phase.file, 'status': status, 'limit_s': round(limit),
                  'seconds': round(time.perf_counter() - began)}
        manifest['phases'].append(record)
        print(f'== {phase.name}: {status} ({record["seconds"]} s)', flush=True)
    manifest['seconds'] = round(time.perf_counter() - start)
    (folder / 'evidence.json').write_text(json.dumps(manifest, indent=1))
    return manifest


def _ratio_cell(row: Optional[Dict]) -> str:
    if row is None:
        return 'not run'
    if row['status'] != 'ok':
        return row['status']
    return f'{row["time_ratio"]:.2f}x / {row["memory_ratio"]:.2f}x'


def render(folder: Path) -> str:
    """The README section of one run's files: the test summary, a table of time / memory ratios per model and
    precision, the BAKE line and what was skipped."""
    manifest = json.loads((folder / 'evidence.json').read_text())
    phases = {phase['name']: phase for phase in manifest['phases']}
    records = {phase['name']: json.loads((folder / phase['file']).read_text()) for phase in manifest['phases']
               if phase['file'].endswith('.json') and (folder / phase['file']).exists()}
    columns = [name for name in records if name.startswith('cost ')]
    rows: Dict[str, Dict[str, Dict]] = {}
    for name in columns:
        for row in records[name]['rows']:
            rows.setdefault(row['method'], {})[name] = row
    where = os.path.relpath(folder, REPO)
    lines = [f'GPU evidence: {manifest["device"]}, {manifest["date"]}, torch {manifest["torch"]}, '
             f'`python benchmarks/gpu_evidence.py` in {manifest["seconds"]} s; files: [{where}/]({where}/).', '',
             f'- `tests/test_gpu.py`: {phases["tests"]["status"]}.']
    if columns:
        setting = records[columns[0]]['setting']
        lines += ['', f'Step time / peak memory, each as a ratio to plain training, '
                      f'{"x".join(map(str, setting["input_size"]))} images, batch {setting["batch_size"]}, AMP '
                      '(cost command; each run\'s table, images/s and projections are in its file):', '',
                  '| method | ' + ' | '.join(_column(name) for name in columns) + ' |',
                  '|---|' + '---:|' * len(columns)]
        lines += [f'| {method} | ' + ' | '.join(_ratio_cell(cells.get(name)) for name in columns) + ' |'
                  for method, cells in rows.items()]
        lines.append('| timed steps | ' + ' | '.join(str(records[name]['rows'][0].get('timed_steps', ''))
                                                      for name in columns) + ' |')
    bake = records.get('bake')
    if bake is not None:
        row = next(row for row in bake['rows'] if row['selfkd'] == 'bake')
        setting = bake['setting']
        result = (f'{row["time_ratio"]:.3f}x time (quartiles {row["time_ratio_iqr"][0]:.3f}-'
                  f'{row["time_ratio_iqr"][1]:.3f}), {row["memory_ratio"]:.3f}x memory over {row["timed_steps"]} '
                  'interleaved steps' if row['status'] == 'ok' else row['reason'])
        lines += ['', f'- BAKE vs plain training, `{setting["model"]}` with {BAKE_RECIPE} (batch '
                      f'{setting["batch_size"]}, AMP {setting["amp_dtype"]}, mixup/CutMix, {setting["opt"]}): '
                      f'{result}; the BAKE paper reports +1.5% time.']
    skipped = [f'{phase["name"]} ({phase["status"]})' for phase in manifest['phases']
               if phase['status'].startswith(('skipped', 'stopped'))]
    if skipped:
        lines.append(f'- Skipped or cut short to keep the {manifest["budget_s"]:.0f} s budget: {", ".join(skipped)}.')
    return '\n'.join(lines)


def _column(phase_name: str) -> str:
    """'cost resnet50 fp16' -> 'ResNet-50 fp16'."""
    _, model, dtype = phase_name.split(' ')
    return f'{MODELS.get(model, model)} {dtype}'


def write_readme(folder: Path, readme: Path) -> None:
    readme.write_text(splice(readme.read_text(), render(folder), (BEGIN, END)))
    print(f'wrote the GPU evidence table of {folder} into {readme}')


def _slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog='benchmarks/gpu_evidence.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='every phase on a tiny model on the CPU (CI)')
    parser.add_argument('--budget', type=float, default=540, help='seconds for all phases (default: 540)')
    parser.add_argument('--results-dir', type=Path, default=None,
                        help='folder of the outputs (default: benchmarks/results/gpu_<device>_<date>; --quick: a '
                             'temporary folder)')
    parser.add_argument('--readme', type=Path, default=None,
                        help='file with the gpu-evidence markers to update (default: README.md; --quick: none)')
    parser.add_argument('--render', type=Path, default=None, metavar='FOLDER',
                        help='only write the README table of an earlier run\'s folder')
    args = parser.parse_args(argv)
    if args.render is not None:
        write_readme(args.render, args.readme or README)
        return
    if not args.quick and not torch.cuda.is_available():
        parser.error('no CUDA device: this script measures a GPU (--quick runs its phases on the CPU)')
    folder = args.results_dir or (Path(tempfile.mkdtemp(prefix='gpu_evidence_')) if args.quick else
                                  REPO / 'benchmarks' / 'results' /
                                  f'gpu_{_slug(torch.cuda.get_device_name())}_{datetime.date.today():%Y-%m-%d}')
    folder.mkdir(parents=True, exist_ok=True)
    manifest = run(args.quick, args.budget, folder)
    print(f'wrote {folder} in {manifest["seconds"]} s')
    readme = args.readme or (None if args.quick else README)
    if readme is not None:
        write_readme(folder, readme)


if __name__ == '__main__':
    main()
