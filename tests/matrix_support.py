"""Support of the compatibility-matrix tests: `Probe` instruments a `train.py` run (what every training step saw,
the optimizer updates, the EMA's starting weights, how often compiled graphs ran: backend `matrix_aot_eager`), and
`ddp_cell` runs every method in one torchrun launch (`matrix_ddp.py`) and checks it."""
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from typing import Dict, List, Sequence

import torch
from torch._dynamo import list_backends, lookup_backend, register_backend

from timm_selfkd import train

# the matrix renderer is a benchmarks/ script, not part of the package (also in matrix_ddp.py's processes)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
from compat_matrix import CELLS  # noqa: E402

FLAGS = {cell.name: cell.flags for cell in CELLS}

COMPILED_CALLS = [0]  # executions of graphs compiled by the `matrix_aot_eager` backend, in this process


def _counting_aot_eager(graph_module, example_inputs, **kwargs):
    """dynamo's `aot_eager` backend (graph capture and AOT autograd, no code generation), counting executions."""
    compiled = lookup_backend('aot_eager')(graph_module, example_inputs, **kwargs)

    def run(*args, **run_kwargs):
        COMPILED_CALLS[0] += 1
        return compiled(*args, **run_kwargs)

    return run


if 'matrix_aot_eager' not in list_backends(exclude_tags=()):
    register_backend(_counting_aot_eager, name='matrix_aot_eager')


def digest(tensors) -> str:
    """A hash of the exact bytes of some tensors."""
    sha = hashlib.sha1()
    for tensor in tensors:
        sha.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()


def parameters(module: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class Probe(train.Setup):
    """`train.Setup` (patched in for `timm_selfkd.train.Setup`) that records each training forward: the images,
    whether the input is channels-last, whether autocast is on, every loss term's dtype, finiteness and value,
    a hash of the input and whether compiled code ran; and the optimizer's updates. `Probe.last` is the latest."""

    last = None

    def __init__(self, args):
        super().__init__(args)
        Probe.last = self
        self.steps: List[Dict] = []
        self.updates = 0
        self.compiled_at_start = COMPILED_CALLS[0]
        self.ema_start = parameters(self.task.get_eval_model(ema=True)) if args.model_ema else None
        forward, step = self.task.forward, self.optimizer.step

        def recorded_forward(input, target):
            before = COMPILED_CALLS[0]
            out = forward(input, target)
            if self.task.training:
                self.steps.append(dict(
                    images=input.shape[0], input=digest([input]),
                    channels_last=input.is_contiguous(memory_format=torch.channels_last),
                    autocast=torch.is_autocast_enabled(input.device.type), compiled=COMPILED_CALLS[0] > before,
                    terms={name: (value.dtype, bool(torch.isfinite(value).all()), float(value.detach()))
                           for name, value in out.items() if name.startswith('loss')}))
            return out

        def counted_step(*step_args, **step_kwargs):
            self.updates += 1
            return step(*step_args, **step_kwargs)

        self.task.forward = recorded_forward
        self.optimizer.step = counted_step

    @property
    def compiled_calls(self) -> int:
        return COMPILED_CALLS[0] - self.compiled_at_start


def summary_rows(path) -> List[Dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def refused_cell(refusal: str, cells: Sequence[str]) -> str:
    """The cell a refusal names (by one of its options); a refusal naming none of them is a defect."""
    named = [cell for cell in cells if any(flag in refusal for flag in FLAGS[cell])]
    assert named, f'the refusal names none of the options of {sorted(cells)}: {refusal}'
    return named[0]


def ddp_cell(matrix, cell: str, methods: Sequence[str], method_args: Dict[str, list], data: str, output,
             *flags: str, variants: Sequence[Sequence[str]] = ((),), backend: str = 'gloo') -> Dict[str, List[dict]]:
    """Train every method under `torchrun --nproc_per_node 2` in one launch, with `flags` and each of `variants`'
    flags in turn; record `cell` per method.

    Passed: in every variant the ranks trained on different images and ended with the same weights, made one
    optimizer update per `--grad-accum-steps` batches, and the summary counts both ranks' images. Refused: both
    ranks stopped with the same one line naming the cell's option.

    Returns:
        Each method's two rank records (`matrix_ddp.py`) of its first variant, for more checks.
    """
    runs = {f'{method}-{i}': (method, list(variant)) for method in methods for i, variant in enumerate(variants)}
    specs = []
    for label, (method, variant) in runs.items():
        specs += ['--', label, method, *method_args.get(method, []), *flags, *variant]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(os.path.dirname(os.path.abspath(__file__)), 'matrix_ddp.py'), str(output), data, backend,
           *specs]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    ranks = [json.loads(p.read_text()) if p.exists() else {} for p in (output / 'rank0.json', output / 'rank1.json')]
    unfinished = [label for label in runs if any(r.get(label, {}).get('outcome', 'failed') == 'failed' for r in ranks)]
    for method in {runs[label][0] for label in unfinished}:
        matrix.failed(method, cell, f'the {cell} run failed')
    errors = {label: [r[label].get('error') for r in ranks if label in r] for label in unfinished}
    assert result.returncode == 0 and not unfinished, (errors, result.stderr[-3000:])
    for label, (method, variant) in runs.items():
        first, second = ranks[0][label], ranks[1][label]
        if first['outcome'] == 'refused':
            assert second == first and first['status'] == 2 and len(first['lines']) == 1, (label, first, second)
            reason = first['lines'][0][len('train.py: error: '):]
            refused_cell(reason, [cell])
            matrix.refused(method, cell, reason)
            continue
        assert second['outcome'] == 'passed', (label, second)
        assert first['first_input'] != second['first_input'], f'{label}: both ranks trained on the same images'
        assert first['weights'] == second['weights'], f'{label}: the ranks ended with different weights'
        accum = int(variant[variant.index('--grad-accum-steps') + 1]) if '--grad-accum-steps' in variant else 1
        assert all(r['updates'] == math.ceil(r['steps'] / accum) for r in (first, second)), (label, first, second)
        (row,) = summary_rows(output / label / 'summary.csv')
        assert row['status'] == 'ok' and float(row['train_images']) == first['images'] + second['images'], label
        matrix.expect(method, cell)
    return {method: [ranks[0][f'{method}-0'], ranks[1][f'{method}-0']] for method in methods}
