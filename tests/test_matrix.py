"""The compatibility matrix on the CPU: every method (`matrix_methods()`: the registry and the stacks the recipes
use) x bf16 autocast, model EMA, channels-last, gradient accumulation, label smoothing, mixup/cutmix,
`--torchcompile` (in-process runs) and DDP (one torchrun launch for every method) either trains with the
feature's effect present, or is refused before the output folder exists with one line naming the option.

`--matrix-json FILE` records every cell (see `benchmarks/compat_matrix.py`, which renders the README's table);
`--resume` is `test_every_method_resumes_exactly...` in test_preemption.py; fp16 and sync-BN are in test_gpu.py.
Runs are tiny: `test_resnet`, 32 px, 32 training images, batch 8, one epoch of 4-8 steps.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
import timm
import torch

from matrix_support import Probe, ddp_cell, parameters, refused_cell, summary_rows
from test_train import METHOD_ARGS  # per-method flags the 4-class set needs
from timm_selfkd import train
from timm_selfkd.errors import UsageError
import compat_matrix as tool

METHODS = tool.matrix_methods()

FEATURES = {  # the cells combined in one run, each with its flags
    'bf16': ['--amp', '--amp-dtype', 'bfloat16'],
    'channels_last': ['--channels-last'],
    'grad_accum': ['--grad-accum-steps', '2'],
    'ema': ['--model-ema', '--model-ema-decay', '0.5'],
}
MIXUP = ['--mixup', '0.2', '--cutmix', '1.0']


@dataclass
class Outcome:
    """A run's end: the refusal line, or what the probe saw and the summary row."""
    refusal: Optional[str] = None
    probe: Optional[Probe] = None
    row: Dict[str, str] = field(default_factory=dict)
    output: str = ''

    def losses(self) -> List[float]:
        return [step['terms']['loss'][2] for step in self.probe.steps]


class Runner:
    """Runs `train.main` in-process with the probe patched in; a usage error must be one line, exit status 2, and
    leave no output folder."""

    def __init__(self, data, tmp_path, capsys, monkeypatch):
        self.data, self.tmp_path, self.capsys, self.count = data, tmp_path, capsys, 0
        monkeypatch.setattr(train, 'Setup', Probe)

    def __call__(self, method: str, *flags: str) -> Outcome:
        self.count += 1
        output = self.tmp_path / f'run{self.count}'
        argv = ['--data-dir', self.data, '--output', str(output), '--experiment', 'run', '-b', '8', '--epochs', '1',
                '--warmup-epochs', '0', '--device', 'cpu', '-j', '0', '--lr', '0.05', '--img-size', '32',
                '--model', 'test_resnet', '--log-interval', '50', '--selfkd', method, *METHOD_ARGS.get(method, []),
                *flags]
        self.capsys.readouterr()
        try:
            train.main(argv)
        except SystemExit as e:
            lines = self.capsys.readouterr().err.strip().splitlines()
            assert e.code == 2 and len(lines) == 1 and lines[0].startswith('train.py: error: '), (e.code, lines)
            assert not output.exists(), 'a refused run left an output folder'
            return Outcome(refusal=lines[0][len('train.py: error: '):])
        rows = summary_rows(output / 'run' / 'summary.csv')
        assert len(rows) == 1 and rows[0]['status'] == 'ok'
        return Outcome(probe=Probe.last, row=rows[0], output=str(output / 'run'))


@pytest.fixture
def run(image_folder, tmp_path, capsys, monkeypatch):
    return Runner(image_folder, tmp_path, capsys, monkeypatch)


def assert_finite_float32_terms(outcome: Outcome, cell: str):
    for step in outcome.probe.steps:
        for name, (dtype, finite, _) in step['terms'].items():
            assert dtype == torch.float32 and finite, f'{cell}: {name} is {dtype}, finite {finite}'


@pytest.mark.parametrize('method', METHODS)
def test_feature_cells(run, matrix, method):
    """bf16 autocast, channels-last, gradient accumulation, model EMA and label smoothing in one run (a refused
    feature is dropped and recorded); each feature's effect is checked, and a failing run is run again per feature
    to name the one that fails. Label smoothing: the same run with `--smoothing 0` trains on other losses."""
    cells = dict(FEATURES)
    while True:
        flags = [flag for cell in cells.values() for flag in cell]
        try:
            outcome = run(method, *flags, '--smoothing', '0.1')
        except Exception as e:  # noqa: BLE001  name the failing feature(s), then fail
            failing = [cell for cell in cells if _raises(run, method, cells[cell])]
            pytest.fail(f'{method}: the run with {sorted(cells)} fails ({type(e).__name__}: {e}); alone, '
                        f'{failing or "none fails (only the combination)"}')
        if outcome.refusal is None:
            break
        cell = refused_cell(outcome.refusal, cells)
        matrix.refused(method, cell, outcome.refusal)
        del cells[cell]
    matrix.expect(method, *cells, 'smoothing')
    probe, steps = outcome.probe, outcome.probe.steps
    assert steps, 'no training step'
    assert_finite_float32_terms(outcome, 'loss terms')
    if 'bf16' in cells:
        assert all(step['autocast'] for step in steps), 'bf16: autocast off in the training forward'
    if 'channels_last' in cells:
        assert all(step['channels_last'] for step in steps), 'channels-last: the input is not channels-last'
        conv = next(p for p in probe.task.get_eval_model().parameters() if p.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last), 'channels-last: the weights are not'
    if 'grad_accum' in cells:
        assert len(steps) >= 2 and probe.updates == math.ceil(len(steps) / 2), (len(steps), probe.updates)
    else:
        assert probe.updates == len(steps)
    if 'ema' in cells:
        check_ema(outcome)
    smoothing_off = run(method, *flags, '--smoothing', '0')
    if smoothing_off.refusal is not None:  # refused only without smoothing: not a refusal of this cell
        pytest.fail(f'{method}: --smoothing 0 is refused: {smoothing_off.refusal}')
    assert outcome.losses()[0] != smoothing_off.losses()[0], 'label smoothing does not change the loss'


def _raises(run, method, flags) -> bool:
    try:
        run(method, *flags)
    except Exception:  # noqa: BLE001
        return True
    return False


def check_ema(outcome: Outcome):
    """The EMA moved from its start, differs from the trained weights, was validated, and is a plain timm model."""
    assert math.isfinite(float(outcome.row['eval_ema_top1']))
    probe = outcome.probe
    ema = parameters(probe.task.get_eval_model(ema=True))
    model = parameters(probe.task.get_eval_model())
    assert any(not torch.equal(a, b) for a, b in zip(ema, probe.ema_start)), 'EMA: never updated'
    assert any(not torch.equal(a, b) for a, b in zip(ema, model)), 'EMA: equals the trained weights'
    checkpoint = torch.load(os.path.join(outcome.output, 'last.pth.tar'), map_location='cpu', weights_only=False)
    timm.create_model('test_resnet', num_classes=4).load_state_dict(checkpoint['state_dict_ema'])


@pytest.mark.parametrize('method', METHODS)
def test_mixup_cell(run, matrix, method):
    """Mixup/CutMix trains on other losses than the same run without it, or is refused naming the option."""
    mixed = run(method, *MIXUP)
    if mixed.refusal is not None:
        refused_cell(mixed.refusal, ['mixup'])
        matrix.refused(method, 'mixup', mixed.refusal)
        return
    matrix.expect(method, 'mixup')
    assert_finite_float32_terms(mixed, 'mixup')
    assert mixed.losses()[0] != run(method).losses()[0], 'mixup/cutmix does not change the loss'


@pytest.mark.parametrize('method', METHODS)
def test_compile_cell(run, matrix, method):
    """`--torchcompile` with dynamo's aot_eager backend (graph capture and AOT autograd, no code generation):
    compiled graphs run, and the first step's loss is the eager run's."""
    compiled = run(method, '--torchcompile', 'matrix_aot_eager')
    if compiled.refusal is not None:
        refused_cell(compiled.refusal, ['compile'])
        matrix.refused(method, 'compile', compiled.refusal)
        return
    matrix.expect(method, 'compile')
    assert compiled.probe.compiled_calls > 0, 'no compiled graph ran'
    if not any(step['compiled'] for step in compiled.probe.steps):
        matrix.note(method, 'compile', 'the training forward runs eagerly; the evaluation model is compiled')
    eager = run(method)
    assert compiled.losses()[0] == pytest.approx(eager.losses()[0], rel=1e-4)


@pytest.mark.parametrize('distributed, device, refused', [(False, 'cpu', False), (False, 'cuda', False),
                                                          (True, 'cpu', True), (True, 'cuda', False)])
def test_sync_bn_rule(distributed, device, refused, caplog):
    """The CPU side of the sync-BN cell (the README's legend says so), for every method alike: refused in one line
    under torchrun on the CPU; in one process it does nothing and says so, as timm's train.py converts BatchNorm
    only when distributed (the node-recipe-on-a-laptop test trains through it)."""
    args = argparse.Namespace(sync_bn=True, distributed=distributed)
    if refused:
        with pytest.raises(UsageError, match=r'^--sync-bn needs CUDA devices \(torch.nn.SyncBatchNorm does not run'):
            train._check_sync_bn(args, torch.device(device))
        return
    train._check_sync_bn(args, torch.device(device))
    assert ('--sync-bn does nothing in a single process' in caplog.text) == (not distributed)


def test_inductor_compile(run, matrix, monkeypatch):
    """One method (BAKE: a hook inside the compiled module, a linear solve outside) with inductor's generated code."""
    monkeypatch.setattr(torch._inductor.config, 'compile_threads', 1)
    compiled = run('bake', '--torchcompile', 'inductor')
    assert compiled.refusal is None
    eager = run('bake')
    assert compiled.losses()[0] == pytest.approx(eager.losses()[0], rel=1e-3)
    matrix.note('bake', 'compile', 'also with inductor (generated code)')


def test_ddp_cell(image_folder, tmp_path, matrix):
    """Every method under `torchrun --nproc_per_node 2` (gloo), in one launch, alone, with two batches per update
    (DDP's no_sync between updates) and with mixup/CutMix on: the ranks train on different images and end with the
    same weights, and the summary counts both ranks' images; or both ranks refuse in one line."""
    ddp_cell(matrix, 'ddp', METHODS, METHOD_ARGS, image_folder, tmp_path,
             variants=[(), ('--grad-accum-steps', '2'), tuple(MIXUP)])


def test_readme_matrix_is_rendered_from_the_recorded_results(request):
    """The README's table is `python benchmarks/compat_matrix.py`'s rendering of the committed results, and these
    cover every method's CPU cells (after adding a method, record the matrix again: see the tool's --help)."""
    if request.config.getoption('--matrix-json'):
        pytest.skip('recording the matrix: the README is rendered from the results afterwards')
    assert tool.main(['--check']) == 0


def test_render_marks_notes_and_unmeasured_cells(tmp_path):
    """The table from a hand-written results file: a mark per cell, each reason or note once, CUDA cells without a
    record unmeasured; a method without a CPU cell cannot be rendered."""
    passed = {cell: {'outcome': 'passed', 'on': 'CPU', 'measured': '2026-01-01'} for cell in tool.CPU_CELLS}
    results = {
        'none': dict(passed),
        'dlb': {**passed, 'mixup': {'outcome': 'refused', 'reason': '--mixup is refused'},
                'compile': {'outcome': 'passed', 'note': 'eager training'},
                'ema': {'outcome': 'failed', 'reason': '--mixup is refused'}},
    }
    text = tool.render(results, ['none', 'dlb'])
    lines = text.splitlines()
    assert lines[0].startswith('| method | bf16 (CPU) | fp16 + scaling (CUDA) | DDP | EMA | compile |')
    assert lines[2] == '| `none` | ' + ' | '.join('unmeasured' if c.cuda else 'yes' for c in tool.CELLS) + ' |'
    dlb = dict(zip([c.name for c in tool.CELLS], lines[3].strip('|').split(' | ')[1:]))
    assert (dlb['mixup'], dlb['compile'], dlb['ema'], dlb['fp16']) == \
        ('refused [1]', 'yes [2]', '**FAILED** [1]', 'unmeasured')
    assert '1. --mixup is refused' in lines and '2. eager training' in lines
    assert 'are unmeasured in this release' in text and 'Measured on CPU (2026-01-01)' in text
    del results['dlb']['smoothing']
    with pytest.raises(ValueError, match='dlb x smoothing'):
        tool.render(results, ['none', 'dlb'])
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{tool.BEGIN}\nold\n{tool.END}\nrest\n')
    assert tool.splice(readme.read_text(), 'new') == f'intro\n{tool.BEGIN}\nnew\n{tool.END}\nrest\n'


def test_merge_results_replaces_cells_measured_again(tmp_path):
    path = str(tmp_path / 'results.json')
    tool.merge_results(path, {('dlb', 'ema'): {'outcome': 'passed'}, ('dlb', 'mixup'): {'outcome': 'refused',
                                                                                         'reason': 'r'}})
    tool.merge_results(path, {('dlb', 'ema'): {'outcome': 'failed', 'reason': 'x'}})
    with open(path) as f:
        results = json.load(f)
    assert results['dlb']['ema']['outcome'] == 'failed' and results['dlb']['mixup']['reason'] == 'r'
    assert results['dlb']['ema']['on'] == tool.environment()
