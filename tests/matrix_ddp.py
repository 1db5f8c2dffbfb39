"""The DDP cell of the compatibility matrix for many methods in one `torchrun` launch (not a test module).

    torchrun --standalone --nproc_per_node 2 tests/matrix_ddp.py OUT DATA BACKEND -- LABEL METHOD [FLAGS...] [-- ...]

Each rank trains every method in turn through `train.main` (on the CPU, or with `--device cuda` among the flags on
its GPU) and writes OUT/rank<R>.json: per label `passed` (with the images and steps it trained on, its optimizer updates,
a hash of its first input, of its final weights and of its buffers (BatchNorm statistics), and its SyncBatchNorm
layers) or
`refused` (the one-line error). An unexpected error ends the launch (the other rank may wait in a collective).
The launch's process group serves every run: `main` neither creates nor destroys it here (a default group
created again under torchrun's store finds the previous group's addresses and hangs).
"""
import contextlib
import io
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matrix_support import Probe, digest  # noqa: E402
from timm_selfkd import train  # noqa: E402


def run(output: str, data: str, label: str, method: str, extra: list) -> dict:
    argv = ['--data-dir', data, '--output', output, '--experiment', label, '-b', '8', '--epochs', '1',
            '--warmup-epochs', '0', '--device', 'cpu', '-j', '0', '--lr', '0.05', '--img-size', '32',
            '--model', 'test_resnet', '--log-interval', '50', '--selfkd', method, *extra]
    err = io.StringIO()
    Probe.last = None
    try:
        with contextlib.redirect_stderr(err):
            train.main(argv)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines()
        return {'outcome': 'refused', 'status': e.code, 'lines': lines}
    probe = Probe.last
    return {'outcome': 'passed', 'images': sum(s['images'] for s in probe.steps), 'steps': len(probe.steps),
            'updates': probe.updates,
            'first_input': probe.steps[0]['input'] if probe.steps else None,
            'weights': digest(probe.task.get_eval_model().parameters()),
            'buffers': digest(probe.task.get_eval_model().buffers()),
            'sync_bn_layers': sum(isinstance(m, torch.nn.SyncBatchNorm) for m in probe.task.get_eval_model().modules())}


def main(output: str, data: str, backend: str, specs: list) -> None:
    train.Setup = Probe
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group(backend)
    destroy = dist.destroy_process_group
    dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None
    rank = dist.get_rank()
    results = {}
    for label, method, *extra in specs:
        try:
            results[label] = run(output, data, label, method, extra)
        except Exception:  # noqa: BLE001  (recorded, then the launch ends: the other rank may be mid-collective)
            results[label] = {'outcome': 'failed', 'error': traceback.format_exc()[-3000:]}
            break
        finally:
            with open(os.path.join(output, f'rank{rank}.json'), 'w') as f:
                json.dump(results, f, indent=1)
        dist.barrier()
    if any(r['outcome'] == 'failed' for r in results.values()):
        os._exit(1)
    destroy()


if __name__ == '__main__':
    out, data_dir, dist_backend, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    groups = []
    for item in rest:
        if item == '--':
            groups.append([])
        else:
            groups[-1].append(item)
    main(out, data_dir, dist_backend, groups)
