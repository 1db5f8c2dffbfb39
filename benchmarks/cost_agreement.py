"""The cost command agrees with the overhead benchmark: for the same settings, each method's time ratio from
`python -m timm_selfkd.cost` lies within the quartiles of the overhead benchmark's, and the memory ratios are the
same (the CPU's live-tensor peak is exact). Both are callers of one measuring core (`timm_selfkd.cost.measure`); this
checks that the two command lines set it up alike (model, batch, run facts, optimizer, precision).

Usage:
    python benchmarks/cost_agreement.py --methods dlb,self_guidance \
        --output benchmarks/results/cost_vs_overhead_cpu.md
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not
import overhead  # noqa: E402  (benchmarks/ is this script's folder)
from timm_selfkd.cost import command  # noqa: E402
from timm_selfkd.cost.measure import measure  # noqa: E402
from timm_selfkd.cost.report import cost_rows, environment  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--methods', default='dlb,self_guidance', help='two or more, comma-separated')
    parser.add_argument('--steps', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--output', type=Path, help='also write the report to this markdown file')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = ['--model', args.model, '--num-classes', str(args.num_classes), '--batch-size', str(args.batch_size),
              '--steps', str(args.steps), '--warmup', str(args.warmup)]
    start = time.perf_counter()
    bench = overhead.parse_args([*shared, '--img-size', str(args.img_size), '--methods', args.methods])
    reference = {result.run.label: result for result in
                 measure(overhead.setting(bench), overhead.method_runs(bench), bench.steps, bench.warmup)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'cost.json'
        command.main([*shared, '--input-size', '3', str(args.img_size), str(args.img_size), '--device', 'cpu',
                      '--selfkd', args.methods, '--dataset-size', str(overhead.RUN_SAMPLES),
                      '--epochs', str(overhead.RUN_EPOCHS), '--json', str(path)])
        rows = {row['method']: row for row in json.loads(path.read_text())['rows']}
    lines = [f'`{args.model}`, {args.num_classes} classes, {args.img_size}x{args.img_size}, batch {args.batch_size}, '
             f'CPU, {args.threads} threads, wall clock; {args.steps} timed steps each, the overhead benchmark\'s run '
             f'first, then the cost command\'s ({time.perf_counter() - start:.0f} s in all).', '',
             '| method | overhead: time ratio (quartiles) | cost: time ratio | in the quartiles | overhead: memory '
             'ratio | cost: memory ratio | same |', '|---|---:|---:|---|---:|---:|---|']
    agree = True
    expected = {row['method']: row for row in cost_rows(list(reference.values()), overhead.setting(bench),
                                                         overhead.RUN_EPOCHS)}
    for method in bench.methods[1:]:
        (r1, r3), ratio, memory = (expected[method][key] for key in ('time_ratio_iqr', 'time_ratio', 'memory_ratio'))
        row = rows[method]
        inside = r1 <= row['time_ratio'] <= r3
        same = abs(row['memory_ratio'] - memory) < 1e-3
        agree &= inside and same
        lines.append(f'| {method} | {ratio:.3f}x ({r1:.3f}-{r3:.3f}) | {row["time_ratio"]:.3f}x | '
                     f'{"yes" if inside else "NO"} | {memory:.4f}x | {row["memory_ratio"]:.4f}x | '
                     f'{"yes" if same else "NO"} |')
    lines += ['', f'Verdict: {"AGREE" if agree else "DISAGREE"}.']
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.output:
        env = environment('cpu', shlex.join(['python', *sys.argv]))
        args.output.write_text(f'# Cost command vs overhead benchmark\n\n- command: `{env["command"]}`\n'
                               f'- torch {env["torch"]}, timm {env["timm"]}; CPU: {env["cpu"]}; {env["date"]}\n\n'
                               + text)
        print(f'wrote {args.output}')
    return 0 if agree else 1


if __name__ == '__main__':
    sys.exit(main())
