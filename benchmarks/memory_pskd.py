"""Memory of PS-KD's per-sample table at ImageNet-1k size, per node and per process, built as training builds it.

`--procs` processes (one node, gloo) each build `SoftTargetMemory(N, K)` through `create_task` (which binds the
run, `PSKDTask.bind_run`), as training does: the node's local rank 0 reserves one file in /dev/shm, every
process maps it, and it is unlinked.
Each process then trains `--steps` steps of the write/read protocol (all-gather of every rank's rows, flush of
its own share, lookups), writes its share of every row (what one epoch's flushes write) and reads every row (what
one epoch's lookups touch), so that every page of the table is mapped in every process. Reported:

- per node: the table's bytes, and what /dev/shm gained (the one shared copy);
- per process: of that mapping, resident (RSS), proportional (PSS: shared pages split among the processes) and
  private bytes (from /proc/self/smaps), and the process's private memory growth over the steps (staging
  buffers: rows gathered for one step).

For comparison, the official PS-KD code keeps a float32 N x K tensor in every process. The benchmark needs the
table's size in free memory (2.6 GB for ImageNet dense), so it is run by hand, not by the tests.

Usage:
    python benchmarks/memory_pskd.py --output benchmarks/results/memory_pskd_imagenet.md
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout, installed or not
import timm_selfkd  # noqa: E402
from timm_selfkd.components.soft_target_memory import memory_bytes  # noqa: E402

TABLE_TAG = 'timm_selfkd-memory-'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=1_281_167, help='N (ImageNet-1k training set)')
    parser.add_argument('--classes', type=int, default=1000, help='K')
    parser.add_argument('--topk', default='0,10', help='comma-separated memory layouts to measure (0 = dense)')
    parser.add_argument('--procs', type=int, default=2, help='processes on the node (local ranks)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per step and process')
    parser.add_argument('--steps', type=int, default=20, help='protocol steps measured for the staging buffers')
    parser.add_argument('--output', type=Path, help='also write the report to this markdown file')
    return parser.parse_args(argv)


def _smaps_of_table() -> Dict[str, int]:
    """Rss, Pss and Private bytes of this process's mappings of the shared table (/proc/self/smaps)."""
    totals = {'Rss': 0, 'Pss': 0, 'Private': 0}
    inside = False
    for line in Path('/proc/self/smaps').read_text().splitlines():
        fields = line.split()
        if '-' in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and TABLE_TAG in fields[5]
        elif inside and fields[0].rstrip(':') in ('Rss', 'Pss'):
            totals[fields[0].rstrip(':')] += int(fields[1]) * 1024
        elif inside and fields[0] in ('Private_Clean:', 'Private_Dirty:'):
            totals['Private'] += int(fields[1]) * 1024
    return totals


def _private_bytes() -> int:
    """This process's private memory (anonymous and file-backed), from /proc/self/smaps_rollup."""
    rollup = dict(line.split(':', 1) for line in Path('/proc/self/smaps_rollup').read_text().splitlines()[1:])
    return sum(int(rollup[key].split()[0]) * 1024 for key in ('Private_Clean', 'Private_Dirty'))


def _shm_used() -> int:
    stat = os.statvfs('/dev/shm')
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _worker(rank: int, args: argparse.Namespace, topk: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=args.procs)
    shm_before = _shm_used()
    dist.barrier()
    # one node: create_task reads the local rank and node size as torchrun sets them
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.procs))
    model = nn.Linear(args.classes, args.classes)
    model.num_classes = args.classes  # what a timm model tells the run
    task = timm_selfkd.create_task('pskd', model, num_epochs=90,
                                   steps_per_epoch=args.samples // (args.batch_size * args.procs),
                                   num_samples=args.samples, batch_size=args.batch_size, topk=topk)
    assert (task.run.world_size, task.run.rank, task.run.local_rank, task.run.local_world_size) == \
        (args.procs, rank, rank, args.procs)
    memory = task.memory
    task.set_epoch(1)
    dist.barrier()
    shm_after = _shm_used()
    generator = torch.Generator().manual_seed(rank)
    private_start = None
    for step in range(args.steps):
        if step == 2:  # after the first steps have set up the gloo buffers and the caching allocator
            private_start = _private_bytes()
        indices = torch.randint(args.samples, (args.batch_size,), generator=generator)
        task(torch.randn(args.batch_size, args.classes, generator=generator), indices % args.classes, indices=indices)
    staging = _private_bytes() - private_start
    # what one epoch's flushes and lookups do to the pages: this process writes its share, reads every row
    rows = torch.arange(rank, args.samples, args.procs)
    for start in range(0, rows.numel(), 65536):
        chunk = rows[start:start + 65536]
        memory.values[chunk] = 1 / args.classes
        if memory.classes is not None:
            memory.classes[chunk] = 0
    dist.barrier()
    checksum = float(sum(memory.values[i:i + 65536].float().sum() for i in range(0, args.samples, 65536)))
    dist.barrier()
    result = dict(rank=rank, table=memory.nbytes, shm=shm_after - shm_before, staging=staging, checksum=checksum,
                  **_smaps_of_table())
    torch.save(result, os.path.join(out_dir, f'{topk}-{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, topk: int) -> List[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args, topk, os.path.join(folder, 'init'), folder), nprocs=args.procs)
        return [torch.load(os.path.join(folder, f'{topk}-{rank}.pt')) for rank in range(args.procs)]


def _step_bytes(args: argparse.Namespace, topk: int) -> int:
    """Host bytes of one step's gathered rows: every process's indices (int64) and encoded rows."""
    row = 2 * args.classes if not topk else topk * (2 + 4)
    return args.procs * args.batch_size * (8 + row)


def report(args: argparse.Namespace, results: Dict[int, List[dict]]) -> str:
    gib = 2 ** 30
    official = args.samples * args.classes * 4
    lines = [
        f'PS-KD memory for N = {args.samples} images x K = {args.classes} classes, {args.procs} processes on one '
        f'node (gloo, CPU), {args.batch_size} images per step and process, {args.steps} protocol steps, then '
        'every row written (by its owner) and read (by every process).',
        '',
        '| layout | table per node | /dev/shm gained | per process: RSS of table | PSS of table | private in table '
        '| one gathered step | staging growth | official code (fp32 per process) |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for topk, ranks in results.items():
        layout = f'top-{topk} (fp16 + int16)' if topk else 'dense fp16'
        def per_rank(key: str, unit: float, digits: int) -> str:
            return ' / '.join(f'{r[key] / unit:.{digits}f}' for r in ranks)

        lines.append(
            f'| {layout} | {ranks[0]["table"] / 1e9:.3f} GB ({ranks[0]["table"] / gib:.3f} GiB) '
            f'| {ranks[0]["shm"] / 1e9:.3f} GB | {per_rank("Rss", 1e9, 3)} GB | {per_rank("Pss", 1e9, 3)} GB '
            f'| {per_rank("Private", 2 ** 20, 1)} MiB | {_step_bytes(args, topk) / 2 ** 20:.2f} MiB '
            f'| {per_rank("staging", 2 ** 20, 1)} MiB '
            f'| {official / 1e9:.2f} GB each, {args.procs * official / 1e9:.2f} GB per node |')
        assert len({r['checksum'] for r in ranks}) == 1, 'the processes do not see the same table'
    dense = memory_bytes(args.samples, args.classes)
    lines += [
        '',
        f'- Dense: {dense / 1e9:.3f} GB per node whatever the number of processes (limit 2.6 GB); the official '
        f'code needs {official / 1e9:.2f} GB per process ({8 * official / 1e9:.1f} GB on an 8-GPU node).',
        '- RSS counts the shared pages in every process; PSS splits them among the processes, so the PSS of '
        'all processes adds up to the one table. "private in table" = 0 shows no process holds its own copy.',
        '- One gathered step: the rows every process holds between two steps (all ranks\' indices and rows, '
        'top-k classes sent as int32); staging growth: private memory a process gained over the measured steps '
        '(allocator caching makes it noisy), outside the table.',
    ]
    return '\n'.join(lines) + '\n'


def environment() -> str:
    return '\n'.join([
        '# PS-KD per-sample memory at ImageNet-1k size',
        '',
        f'- command: `python {" ".join(sys.argv)}`',
        f'- torch {torch.__version__}, timm_selfkd {timm_selfkd.__version__}, python {platform.python_version()}, '
        f'{platform.platform()}, {os.cpu_count()} logical cores',
        f'- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
        '', '',
    ])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    results = {int(k): measure(args, int(k)) for k in args.topk.split(',')}
    text = report(args, results)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(environment() + text)
        print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
