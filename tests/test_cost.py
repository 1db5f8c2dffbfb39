"""`python -m timm_selfkd.cost` on a tiny model on the CPU: a row for every method and the stack with the fields of
its JSON, the state and reading pattern each method declares, out-of-memory and refused methods as rows with their
reason, recipes and one-line errors; the projections against hand-computed values."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import yaml

import timm_selfkd
from timm_selfkd.components.soft_target_memory import memory_bytes
from timm_selfkd.cost import command
from timm_selfkd.cost.measure import MethodRun, Result, Setting, measure
from timm_selfkd.cost.report import cost_rows
from timm_selfkd.methods.dlb import DLBTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, BATCH, IMAGES, EPOCHS = 16, 8, 64, 3
TINY = ['--model', 'test_resnet', '--num-classes', str(CLASSES), '--input-size', '3', '32', '32', '-b', str(BATCH),
        '--steps', '1', '--warmup', '1', '--dataset-size', str(IMAGES), '--epochs', str(EPOCHS), '--device', 'cpu']
FIELDS = {'method', 'selfkd', 'hparams', 'status', 'reason', 'step_ms', 'step_ms_iqr', 'time_ratio', 'time_ratio_iqr',
          'timed_steps', 'images_per_s', 'new_images_per_s', 'peak_memory_bytes', 'memory_ratio', 'state_bytes',
          'per_sample_state_bytes', 'per_sample_state_total_bytes', 'per_sample_state_variants', 'steps_per_epoch',
          'new_images_per_step', 'reads_per_image', 'wall_s', 'wall_ratio_equal_epochs', 'plain_wall_s_equal_images',
          'wall_ratio_equal_images'}

pytestmark = pytest.mark.xdist_group('cost')


def run_cost(tmp_path, *argv):
    path = tmp_path / 'cost.json'
    command.main([*TINY, '--json', str(path), *argv])
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def every_method(tmp_path_factory):
    return run_cost(tmp_path_factory.mktemp('cost'), '--selfkd', 'all')


@pytest.fixture(scope='module')
def rows(every_method):
    return {row['method']: row for row in every_method['rows']}


def test_every_method_and_the_stack_get_a_measured_row_with_every_field(rows, every_method):
    assert list(rows) == timm_selfkd.list_methods() + ['ddgsd+dlb']
    for name, row in rows.items():
        assert set(row) == FIELDS, name
        assert row['status'] == 'ok' and row['reason'] is None, (name, row['reason'])
        assert row['selfkd'] == name and row['step_ms'] > 0 and row['peak_memory_bytes'] > 0, name
        assert row['timed_steps'] == 1 and row['images_per_s'] == pytest.approx(BATCH / row['step_ms'] * 1e3)
    assert rows['none']['time_ratio'] == 1 and rows['none']['memory_ratio'] == 1
    assert every_method['setting']['input_size'] == [3, 32, 32] and every_method['epochs'] == EPOCHS
    assert {'torch', 'timm', 'device', 'date', 'command'} <= set(every_method['environment'])
    assert every_method['environment']['command'].startswith('python -m timm_selfkd.cost --model test_resnet ')
    assert '| ddgsd+dlb |' in every_method['markdown']
    assert 'compare at equal images): bake, cskd, ddgsd, dlb, ddgsd+dlb.' in every_method['markdown']


def test_the_reading_pattern_is_the_method_s_batch_sampler(rows):
    """64 images, batches of 8: DLB's halves of 4 (16, the first batch two of them), BAKE's 4 anchors + 4
    partners and CS-KD's, DDGSD's 4 images x 2 views; the stack's DLB halves of 2 images x 2 views."""
    steps = {name: row['steps_per_epoch'] for name, row in rows.items()}
    assert steps['none'] == steps['pskd'] == steps['mrkd'] == IMAGES // BATCH
    assert (steps['dlb'], steps['bake'], steps['cskd'], steps['ddgsd'], steps['ddgsd+dlb']) == (15, 16, 16, 16, 31)
    for name, row in rows.items():
        assert row['reads_per_image'] == pytest.approx(steps[name] * BATCH / IMAGES)
        assert row['new_images_per_step'] == pytest.approx(IMAGES / steps[name])


def test_the_projections_follow_the_steps_of_each_method(rows):
    plain = rows['none']
    for name, row in rows.items():
        assert row['wall_s'] == pytest.approx(EPOCHS * row['steps_per_epoch'] * row['step_ms'] / 1e3), name
        assert row['wall_ratio_equal_epochs'] == pytest.approx(row['wall_s'] / plain['wall_s']), name
        same_images = plain['wall_s'] * row['reads_per_image'] / plain['reads_per_image']
        assert row['plain_wall_s_equal_images'] == pytest.approx(same_images), name


def test_kept_state_is_what_each_method_keeps_between_steps(rows):
    model = timm.create_model('test_resnet', num_classes=CLASSES)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert rows['mrkd']['state_bytes'] == rows['mrkd']['hparams']['copies'] * weights  # MrKD's frozen copies
    assert rows['dlb']['state_bytes'] == BATCH // 2 * CLASSES * 4  # the last new half's float32 logits
    pskd = rows['pskd']  # PS-KD's dense fp16 table of N x K, and its top-10 variant
    assert pskd['per_sample_state_bytes'] == 2 * CLASSES
    assert pskd['state_bytes'] == pskd['per_sample_state_total_bytes'] == memory_bytes(IMAGES, CLASSES)
    assert pskd['per_sample_state_variants'] == {'pskd (topk=10)': memory_bytes(IMAGES, CLASSES, topk=10)}
    for name in ('none', 'bake', 'lsrkd', 'self_guidance', 'rdrop'):  # nothing kept
        assert rows[name]['state_bytes'] == 0 and rows[name]['per_sample_state_bytes'] == 0, name
    for name in ('dks', 'frskd', 'mixskd', 'multi_exit', 'uskd'):  # training-only parts
        assert rows[name]['state_bytes'] > 0 and rows[name]['per_sample_state_bytes'] == 0, name


def test_an_out_of_memory_method_and_a_refused_one_are_rows_with_their_reason(tmp_path, monkeypatch):
    """dla46_c has no place for stochastic depth, which Self-Guidance needs; DLB's step runs out of memory."""
    def out_of_memory(self, input, target):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')

    monkeypatch.setattr(DLBTask, 'forward', out_of_memory)
    record = run_cost(tmp_path, '--model', 'dla46_c', '--selfkd', 'self_guidance,dlb,lsrkd')
    rows = {row['method']: row for row in record['rows']}
    assert [rows[name]['status'] for name in rows] == ['ok', 'refused', 'out of memory', 'ok']
    assert rows['self_guidance']['reason'].startswith('refused: self_guidance needs stochastic depth, and model DLA')
    assert rows['dlb']['reason'] == 'out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)'
    assert set(rows['dlb']) == {'method', 'selfkd', 'hparams', 'status', 'reason'}
    assert rows['lsrkd']['time_ratio'] > 0 and rows['lsrkd']['peak_memory_bytes'] > 0
    assert '| dlb | out of memory (CUDA out of memory. Tried to allocate 20.00 GiB) |' in record['markdown']


def test_the_time_limit_ends_the_timing_after_one_step():
    setting = Setting(model='test_resnet', num_classes=4, input_size=(3, 32, 32), batch_size=8, num_samples=64)
    results = measure(setting, [MethodRun('none', 'none'), MethodRun('dlb', 'dlb')], steps=5, warmup=1, time_limit=0)
    assert [len(result.times) for result in results] == [1, 1]


def test_the_projections_against_hand_computed_values():
    """Plain: 100 steps of 0.1 s per epoch; a method reading each image twice: 200 steps of 0.12 s."""
    setting = Setting(model='m', num_classes=10, input_size=(3, 8, 8), batch_size=10, num_samples=1000)
    plain = Result(MethodRun('none', 'none'), times=np.array([0.1, 0.1, 0.1]), peak_bytes=100, state_bytes=0,
                   steps_per_epoch=100)
    twice = Result(MethodRun('dlb', 'dlb'), times=np.array([0.11, 0.12, 0.13]), peak_bytes=150, state_bytes=64,
                   steps_per_epoch=200)
    _, row = cost_rows([plain, twice], setting, epochs=10)
    assert row['time_ratio'] == pytest.approx(1.2) and row['time_ratio_iqr'] == pytest.approx([1.15, 1.25])
    assert row['memory_ratio'] == 1.5 and row['reads_per_image'] == 2 and row['new_images_per_step'] == 5
    assert row['wall_s'] == pytest.approx(10 * 200 * 0.12)  # 240 s against plain's 10 x 100 x 0.1 = 100 s
    assert row['wall_ratio_equal_epochs'] == pytest.approx(2.4)
    assert row['plain_wall_s_equal_images'] == pytest.approx(200)  # plain training for 20 epochs
    assert row['wall_ratio_equal_images'] == pytest.approx(1.2)
    assert row['images_per_s'] == pytest.approx(10 / 0.12) and row['new_images_per_s'] == pytest.approx(5 / 0.12)


def recipe(tmp_path, **values):
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_a_recipe_supplies_the_options_and_flags_override_it(tmp_path):
    path = recipe(tmp_path, model='test_resnet', batch_size=16, epochs=7, img_size=48, drop_path=0.1, amp=True,
                  selfkd='dlb', dlb_alpha=0.5, lr=0.3, opt='adamw', data_dir='/nowhere')
    args, runs = command.parse_args(['-c', path, '-b', '8'])
    assert (args.model, args.batch_size, args.epochs, args.img_size, args.amp, args.opt) == \
        ('test_resnet', 8, 7, 48, True, 'adamw')
    assert [(run.label, run.method, run.hparams['alpha']) for run in runs[1:]] == [('dlb (alpha=0.5)', 'dlb', 0.5)]
    setting = command._setting(args)
    assert setting.input_size == (3, 48, 48) and setting.model_kwargs == {'drop_path_rate': 0.1}
    args, runs = command.parse_args(['-c', path, '--selfkd', 'bake'])  # the recipe's DLB value is left out
    assert [run.label for run in runs] == ['none', 'bake']


def test_each_method_takes_its_own_flags_and_a_stack_its_parts(tmp_path):
    _, runs = command.parse_args(['--selfkd', 'dlb,pskd,ddgsd+dlb', '--dlb-alpha', '0.5', '--pskd-topk', '10'])
    runs = {run.method: run for run in runs}
    assert runs['dlb'].hparams['alpha'] == 0.5 and runs['pskd'].hparams['topk'] == 10
    assert runs['ddgsd+dlb'].hparams['dlb'].alpha == 0.5 and runs['pskd'].state_variants == {}
    assert runs['dlb'].label == 'dlb (alpha=0.5)' and runs['none'].hparams == {}


@pytest.mark.parametrize('argv, message', [
    (['--selfkd', 'dlbb'], "unknown self-KD method 'dlbb' (did you mean 'dlb'?)"),
    (['--selfkd', 'bake', '--dlb-alpha', '0.5'], '--dlb-alpha is a hyper-parameter of dlb, which is not measured'),
    (['--selfkd', 'dlb', '--dlb-alpha', '-1'], 'dlb alpha must be >= 0'),
    (['--selfkd', 'dlb', '--dlb-alpa', '0.5'], 'unrecognized arguments: --dlb-alpa 0.5'),
    (['-b', '7'], '-b must be even and >= 4'),
    (['--steps', '0'], '--steps must be >= 1'),
])
def test_bad_input_is_a_one_line_error_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        command.parse_args(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_an_unknown_model_is_a_one_line_error_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit:
        command.main(['--model', 'resnet_nope', '--selfkd', 'dlb', '--device', 'cpu'])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        'python -m timm_selfkd.cost: error: Unknown model (resnet_nope)'


def test_the_module_reports_a_bad_method_in_one_line_without_a_traceback():
    result = subprocess.run([sys.executable, '-m', 'timm_selfkd.cost', '--selfkd', 'bakee'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip().splitlines() == [
        "python -m timm_selfkd.cost: error: unknown self-KD method 'bakee' (did you mean 'bake'?); choose from: "
        + ', '.join(timm_selfkd.list_methods())]


def test_the_readme_s_first_screen_command_parses():
    with open(os.path.join(REPO, 'README.md')) as f:
        block = re.search(r'```bash\n(python -m timm_selfkd\.cost .*?)```', f.read(), re.S).group(1)
    argv = shlex.split(block.replace('\\\n', ' ').split('#')[0])[3:]
    args, runs = command.parse_args(argv)
    assert args.model == 'convnext_tiny' and args.dataset_size == 1281167 and args.amp
    assert [run.method for run in runs] == timm_selfkd.list_methods() + ['ddgsd+dlb']
